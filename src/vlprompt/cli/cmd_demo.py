"""`vlprompt demo`: what prompt learning does, offline on a fresh machine, in about 2.5 minutes on 2 cores.

By default it uses ``vlp-world``, the small CLIP that ships with vlprompt, pretrained by vlprompt on its
generated world of coloured, textured shapes (docs/world.md).  On the ``world-textures`` data set
(32 texture x colour classes, "striped red shape"; the first 16 are "base", the other 16 "new") it
evaluates zero-shot CLIP, trains CoOp and MPL
(their base-to-new presets) on 8 shots of each base class, and prints Base / New / HM of the three side by
side, then writes a report (tables, bar chart, training curves).  These are toy-world numbers, not CLIP
results -- but the backbone is pretrained, so they move for real (it knows colour and background, not
yet texture: docs/world.md).  Measured: 85 s on 2 cores shared with other jobs (load average 5).

``--model vlp-demo`` (or any open_clip architecture without weights) is the random-backbone pipeline
check on the digits ``demo`` set, whose accuracy is chance.  Every run goes through the very same code
path as ``vlprompt run --protocol base2new --method zeroshot,coop,mpl``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from vlprompt.cli.common import output_dir

log = logging.getLogger(__name__)

UNTRAINED = "untrained weights: pipeline check only, accuracy is chance"
WORLD_MODEL = "vlp-world"  # pretrained, bundled: the default
WORLD_DATASET = "world-textures"
RANDOM_MODEL = "vlp-demo"  # 12 layers (MPL's depth 9 fits), width 128, random init: the pipeline check
RANDOM_DATASET = "demo"
WORLD_SHOTS = 8


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="zero-shot CLIP vs CoOp vs MPL, base-to-new, on the bundled pretrained world CLIP (~1.5 min)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--method", default="coop,mpl", help="methods to train beside zero-shot CLIP (default: coop,mpl)"
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"backbone (default {WORLD_MODEL}, pretrained and bundled; {RANDOM_MODEL}: random-init check)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", default=None, help="local CLIP weights file (.pt / .bin / .safetensors)")
    g.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag (needs network or a cached download)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        help=f"data set (default {WORLD_DATASET} for {WORLD_MODEL}, else the digits '{RANDOM_DATASET}' set)",
    )
    p.add_argument(
        "--shots", type=int, default=None, help=f"training images per class (default {WORLD_SHOTS} / 16)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--out", type=output_dir, default="demo_out", help="output folder (runs/ and report/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


class _OneBanner(logging.Filter):
    """The demo prints the untrained-weights banner itself, once; drop the runner's repeat of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untrained weights" not in record.getMessage()


def _is_random(backbone: str | None, args: argparse.Namespace) -> bool:
    if args.weights or args.pretrained:
        return False
    from vlprompt.backbones.bundled import bundled_names

    return backbone not in bundled_names()


def run(args: argparse.Namespace) -> int:
    from vlprompt.protocols.grid import GridRequest, plan_grid
    from vlprompt.protocols.report import base2new_summary, build_report, collect_runs, method_label
    from vlprompt.protocols.runner import run_grid, summarize
    from vlprompt.train.config import RunRequest

    t0 = time.perf_counter()
    model = args.model or (None if args.weights else WORLD_MODEL)
    if model is not None and not Path(model).suffix and "/" not in model and os.sep not in model:
        # an unknown name would fail every run: say it first (a path is load_backbone's to judge)
        from vlprompt.backbones import canonical_model_name, list_architectures
        from vlprompt.errors import unknown_name

        if canonical_model_name(model) not in list_architectures():
            raise unknown_name("model", model, list_architectures(), see="`vlprompt models`")
    random = _is_random(model, args)
    world = model == WORLD_MODEL and not (args.weights or args.pretrained)
    dataset = args.dataset or (WORLD_DATASET if world else RANDOM_DATASET)
    shots = args.shots or (WORLD_SHOTS if world else 16)
    if args.weights or args.pretrained:
        print(f"backbone: {model or 'inferred from file'} with weights {args.weights or args.pretrained}")
    elif random:
        print(f"backbone: {model}, random init -- {UNTRAINED}")
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OneBanner())
    else:
        print(
            f"backbone: {model}, bundled weights pretrained by vlprompt on its generated world "
            "(a toy CLIP: coloured, textured shapes only; these are not CLIP results)"
        )
    from vlprompt.data import get_spec

    spec = get_spec(dataset)
    print(
        f"data: '{spec.name}' ({spec.title}, {spec.num_classes} classes; base = first half, new = the rest), "
        f"{shots} shots, seed {args.seed}"
    )
    out = Path(args.out)
    methods = [
        "zeroshot",
        *[m.strip() for m in args.method.split(",") if m.strip() and m.strip() != "zeroshot"],
    ]
    run = RunRequest(methods[0], model=model, pretrained=args.pretrained, weights=args.weights,
                     overrides=tuple(args.overrides), epochs=args.epochs, device=args.device)  # fmt: skip
    specs = plan_grid(
        GridRequest("base2new", methods, [spec.name], [args.seed], out / "runs", [shots], run=run)
    )
    for sp in specs[1:]:
        train = sp.cfg.train
        print(
            f"method: {sp.cfg.method} (preset recipe: {train.epochs} epochs, "
            f"batch {train.batch_size}, lr {train.lr})"
        )
    results = run_grid(specs, progress=not args.no_progress)
    print(summarize(results))
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"error: {r.name}: {r.reason}")
        return 1
    report = build_report(out / "runs", out / "report")
    records = [r for r in collect_runs(out / "runs") if r.protocol == "base2new" and r.dataset == spec.name]
    print()
    print(f"{'method':<16} {'data set':<22} {'Base':>7} {'New':>7} {'HM':>7}")
    for m in methods:
        rows, _ = base2new_summary([r for r in records if r.method == m])
        for row in rows:
            if row.base is not None and row.new is not None:
                print(
                    f"{method_label(m):<16} {row.dataset:<22} {row.base.mean:7.2f} {row.new.mean:7.2f} "
                    f"{row.hm:7.2f}"
                )
    half = spec.num_classes - spec.num_classes // 2
    print(
        f"(chance: {100 / half:.1f}% on each half; zero-shot CLIP is the row to beat on Base and keep on New)"
    )
    print(f"\nreport: {report.markdown}  ({len(report.plots)} plots, {len(report.csvs)} CSV tables)")
    print(f"trained prompts: {out / 'runs'}  (use `vlprompt predict --run RUN_DIR ...`)")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0
