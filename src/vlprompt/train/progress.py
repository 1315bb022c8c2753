"""Training logs: ``log.jsonl`` + ``log.csv`` (one record per step or every N steps, and per epoch).

On resume the records of epochs that were not checkpointed are dropped, so the logs of a resumed run
read like those of an uninterrupted one.  Progress bars go to stderr through tqdm, only on a terminal.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from vlprompt.utils import atomic_write_text

FIELDS = ("kind", "epoch", "step", "loss", "acc", "lr", "images_per_s", "time")


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else round(v, 8)
    return v


class RunLog:
    """Appends records to ``log.jsonl`` and ``log.csv`` in ``out_dir`` (``None``: keep nothing)."""

    def __init__(self, out_dir: str | os.PathLike | None, keep_epochs: int = 0):
        self.dir = Path(out_dir) if out_dir is not None else None
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "log.jsonl"
        self.csv = self.dir / "log.csv"
        kept: list[dict[str, Any]] = []
        if keep_epochs > 0 and self.jsonl.is_file():
            for line in self.jsonl.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if int(rec.get("epoch", 0)) <= keep_epochs:
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


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, disabled when ``enabled`` is false or stderr is not a terminal."""
    from tqdm.auto import tqdm

    disable = not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False, dynamic_ncols=True)
