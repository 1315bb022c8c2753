"""Arguments shared by several commands, spelled one way everywhere (other spellings are aliases)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from vlprompt.errors import VlpromptError

DEFAULT_MODEL = "ViT-B-16"

#: environment variables vlprompt reads (listed in `vlprompt --help` and the README)
ENVIRONMENT = {
    "VLPROMPT_DATA": "default --root: the folder holding the data set folders (CoOp's $DATA)",
    "VLPROMPT_HOME": "cache folder (demo data, few-shot picks, feature caches); default ~/.cache/vlprompt",
    "VLPROMPT_RECORD_HOSTNAME": "1 = record the hostname in a run's env.json (off: runs are shareable)",
    "VLPROMPT_DIST_TIMEOUT": "seconds DDP collectives wait (default 4 h)",
    "HF_HUB_OFFLINE": "1 = never reach the network for pretrained tags (use the cache or --weights)",
}


class LazyChoices:
    """``choices`` for argparse, loaded on first use (give the argument a ``metavar``: argparse lists
    choices while building the parser), so ``vlprompt --help`` does not import torch."""

    def __init__(self, load: Callable[[], Iterable[str]]):
        self._load = load
        self._items: tuple[str, ...] | None = None

    def _get(self) -> tuple[str, ...]:
        if self._items is None:
            self._items = tuple(self._load())
        return self._items

    def __contains__(self, item: object) -> bool:
        return item in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())


def output_file(*suffixes: str) -> Callable[[str], Path]:
    """An argparse ``type`` for a file the command writes, checked before any work: not a folder, one
    of ``suffixes`` (the first is added to a name without one, so the name printed is the file written)."""

    def check(value: str) -> Path:
        path = Path(value)
        if not path.suffix and not path.is_dir():
            path = path.with_suffix(suffixes[0])
        if path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{path} is a folder; give a file name such as {path / ('out' + suffixes[0])}"
            )
        if path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"cannot write '{path.suffix}' files here; use {', '.join(suffixes)}"
            )
        return path

    return check


def output_dir(value: str) -> str:
    """An argparse ``type`` for a folder the command writes into: an existing file is refused at once
    (it ended in "File exists" from deep inside the command)."""
    if Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value} is a file; give a folder (new, or one of vlprompt's)")
    return value


def positive_int(value: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= 1")
    return n


def environment_epilog() -> str:
    width = max(map(len, ENVIRONMENT))
    lines = [f"  {k.ljust(width)}  {v}" for k, v in ENVIRONMENT.items()]
    return "environment variables:\n" + "\n".join(lines)


def add_backbone_args(p: argparse.ArgumentParser, default_model: str | None = DEFAULT_MODEL) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"open_clip architecture (default {default_model}; inferred from --weights when omitted)",
    )
    p.set_defaults(default_model=default_model)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", help="open_clip pretrained tag (needs the weights cached or a network)")
    g.add_argument("--weights", help="local CLIP weights file (OpenAI .pt, open_clip .bin/.pt, .safetensors)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")


def model_name(args: argparse.Namespace) -> str | None:
    """--model, or the default architecture unless a weights file will tell."""
    if args.model:
        return args.model
    return None if getattr(args, "weights", None) else getattr(args, "default_model", DEFAULT_MODEL)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "--config-file",
        dest="config",
        metavar="FILE.yaml",
        help="YAML with any of the sections train/options/data/backbone, applied over the preset "
        "(`vlprompt config show` lists every key); an official (Dassl) trainer YAML is mapped key by key",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action=SetItems,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override keys, e.g. --set train.lr=0.01 options.depth=3 (repeatable; after --config)",
    )


class JoinList(argparse.Action):
    """``--seeds 1 2 3`` and ``--seeds 1,2,3`` alike: the values joined by commas."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        items = [v for value in values for v in str(value).split(",") if v.strip()]
        setattr(namespace, self.dest, ",".join(items))


class SetItems(argparse.Action):
    """``--set a=1 b=2``; a ``KEY VALUE`` pair gets a one-line hint of the ``KEY=VALUE`` form."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        bare = [i for i, v in enumerate(values) if "=" not in v]
        if bare:
            i = bare[0]
            value = values[i + 1] if i + 1 < len(values) else "VALUE"
            namespace.set_error = (
                f"--set takes KEY=VALUE, not '{values[i]}' alone; write --set {values[i]}={value}"
            )
            return  # reported by apply_dassl_habits as a one-line error (exit status 2)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


def apply_dassl_habits(args: argparse.Namespace) -> None:
    """Official-repository habits: ``--trainer MaPLe`` and an official trainer YAML via ``--config``.

    The method name is matched case-insensitively against the official trainers' names; a Dassl
    trainer YAML becomes ``--set`` items in front of the user's own (which therefore win).
    """
    import logging

    from vlprompt.train.dassl_config import read_dassl_file, trainer_to_method

    if getattr(args, "set_error", None):
        raise VlpromptError(args.set_error)

    method = getattr(args, "method", None)
    if method:
        args.method = ",".join(trainer_to_method(m) for m in str(method).split(",") if m.strip())
    cfg = getattr(args, "config", None)
    if cfg and hasattr(args, "overrides"):
        single = args.method if args.method and "," not in args.method else None
        mapped = read_dassl_file(cfg, single)
        if mapped is not None:
            items = mapped.overrides
            if getattr(args, "model", None) or getattr(args, "weights", None):  # the flag wins
                items = [o for o in items if not o.startswith("backbone.name=")]
            args.overrides = [*items, *(args.overrides or [])]
            args.config = None
            if not args.method and mapped.method:
                args.method = mapped.method
            log = logging.getLogger("vlprompt")
            log.info("%s (Dassl) -> --set %s", cfg, " ".join(mapped.overrides))
            for note in mapped.notes:
                log.info("  %s", note)
    if getattr(args, "method_required", False) and not args.method:
        raise VlpromptError("the following arguments are required: --method (or --trainer)")


def add_data_args(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    if many:
        p.add_argument(
            "--datasets",
            "--dataset",
            dest="datasets",
            action=JoinList,
            nargs="+",
            help="data sets, comma- or space-separated (see `vlprompt data list`)",
        )
    else:
        p.add_argument(
            "--dataset",
            "--datasets",
            dest="dataset",
            required=True,
            help="data set name (see `vlprompt data list`), folder:PATH or csv:PATH",
        )
    p.add_argument(
        "--root", help="folder holding the data set folders (CoOp's $DATA; default $VLPROMPT_DATA)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop unreadable, corrupt or oversized images (logged with a count) instead of failing",
    )
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default 0)")
    p.add_argument(
        "--descriptions",
        metavar="FILE",
        help="class descriptions for methods that read them (CoPrompt): JSON {class: [sentences]} or CSV "
        "class,sentence; its sha256 enters the run identity",
    )


def data_overrides(args: argparse.Namespace) -> list[str]:
    out = list(getattr(args, "overrides", None) or []) + (["data.skip_bad=true"] if args.skip_bad else [])
    if getattr(args, "descriptions", None):  # absolute: grid runs may start elsewhere (SLURM)
        out.append("data.descriptions=" + json.dumps(str(Path(args.descriptions).expanduser().resolve())))
    return out
