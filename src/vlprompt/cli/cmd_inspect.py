"""`vlprompt inspect`: per-layer figures of what a method's prompts do on a few images.

For a trained run (``--run``) or a freshly initialised method (``--method``, on ``--model`` with
optional ``--weights``), on image files or the first ``--n`` test images of a data set: per layer and
tower every prompt token (inserted, replaced, removed, carried), the exact instance->prompt share
lambda, the gate alpha (DPL), the carried-term ratio (DPL's A2 carry) and the prompt/instance norm
ratio; plus each tower's feature cosine to frozen CLIP.  ``--json`` writes everything; a PNG of the
per-layer counts and norms is written beside it (``--figure``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlprompt.cli.common import output_file, positive_int
from vlprompt.errors import VlpromptError


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _images(args: argparse.Namespace, backbone: Any):
    import torch

    from vlprompt.data import build_transform, load_rgb

    tf = build_transform(False, **backbone.preprocess_cfg)
    if args.images:
        paths = [Path(p) for p in args.images]
        for p in paths:
            if not p.is_file():
                raise VlpromptError(f"image not found: {p}; check the path")
        return torch.stack([tf(load_rgb(str(p))) for p in paths]), [str(p) for p in paths]
    if not args.dataset:
        raise VlpromptError("no images: pass image files, or --dataset NAME (with --root) and --n")
    from vlprompt.data import get_dataset

    if args.n < 1:
        raise VlpromptError(f"--n must be at least 1, got {args.n}")
    items = get_dataset(args.dataset, args.root).test[: args.n]
    names = [f"{args.dataset}:{d.relpath}" for d in items]  # no machine-specific paths in the JSON
    return torch.stack([tf(load_rgb(d.impath)) for d in items]), names


def _model(args: argparse.Namespace):
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import create_model
    from vlprompt.train.config import apply_overrides

    if args.run:
        from vlprompt.run import load_run

        fresh = {"--method": args.method, "--model": args.model, "--weights": args.weights, "--set": args.set}
        given = [flag for flag, value in fresh.items() if value]
        if given:
            raise VlpromptError(
                f"{', '.join(given)} describe fresh prompts; a run has its own method, backbone and "
                "options: pass either --run or --method"
            )
        return load_run(args.run, device=args.device)
    if not args.method:
        raise VlpromptError("pass --run DIR (a trained run) or --method NAME (fresh prompts)")
    options = apply_overrides({"options": {}}, args.set or []).get("options") or {}
    backbone = load_backbone(args.model or "ViT-B-16", args.weights, device=args.device or "cpu")
    classes = [c.strip() for c in (args.classes or "cat,dog").split(",") if c.strip()]
    import torch

    torch.manual_seed(args.seed)
    return create_model(args.method, backbone, classes, **options)


def _run(args: argparse.Namespace) -> int:
    from vlprompt.methods.inspection import inspect_prompts
    from vlprompt.utils import atomic_write_json

    model = _model(args)
    if args.classes and args.run:
        model.set_classnames([c.strip() for c in args.classes.split(",") if c.strip()])
    images, paths = _images(args, model.backbone)
    report = inspect_prompts(model, images)
    report["images_used"] = paths
    if report["reconstructed"]:
        print(f"{report['method']}: {report['note']}")
    print(f"{report['method']} on {report['images']} image(s), {report['classes']} class(es)")
    counts = ("prompts", "inserted", "replaced", "removed", "carried")
    cols = ("share", "share_pooled", "alpha", "carried_ratio", "prompt_norm_ratio")
    for tower in ("image", "text"):
        t = report[tower]
        print(f"\n{tower} tower (feature cosine to frozen CLIP {t['cosine_to_frozen']:.4f})")
        print(
            f"{'layer':>5}  "
            + "  ".join(f"{c:>8}" for c in counts)
            + "  "
            + "  ".join(f"{c:>13}" for c in cols)
        )
        for row in t["layers"]:
            print(
                f"{row['layer']:>5}  "
                + "  ".join(f"{row[c]:>8}" for c in counts)
                + "  "
                + "  ".join(f"{_fmt(row[c]):>13}" for c in cols)
            )
    print(
        "\nprompts: every prompt token the block sees = carried (from earlier layers) + inserted "
        "(appended here) + replaced (instance slots overwritten here); removed: dropped before the block. "
        "share: exact instance->prompt share of standard attention (mean over instance rows; "
        "share_pooled: CLS / end-of-text row) of the appended prompts; alpha: the gate used; "
        "carried_ratio: |beta*carried| / |(1-beta)*fresh| of the prompts entering the block"
    )
    if not args.no_figure:
        from vlprompt.methods.inspection import prompt_figure

        figure = args.figure or (
            args.json.with_suffix(".png") if args.json else Path(f"inspect_{report['method']}.png")
        )
        print(f"wrote figure {prompt_figure(report, figure)} (per-layer prompt counts and norms)")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="per-layer figures of what a method's prompts do on a few images"
    )
    p.add_argument("--run", help="a trained run (or export) directory")
    p.add_argument("--method", help="a method with fresh prompts (instead of --run)")
    p.add_argument("--model", default=None, help="backbone architecture for --method (default ViT-B-16)")
    p.add_argument(
        "--weights", default=None, help="backbone weights: open_clip tag or local file (default random)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option, e.g. options.beta=0.1")
    p.add_argument("--classes", help="comma-separated class names (default: the run's, or 'cat,dog')")
    p.add_argument("--dataset", help="take images from this data set's test split")
    p.add_argument("--root", help="data root for --dataset")
    p.add_argument("--n", type=positive_int, default=8, help="how many --dataset images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh prompts for --method (default 0)")
    p.add_argument("--device", default=None, help="auto, cpu (default for --method), cuda or cuda:N")
    p.add_argument("--json", type=output_file(".json"), help="write the full figures to this JSON file")
    p.add_argument(
        "--figure",
        type=output_file(".png", ".pdf", ".svg"),
        help="PNG of the per-layer prompt counts and norms (default: beside --json, else "
        "./inspect_<method>.png)",
    )
    p.add_argument("--no-figure", action="store_true", help="print the table only")
    p.add_argument("images", nargs="*", help="image files")
    p.set_defaults(func=_run)
