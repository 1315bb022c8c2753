"""`vlprompt predict`: top-k classes of images under a trained run's prompts (any class names).

Output: a readable table (default), ``--format json`` (one JSON document: a list of
``{"image", "predictions": [{"rank", "class", "probability"}]}``) or ``--format csv``
(``image,rank,class,probability``).  Unreadable images stop the command unless ``--skip-bad``,
which reports each on stderr and predicts the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from vlprompt.errors import VlpromptError

FORMATS = ("table", "json", "csv")


def _load_images(paths: list[Path], skip_bad: bool) -> tuple[list[Path], list]:
    from vlprompt.data import load_rgb

    kept, images = [], []
    for p in paths:
        try:
            if not p.is_file():
                raise VlpromptError(f"image not found: {p}; check the path or pass --skip-bad")
            images.append(load_rgb(str(p)))
            kept.append(p)
        except VlpromptError as e:
            if not skip_bad:
                raise
            print(f"skipped {p}: {str(e).split('; ')[0]}", file=sys.stderr)
    if not kept:
        raise VlpromptError("no readable images left to predict; check the paths")
    return kept, images


def _backbone(args: argparse.Namespace):
    if not args.weights:
        return None
    from vlprompt.backbones import load_backbone
    from vlprompt.train.precision import resolve_device

    device = resolve_device(args.device or "auto")
    return load_backbone(args.model, pretrained=args.weights, device=device)


def write(pred, paths: list[Path], fmt: str, out=None) -> None:
    """Print a :class:`~vlprompt.methods.model.Prediction` for ``paths`` in ``fmt``."""
    out = out or sys.stdout
    records = pred.records()
    if fmt == "json":
        doc = [{"image": str(p), "predictions": r} for p, r in zip(paths, records)]
        out.write(json.dumps(doc, indent=2) + "\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["image", "rank", "class", "probability"])
        for p, rows in zip(paths, records):
            for r in rows:
                w.writerow([str(p), r["rank"], r["class"], f"{r['probability']:.6f}"])
    else:
        for p, rows in zip(paths, records):
            out.write(f"{p}\n")
            for r in rows:
                out.write(f"  {r['probability']:7.4f}  {r['class']}\n")


def _run(args: argparse.Namespace) -> int:
    import torch

    from vlprompt.data import build_transform
    from vlprompt.run import load_run

    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise VlpromptError(
                "--classes is empty; pass names separated by commas, e.g. --classes 'cat,dog'"
            )
    if args.topk < 1:
        raise VlpromptError(f"--topk must be at least 1, got {args.topk}")
    if args.model and not args.weights:
        raise VlpromptError(
            "--model names the architecture of --weights; the run names its own backbone: drop --model "
            "or pass the weights file with --weights"
        )
    if args.max_image_pixels is not None:
        if args.max_image_pixels < 0:
            raise VlpromptError(
                f"--max-image-pixels must be 0 (no limit) or more, got {args.max_image_pixels}"
            )
        from vlprompt.data import set_max_image_pixels

        set_max_image_pixels(args.max_image_pixels)
    paths, pil = _load_images([Path(p) for p in args.images], args.skip_bad)
    model = load_run(args.run, backbone=_backbone(args), device=args.device)
    tf = build_transform(False, **model.backbone.preprocess_cfg)
    pred = model.predict(torch.stack([tf(im) for im in pil]), classes, topk=args.topk)
    write(pred, paths, args.format)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images with a trained run's prompts")
    p.add_argument("--run", required=True, help="run, export or imported prompt directory")
    p.add_argument("--classes", help="comma-separated class names (default: the training classes)")
    p.add_argument("--topk", type=int, default=5, help="how many classes to show (default 5)")
    p.add_argument("--format", choices=FORMATS, default="table", help="table (default), json or csv")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed on stderr)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="largest image (width x height) decoded, against decompression bombs; 0 = no limit "
        "(default 178,956,970: data.max_image_pixels)",
    )
    p.add_argument(
        "--weights",
        help="CLIP weights file to use instead of the run's recorded backbone (architecture inferred)",
    )
    p.add_argument("--model", default=None, help="open_clip architecture of --weights (default: inferred)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(func=_run)
