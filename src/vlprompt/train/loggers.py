"""Optional experiment loggers (TensorBoard, Weights & Biases) as ``fit(callbacks=...)`` callbacks.

The run's ``log.jsonl`` stays the record that reports are built from; these loggers only mirror each
epoch's summary (loss, accuracy, lr, images/s and, where evaluated, test accuracy / macro-F1) to the
tools people watch.  Neither package is a dependency: ``pip install 'vlprompt[logging]'`` (TensorBoard)
or ``pip install wandb``; asking for a logger whose package is missing is a one-line error.

    run = RunDir(out)
    fit(model, data, cfg, run, callbacks=make_loggers("tensorboard", run))
    vlprompt train ... --log-to tensorboard,wandb
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError

LOGGERS = ("tensorboard", "wandb")


def epoch_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one epoch summary under the names the loggers use (``train/loss`` ...)."""
    out: dict[str, float] = {}
    for key in ("loss", "acc", "lr", "images_per_s"):
        v = summary.get(key)
        if isinstance(v, (int, float)):
            out[f"train/{key}"] = float(v)
    for key, v in (summary.get("eval") or {}).items():
        if key in ("accuracy", "macro_f1") and isinstance(v, (int, float)):
            out[f"test/{key}"] = float(v)
    return out


class TensorBoardLogger:
    """Writes each epoch's scalars to a TensorBoard event file in ``log_dir`` (step = epoch)."""

    def __init__(self, log_dir: str | os.PathLike, writer: Any = None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise VlpromptError(
                    "TensorBoard logging needs the tensorboard package; pip install 'vlprompt[logging]' "
                    "(or pip install tensorboard)"
                ) from None
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer

    def __call__(self, summary: Mapping[str, Any]) -> None:
        step = int(summary.get("epoch", 0))
        for tag, value in epoch_scalars(summary).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Logs each epoch's scalars to a Weights & Biases run (``WANDB_PROJECT``, ``WANDB_MODE`` apply)."""

    def __init__(
        self, config: Mapping[str, Any] | None = None, run_dir: str | os.PathLike | None = None, **init
    ):
        try:
            import wandb
        except ImportError:
            raise VlpromptError("W&B logging needs the wandb package; pip install wandb") from None
        init.setdefault("project", os.environ.get("WANDB_PROJECT", "vlprompt"))
        if run_dir is not None:
            init.setdefault("dir", str(run_dir))
            init.setdefault("name", Path(run_dir).name)
        self.run = wandb.init(config=dict(config or {}), **init)

    def __call__(self, summary: Mapping[str, Any]) -> None:
        self.run.log({**epoch_scalars(summary), "epoch": int(summary.get("epoch", 0))})

    def close(self) -> None:
        self.run.finish()


def parse_loggers(text: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``, validated."""
    if not text:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [s.strip().lower() for s in items if s.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise VlpromptError(f"unknown logger {bad[0]!r}; use {', '.join(LOGGERS)} (comma-separated)")
    return names


def make_loggers(
    names: str | Sequence[str] | None, run: Any, config: Mapping[str, Any] | None = None
) -> list[Callable[[dict[str, Any]], None]]:
    """Callbacks for ``fit`` from logger names.  ``run``: the run directory (a ``vlprompt.run.RunDir``,
    which names its files): TensorBoard writes to ``run.tensorboard_dir``, W&B keeps its files in
    ``run.path``."""
    if not hasattr(run, "tensorboard_dir"):  # the run layer names the folders (run/layout.py)
        raise TypeError(
            f"make_loggers takes the run directory object, not a {type(run).__name__}; pass "
            "vlprompt.run.RunDir(folder)"
        )
    out: list[Callable[[dict[str, Any]], None]] = []
    for name in parse_loggers(names):
        if name == "tensorboard":
            out.append(TensorBoardLogger(run.tensorboard_dir))
        else:
            out.append(WandbLogger(config, run.path))
    return out
