"""The grid view of ``vlprompt run``: runs done / running / failed and an overall ETA, on one line.

One view for the sequential runner and for ``--jobs N``: the runners call :meth:`GridView.start`
when a run begins and :meth:`GridView.finish` with its result.  The ETA is the mean time of the runs
finished in this invocation (skipped complete runs do not count) times the runs left, divided by the
runs going at once.  Like every bar it shows only on a terminal and not with ``--no-progress``; the
log lines (``[k/N] done ...``) are printed above it unchanged.
"""

from __future__ import annotations

import time
from typing import Any

from vlprompt.train.progress import progress_bar


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class GridView:
    """Counts of a grid's runs and their ETA, shown as one progress bar (see module docstring)."""

    def __init__(self, total: int, enabled: bool = True, skipped: int = 0, redirect_logs: bool = True):
        self.total = total
        self.skipped = skipped
        self.done = 0
        self.failed = 0
        self.running: dict[Any, float] = {}
        self.times: list[float] = []
        self.bar = progress_bar(
            total, "runs", enabled, initial=skipped, unit="run", redirect_logs=redirect_logs
        )
        self._show()

    @property
    def disable(self) -> bool:
        return bool(getattr(self.bar, "disable", True))

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.done - self.failed

    def eta(self) -> float | None:
        """Seconds until every run is finished, from the mean time of the runs finished so far."""
        if self.left == 0:
            return 0.0
        if not self.times:
            return None
        mean = sum(self.times) / len(self.times)
        now = time.perf_counter()
        parallel = max(1, len(self.running))
        in_flight = sum(max(0.0, mean - (now - t)) for t in self.running.values())
        queued = max(0, self.left - len(self.running))
        return (in_flight + queued * mean) / parallel

    def start(self, key: Any) -> None:
        self.running[key] = time.perf_counter()
        self._show()

    def finish(self, key: Any, result: Any) -> None:
        started = self.running.pop(key, None)
        status = getattr(result, "status", "done")
        if status == "skipped":
            self.skipped += 1
        elif status == "failed":
            self.failed += 1
        else:
            self.done += 1
            seconds = getattr(result, "seconds", 0.0) or (
                time.perf_counter() - started if started is not None else 0.0
            )
            self.times.append(float(seconds))
        self.bar.update(1)
        self._show()

    def summary(self) -> str:
        return (
            f"{self.done} done, {len(self.running)} running, {self.failed} failed, "
            f"{self.skipped} skipped, {max(0, self.left - len(self.running))} queued"
        )

    def _show(self) -> None:
        self.bar.set_postfix_str(f"{self.summary()}, eta {format_eta(self.eta())}", refresh=True)

    def close(self) -> None:
        self.bar.close()
