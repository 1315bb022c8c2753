"""`vlprompt push DIR org/name`: upload an `export --hub` folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from vlprompt.run.hub import push_hub

    url = push_hub(args.folder, args.repo, private=args.private, message=args.message)
    print(f"pushed {args.folder} -> {url}  (load: vlprompt.load_prompt('hf-hub:{args.repo}'))")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload an `export --hub` folder to the Hugging Face Hub (needs a network and a token)",
        description="Upload a folder written by `vlprompt export RUN --hub DIR` with huggingface_hub "
        "(the repository is created if missing; log in first with `huggingface-cli login` or set HF_TOKEN).",
    )
    p.add_argument("folder", help="the folder written by `vlprompt export RUN --hub DIR`")
    p.add_argument("repo", help="ORG/NAME on the Hub (optionally @REVISION)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_run)
