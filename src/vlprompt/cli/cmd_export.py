"""`vlprompt export RUN OUT`: the learned prompt as safetensors + JSON manifest (readable by load_run).

``--hub DIR`` writes a folder ready for the Hugging Face Hub (the export + metrics + a model card);
``vlprompt push DIR org/name`` uploads it.
"""

from __future__ import annotations

import argparse

from vlprompt.errors import VlpromptError


def _run(args: argparse.Namespace) -> int:
    if args.hub:
        if args.out:
            raise VlpromptError("pass either OUT or --hub DIR, not both")
        from vlprompt.run.hub import export_hub

        out = export_hub(args.run, args.hub)
        print(f"exported {args.run} -> {out} (Hub folder: prompt, manifest, config, metrics, model card)")
        print(f"upload: vlprompt push {out} ORG/NAME   load: vlprompt.load_prompt('hf-hub:ORG/NAME')")
        return 0
    if not args.out:
        raise VlpromptError("pass the output folder: vlprompt export RUN OUT (or --hub DIR)")
    from vlprompt.run import export_run

    out = export_run(args.run, args.out, force=args.force)
    print(f"exported {args.run} -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's learned prompt as safetensors + manifest (no machine paths: shareable)"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("out", nargs="?", help="output directory (new, empty, or an earlier export)")
    p.add_argument(
        "--force", action="store_true", help="replace OUT even when it is a run (it stops being one)"
    )
    p.add_argument(
        "--hub", metavar="DIR", help="write a Hugging Face Hub folder (adds metrics and a model card)"
    )
    p.set_defaults(func=_run)
