"""Where the trainer writes: its step log and its resume checkpoint, through an object handed to ``fit``.

The run layer hands :func:`~vlprompt.train.fit` its :class:`~vlprompt.run.RunDir` (which knows every file
of a run directory); a bare folder given as ``out_dir`` (library use, tests) gets :class:`FolderFiles`,
the same names.  These three names are declared here once; ``run/layout.py`` lists them with the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"
LOG_TABLE = "log.csv"


@runtime_checkable
class TrainerFiles(Protocol):
    """What the trainer writes: ``log_file`` (JSON lines), ``log_table`` (CSV), ``checkpoint_dir``."""

    @property
    def log_file(self) -> Path: ...

    @property
    def log_table(self) -> Path: ...

    @property
    def checkpoint_dir(self) -> Path: ...


class FolderFiles:
    """The trainer's files in a plain folder (the run directory's names)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder)

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    @property
    def log_table(self) -> Path:
        return self.path / LOG_TABLE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT


def trainer_files(out: str | os.PathLike | TrainerFiles | None) -> TrainerFiles | None:
    """``out`` as the trainer's files: an object the run layer handed in, or a bare folder."""
    if out is None or isinstance(out, TrainerFiles):
        return out
    return FolderFiles(out)
