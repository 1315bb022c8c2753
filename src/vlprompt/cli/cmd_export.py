"""`vlprompt export RUN OUT`: the learned prompt as safetensors + JSON manifest (readable by load_run)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from vlprompt.run import export_run

    out = export_run(args.run, args.out, force=args.force)
    print(f"exported {args.run} -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's learned prompt as safetensors + manifest (no machine paths: shareable)"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="output directory (new, empty, or an earlier export)")
    p.add_argument(
        "--force", action="store_true", help="replace OUT even when it is a run (it stops being one)"
    )
    p.set_defaults(func=_run)
