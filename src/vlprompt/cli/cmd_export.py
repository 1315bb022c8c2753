"""`vlprompt export RUN OUT`: the learned prompt as safetensors + JSON manifest (readable by load_run)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from vlprompt.run import export_run

    out = export_run(args.run, args.out)
    print(f"exported {args.run} -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's learned prompt as safetensors + manifest (no machine paths: shareable)"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=_run)
