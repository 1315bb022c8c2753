"""Where the trainer writes: its step log and its resume checkpoint, through an object handed to ``fit``.

The trainer knows no file name.  The run layer owns the run directory and hands :func:`~vlprompt.train.fit`
its :class:`~vlprompt.run.RunDir`, which implements :class:`TrainerFiles` with the names of
``run/layout.py``; ``fit(..., files=None)`` keeps no log and no checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class TrainerFiles(Protocol):
    """What the trainer writes: ``log_file`` (JSON lines), ``log_table`` (CSV), ``checkpoint_dir``."""

    @property
    def log_file(self) -> Path: ...

    @property
    def log_table(self) -> Path: ...

    @property
    def checkpoint_dir(self) -> Path: ...


def trainer_files(files: object) -> TrainerFiles | None:
    """``files`` checked: a :class:`TrainerFiles` or ``None`` (a bare folder is refused with the fix)."""
    if files is None or isinstance(files, TrainerFiles):
        return files
    raise TypeError(
        f"fit writes its log and checkpoint through a TrainerFiles object, not a {type(files).__name__}; "
        "pass vlprompt.run.RunDir(folder) (or None to keep neither)"
    )
