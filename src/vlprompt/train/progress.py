"""Training logs: ``log.jsonl`` + ``log.csv`` (one record per step or every N steps, and per epoch).

On resume the records of epochs that were not checkpointed are dropped, so the logs of a resumed run
read like those of an uninterrupted one.  Progress bars go to stderr through tqdm, only on a terminal
(and not with ``--no-progress`` / ``VLPROMPT_PROGRESS=0``): one bar per training run (epochs x steps,
ETA, loss, lr) and one per evaluation (images).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vlprompt.train.files import TrainerFiles
from vlprompt.utils import atomic_write_text, read_jsonl

FIELDS = ("kind", "epoch", "step", "loss", "acc", "lr", "images_per_s", "time")


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else round(v, 8)
    return v


class RunLog:
    """Appends records to the log files of ``files`` (JSON lines and CSV; ``None``: keep nothing)."""

    def __init__(self, files: TrainerFiles | None, keep_epochs: int = 0):
        self.dir = files.log_file.parent if files is not None else None
        if files is None:
            return
        self.jsonl, self.csv = files.log_file, files.log_table
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if keep_epochs > 0 and self.jsonl.is_file():
            for rec in read_jsonl(self.jsonl):  # a line cut by a kill is skipped
                if isinstance(rec, dict) and int(rec.get("epoch", 0)) <= keep_epochs:
                    kept.append(rec)
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(kept)
        atomic_write_text(self.csv, buf.getvalue())

    def write(self, record: dict[str, Any]) -> None:
        if self.dir is None:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        with open(self.csv, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n").writerow(rec)


_ENABLED = True


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (``--no-progress``)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def progress_enabled(requested: bool = True) -> bool:
    """Bars show only when asked for, not switched off (``VLPROMPT_PROGRESS=0``), on a terminal."""
    env = os.environ.get("VLPROMPT_PROGRESS", "1").strip().lower()
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return bool(requested) and _ENABLED and env not in ("0", "false", "off", "no") and tty


def _bar_class():
    class LoggingBar(tqdm):
        """A tqdm bar that, while open, prints log lines above itself instead of through it."""

        def __init__(self, *args: Any, redirect_logs: bool = False, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._redirect = None
            if redirect_logs and not self.disable:
                self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()], tqdm_class=type(self))
                self._redirect.__enter__()

        def close(self) -> None:
            redirect, self._redirect = getattr(self, "_redirect", None), None
            if redirect is not None:
                redirect.__exit__(None, None, None)
            super().close()

    return LoggingBar


def progress_bar(
    total: int,
    desc: str,
    enabled: bool,
    *,
    initial: int = 0,
    unit: str = "it",
    redirect_logs: bool = False,
):
    """A tqdm bar on stderr, disabled unless :func:`progress_enabled` (a terminal, not switched off).

    ``redirect_logs``: while the bar is open, log lines print above it (their text is unchanged).
    """
    return _bar_class()(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not progress_enabled(enabled),
        leave=False,
        dynamic_ncols=True,
        redirect_logs=redirect_logs,
    )
