"""`vlprompt demo`: the main job on the embedded data set, on a fresh machine, offline.

Trains MPL (default) on the base classes of the built-in ``demo`` data set (scikit-learn's
handwritten digits, generated on first use), evaluates base and new classes, prints the
Base / New / HM table and writes the report with plots.  It runs the very same code path as
``vlprompt run --protocol base2new``; only the defaults are chosen to finish in minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

UNTRAINED = "untrained weights: pipeline check only, accuracy is chance"
DEMO_MODEL = "vlp-demo"  # 12 layers (MPL's depth 9 fits), width 128: the offline demo finishes in minutes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and evaluate a method base-to-new on the built-in digits data set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", default="mpl", help="method to train (default: mpl)")
    p.add_argument(
        "--model",
        default=None,
        help=f"open_clip architecture (default {DEMO_MODEL}, or inferred from --weights)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", default=None, help="local CLIP weights file (.pt / .bin / .safetensors)")
    g.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag (needs network or a cached download)"
    )
    p.add_argument("--shots", type=int, default=16, help="training images per class (default 16)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--out", default="demo_out", help="output folder (runs/ and report/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.protocols.grid import plan_grid
    from vlprompt.protocols.report import base2new_summary, build_report, collect_runs
    from vlprompt.protocols.runner import run_grid, summarize

    t0 = time.perf_counter()
    model = args.model or (None if args.weights else DEMO_MODEL)
    if args.weights or args.pretrained:
        print(f"backbone: {model or 'inferred from file'} with weights {args.weights or args.pretrained}")
    else:
        small = (
            " (a small 12-layer, width-128 CLIP so the offline demo takes minutes; "
            "--model ViT-B-16 for the real one)"
        )
        print(f"backbone: {model}{small if model == DEMO_MODEL else ''}, random init -- {UNTRAINED}")
    print(
        f"data: built-in 'demo' set (scikit-learn digits, 10 classes; base = zero..four, new = five..nine), "
        f"{args.shots} shots, seed {args.seed}"
    )
    out = Path(args.out)
    specs = plan_grid(
        "base2new",
        [args.method],
        ["demo"],
        [args.seed],
        out / "runs",
        shots=[args.shots],
        model=model,
        pretrained=args.pretrained,
        weights=args.weights,
        overrides=args.overrides,
        epochs=args.epochs,
        device=args.device,
    )
    train = specs[0].cfg["train"]
    print(
        f"method: {args.method} (preset recipe: {train.get('epochs')} epochs, "
        f"batch {train.get('batch_size')}, "
        f"lr {train.get('lr')})"
    )
    results = run_grid(specs, progress=not args.no_progress)
    print(summarize(results))
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"error: {r.name}: {r.reason}")
        return 1
    report = build_report(out / "runs", out / "report")
    records = [r for r in collect_runs(out / "runs") if r.method == args.method and r.protocol == "base2new"]
    rows, _ = base2new_summary(records)
    print()
    print(f"{'method':<12} {'data set':<10} {'Base':>7} {'New':>7} {'HM':>7}")
    for row in rows:
        if row.base is not None and row.new is not None:
            print(
                f"{args.method:<12} {row.dataset:<10} {row.base.mean:7.2f} {row.new.mean:7.2f} {row.hm:7.2f}"
            )
    if report.random_backbone:
        print(f"({UNTRAINED})")
    print(f"\nreport: {report.markdown}  ({len(report.plots)} plots, {len(report.csvs)} CSV tables)")
    print(f"trained prompt: {specs[0].out_dir}  (use `vlprompt predict --run {specs[0].out_dir} ...`)")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0
