"""`vlprompt` command line: argument parsing and one-line errors.

Each sub-command lives in its own module under ``vlprompt.cli`` and exposes
``register(subparsers)``; this file only wires them together and turns
:class:`~vlprompt.errors.VlpromptError` (and other expected failures) into one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from vlprompt.errors import VlpromptError

# sub-command modules, in the order --help lists them
COMMANDS = [
    "demo",
    "train",
    "eval",
    "run",
    "report",
    "predict",
    "export",
    "push",
    "import",
    "config",
    "data",
    "world",
    "bench",
    "methods",
    "models",
    "inspect",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        if message.startswith("unrecognized arguments: "):  # Dassl's trailing KEY VALUE pairs
            from vlprompt.train.dassl_config import dassl_pairs_hint

            hint = dassl_pairs_hint(message.split(": ", 1)[1].split())
            if hint:
                message = hint
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from vlprompt.cli.common import environment_epilog
    from vlprompt.version import __version__

    parser = _Parser(
        prog="vlprompt",
        description="Prompt learning for CLIP-style models: MPL, DPL (reconstructed from the paper's "
        "abstract) and baselines on one prompted-transformer engine.",
        epilog=environment_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"vlprompt.cli.cmd_{name}")
        except ModuleNotFoundError as e:  # a command not built yet must not break the others
            if e.name == f"vlprompt.cli.cmd_{name}":
                continue
            raise
        mod.register(sub)
    return parser


class _QuietOpenClip(logging.Filter):
    """open_clip announces random init on the root logger; vlprompt prints its own banner instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be redirected after set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_QuietOpenClip())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)  # third-party chatter stays quiet
    logging.getLogger("vlprompt").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "model", None):  # ViT-B/16 (OpenAI, papers) -> ViT-B-16 (open_clip)
        from vlprompt.backbones.names import canonical_model_name

        args.model = canonical_model_name(args.model)
    try:
        from vlprompt.cli.common import apply_dassl_habits

        apply_dassl_habits(args)
    except VlpromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except VlpromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable --out, a path that vanished, a full disk: the user's to fix
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted (checkpoints are written atomically; use --resume to continue)",
            file=sys.stderr,
        )
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
