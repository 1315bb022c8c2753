"""`vlprompt report`: Markdown + CSV tables and PNG plots from the run directories of `vlprompt run`."""

from __future__ import annotations

import argparse

from vlprompt.cli.common import output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables (Markdown, CSV) and plots from a runs directory",
        description="Build report.md, one CSV per table and PNG plots from run-directory files only "
        "(config.yaml, metrics.json, log.jsonl). Base-to-new Average = HM(mean Base, mean New).",
    )
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="the --out folder of `vlprompt run`")
    p.add_argument("--out", type=output_dir, help="output folder (default RUNS_DIR/report)")
    p.add_argument(
        "--reference",
        action="store_true",
        help="show the published numbers (ViT-B/16, pretrained CLIP) beside ours, labelled",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlprompt.protocols.report import RANDOM_BANNER, build_report

    res = build_report(args.runs_dir, args.out, reference=args.reference, plots=not args.no_plots)
    if res.random_backbone:
        print(f"warning: {RANDOM_BANNER}")
    print(f"{res.runs} runs -> {res.markdown} ({len(res.csvs)} CSV, {len(res.plots)} plots)")
    return 0
