"""Run a protocol grid's independent runs concurrently: ``vlprompt run ... --jobs N [--devices 0,0,1,1]``.

Each job is a long-lived worker process (``spawn`` context, so CUDA is safe) bound to one device slot
(``CUDA_VISIBLE_DEVICES`` set before torch starts; several slots may name the same GPU) and to
``cpu_count // jobs`` threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` + ``torch.set_num_threads``), so
jobs never oversubscribe the cores. Workers pull one :class:`~vlprompt.protocols.grid.RunSpec` at a time
and execute it with the protocols runner's :func:`~vlprompt.protocols.runner.execute` (train with
resume, add missing evaluations), keeping one backbone resident per worker.

The parent shows one tqdm bar over the grid and one log line per run (start, done, failed); workers'
log records are forwarded to the parent's logging, prefixed with the run's name. Complete runs are
skipped without starting anything; half-finished runs resume from their checkpoints. A failing run --
an exception, or a worker process that dies (then a fresh worker takes its slot) -- is reported and the
others go on. :func:`run_grid_parallel` returns every result in grid order; :func:`report_grid` builds
the one aggregated report.

Workers never outlive the parent: each asks the kernel for SIGKILL when the parent dies (Linux
``PR_SET_PDEATHSIG``) and also watches its parent pid (every other OS), so a ``kill -9`` of
``vlprompt run`` stops the grid instead of leaving workers blocked on their task queues; an
interrupted run resumes from its checkpoint next time. ``--jobs-per-device K`` puts K jobs on every
device slot (threads split over all jobs, each CUDA job limited to 1/K of its GPU's memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from vlprompt.errors import VlpromptError
from vlprompt.protocols.grid import RunSpec
from vlprompt.protocols.gridview import GridView
from vlprompt.protocols.report import build_report
from vlprompt.protocols.runner import RunResult, execute

log = logging.getLogger(__name__)

_POLL_S = 0.5


def cpu_count() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_devices(text: str | None) -> list[str] | None:
    """``"0,0,1,1"`` -> ``["0", "0", "1", "1"]`` (one slot per job; ``cpu`` allowed); ``None`` when unset."""
    if text is None or not str(text).strip():
        return None
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if item.startswith("cuda:"):
            item = item[5:]
        if item != "cpu" and not item.isdigit():
            raise VlpromptError(
                f"bad device '{item}' in --devices {text}; give GPU indices such as 0,0,1,1 (or cpu)"
            )
        out.append(item)
    return out


def check_visible(devices: Sequence[str] | None, gpus: int | None = None) -> None:
    """Refuse a ``--devices`` GPU this process may not use: its worker (``CUDA_VISIBLE_DEVICES`` set to
    the entry) would see no GPU and train on the CPU without a word.  The entries are the indices
    ``CUDA_VISIBLE_DEVICES`` takes: those this process was given when it has one (a scheduler's
    allocation, e.g. 2,3), else 0 .. the number of GPUs - 1."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None and gpus is None:
        allowed = [d.strip() for d in given.split(",") if d.strip()]
        if any(not d.isdigit() for d in allowed):  # GPU UUIDs / MIG names: not comparable to indices
            return
    else:
        if gpus is None:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        allowed = [str(i) for i in range(gpus)]
    missing = sorted({d for d in devices or () if d != "cpu" and d not in allowed}, key=int)
    if missing:
        have = f"GPU {', '.join(allowed)}" if allowed else "no visible GPU"
        fix = "give those (or cpu)" if allowed else "use --devices cpu or leave --devices out"
        raise VlpromptError(f"--devices names GPU {', '.join(missing)}, but this process has {have}; {fix}")


def device_slots(jobs: int | None, devices: Sequence[str] | None) -> list[str | None]:
    """One slot per job: the ``--devices`` entries, or ``None`` (inherit the environment) ``jobs`` times."""
    if devices:
        if jobs is not None and jobs != len(devices):
            raise VlpromptError(
                f"--jobs {jobs} but --devices names {len(devices)} slots; give one --devices entry per job "
                "(repeat a GPU index to share it, e.g. 0,0,1,1) or omit --jobs"
            )
        return list(devices)
    jobs = 1 if jobs is None else int(jobs)
    if jobs < 1:
        raise VlpromptError(f"--jobs must be >= 1, got {jobs}")
    return [None] * jobs


def per_device_slots(
    per_device: int, devices: Sequence[str] | None, gpus: int | None = None
) -> list[str | None]:
    """``--jobs-per-device K``: every device slot (the ``--devices`` entries, else every visible GPU,
    else the CPU) repeated K times, e.g. K=2 over GPUs 0,1 -> ``["0", "0", "1", "1"]``."""
    if int(per_device) < 1:
        raise VlpromptError(f"--jobs-per-device must be >= 1, got {per_device}")
    if devices:
        base: list[str | None] = list(dict.fromkeys(devices))
    else:
        if gpus is None:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        base = [str(i) for i in range(gpus)] if gpus else [None]
    return [d for d in base for _ in range(int(per_device))]


def threads_per_job(jobs: int) -> int:
    return max(1, cpu_count() // max(1, jobs))


def memory_fraction(slots: Sequence[str | None], slot: str | None) -> float:
    """Share of its GPU a job may allocate: 1 / (number of jobs on the same GPU)."""
    if slot is None or slot == "cpu":
        return 1.0
    return 1.0 / max(1, sum(s == slot for s in slots))


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when ``parent`` dies (SIGKILL from the kernel on Linux, a watcher elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:  # re-parented: the parent is gone
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="vlprompt-parent-watch", daemon=True).start()


def _worker_env(slot: str | None, threads: int) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = "" if slot == "cpu" else slot
    return env


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """Temporarily set variables so a spawned child starts with them (before it imports torch)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ForwardHandler(logging.Handler):
    """Worker side: sends formatted log records to the parent through the results queue."""

    def __init__(self, results: Any, wid: int):
        super().__init__()
        self.results, self.wid = results, wid
        self.run = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info and record.levelno >= logging.ERROR:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self.results.put(
                ("log", self.wid, record.name, record.levelno, f"[{self.run}] {msg}" if self.run else msg)
            )
        except Exception:  # never let logging break a run
            self.handleError(record)


def _worker_main(
    wid: int,
    threads: int,
    levels: dict[str, int],
    tasks: Any,
    results: Any,
    execute_fn: Callable[..., RunResult],
    parent: int | None = None,
    mem_fraction: float = 1.0,
) -> None:
    """Worker loop: execute specs until a ``None`` task arrives (a top-level function: spawn pickles it)."""
    if parent is not None:
        _die_with_parent(parent)

    torch.set_num_threads(threads)
    if mem_fraction < 1.0 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(mem_fraction)
    handler = _ForwardHandler(results, wid)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    for name, level in levels.items():  # the parent's levels (root and vlprompt), so the same lines pass
        logging.getLogger(name).setLevel(level)
    while True:
        task = tasks.get()
        if task is None:
            return
        i, spec = task
        handler.run = spec.name
        try:
            res = execute_fn(spec, progress=False, share_backbone=True)
        except BaseException as exc:  # execute catches Exception; this is KeyboardInterrupt & co.
            res = RunResult(
                spec.name, str(spec.out_dir), "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
            )
        handler.run = ""
        results.put(("result", wid, i, res))


@dataclass
class _Worker:
    wid: int
    slot: str | None
    proc: Any
    tasks: Any
    task: int | None = None  # index of the spec it is executing
    started: float = 0.0


def _log_result(res: RunResult, done: int, total: int) -> None:
    if res.status == "failed":
        log.error("[%d/%d] FAILED %s (%s): %s", done, total, res.name, res.out_dir, res.reason)
    elif res.status == "skipped":
        log.info("[%d/%d] skip %s (complete)", done, total, res.name)
    else:
        log.info("[%d/%d] done %s in %.1fs", done, total, res.name, res.seconds)


def run_grid_parallel(
    specs: Sequence[RunSpec],
    jobs: int | None = None,
    devices: Sequence[str] | None = None,
    progress: bool = True,
    execute_fn: Callable[..., RunResult] = execute,
    jobs_per_device: int | None = None,
) -> list[RunResult]:
    """Execute ``specs`` with ``jobs`` concurrent workers (one per device slot); results in grid order.

    ``jobs_per_device=K`` runs K workers on every device (see :func:`per_device_slots`).
    ``jobs=1`` without devices runs in this process (no worker start-up cost), with the same progress
    view and logging. Complete runs are skipped up front. ``execute_fn`` (a top-level function, as
    workers import it by name) replaces :func:`~vlprompt.protocols.runner.execute` in tests.
    """

    specs = list(specs)
    if jobs_per_device is not None:
        slots = per_device_slots(jobs_per_device, devices)
        if jobs is not None and jobs != len(slots):
            raise VlpromptError(
                f"--jobs {jobs} but --jobs-per-device {jobs_per_device} gives {len(slots)} jobs; omit --jobs"
            )
    else:
        slots = device_slots(jobs, devices)
    total = len(specs)
    results: dict[int, RunResult] = {}
    todo: list[int] = []
    for i, spec in enumerate(specs):
        if spec.is_complete():
            results[i] = RunResult(spec.name, str(spec.out_dir), "skipped")
        else:
            todo.append(i)
    bar = GridView(total, progress, skipped=len(results), redirect_logs=False)  # done/running/failed, ETA
    if results:
        log.info("%d of %d runs already complete; skipping them", len(results), total)

    def finish(i: int, res: RunResult) -> None:
        results[i] = res
        bar.finish(i, res)
        _log_result(res, len(results), total)

    with _redirect_logging(bar):
        if not todo:
            pass
        elif len(slots) == 1 and slots[0] is None:
            for i in todo:
                log.info("start %s", specs[i].name)
                bar.start(i)
                finish(i, execute_fn(specs[i], progress=False, share_backbone=True))
        else:
            _run_workers(specs, todo, slots, finish, execute_fn, on_start=bar.start)
    bar.close()
    return [results[i] for i in range(total)]


@contextlib.contextmanager
def _redirect_logging(bar: Any) -> Iterator[None]:
    """Log lines print above the progress bar instead of through it."""
    if getattr(bar, "disable", True):
        yield
        return

    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        yield


def _run_workers(
    specs: Sequence[RunSpec],
    todo: list[int],
    slots: Sequence[str | None],
    finish: Callable[[int, RunResult], None],
    execute_fn: Callable[..., RunResult],
    on_start: Callable[[int], None] = lambda i: None,
) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = threads_per_job(len(slots))
    levels = {name: logging.getLogger(name).getEffectiveLevel() for name in ("", "vlprompt")}
    pending = list(todo)
    workers: dict[int, _Worker] = {}
    next_wid = 0
    log.info(
        "running %d runs with %d jobs (%d threads each%s)",
        len(todo),
        len(slots),
        threads,
        "; devices " + ",".join(str(s) for s in slots) if any(s is not None for s in slots) else "",
    )

    def start(slot: str | None) -> _Worker:
        nonlocal next_wid
        wid, next_wid = next_wid, next_wid + 1
        tasks = ctx.Queue()
        with _environ(_worker_env(slot, threads)):
            proc = ctx.Process(
                target=_worker_main,
                args=(
                    wid,
                    threads,
                    levels,
                    tasks,
                    results,
                    execute_fn,
                    os.getpid(),
                    memory_fraction(slots, slot),
                ),
                name=f"vlprompt-job{wid}",
                daemon=True,
            )
            proc.start()
        w = _Worker(wid, slot, proc, tasks)
        workers[wid] = w
        return w

    def dispatch(w: _Worker) -> None:
        while pending:
            i = pending.pop(0)
            try:  # what the queue's feeder thread does; a failure there is silent and the grid waits forever
                ForkingPickler.dumps((i, specs[i]))
            except Exception as e:  # noqa: BLE001 -- any pickling error fails this run, not the grid
                reason = (
                    f"cannot hand the run to a worker process ({type(e).__name__}: {e}); run it with --jobs 1"
                )
                finish(i, RunResult(specs[i].name, str(specs[i].out_dir), "failed", reason, 0.0))
                continue
            w.task = i
            w.started = time.perf_counter()
            on_start(w.task)
            log.info("start %s (job %d%s)", specs[w.task].name, w.wid, f", device {w.slot}" if w.slot else "")
            w.tasks.put((w.task, specs[w.task]))
            return
        w.task = None
        w.tasks.put(None)

    try:
        for slot in slots[: len(pending)]:
            dispatch(start(slot))
        while any(w.task is not None for w in workers.values()):
            try:
                msg = results.get(timeout=_POLL_S)
            except queue.Empty:
                msg = None
            if msg is not None and msg[0] == "log":
                _, _, name, levelno, text = msg
                logging.getLogger(name).log(levelno, text)
                continue
            if msg is not None and msg[0] == "result":
                _, wid, i, res = msg
                w = workers.get(wid)
                if w is not None and w.task == i:
                    finish(i, res)
                    dispatch(w)
                continue
            for w in list(workers.values()):  # a worker that died mid-run fails that run, not the grid
                if w.task is not None and not w.proc.is_alive():
                    i = w.task
                    spec = specs[i]
                    w.task = None
                    del workers[w.wid]
                    reason = f"worker process died (exit code {w.proc.exitcode})"
                    finish(
                        i,
                        RunResult(
                            spec.name, str(spec.out_dir), "failed", reason, time.perf_counter() - w.started
                        ),
                    )
                    if pending:
                        dispatch(start(w.slot))
    finally:
        for w in workers.values():
            if w.proc.is_alive() and w.task is not None:
                w.proc.terminate()
        for w in workers.values():
            w.proc.join(timeout=30)
            if w.proc.is_alive():
                w.proc.kill()


def report_grid(runs_dir: str | Path, reference: bool = False) -> Path | None:
    """The aggregated report of ``runs_dir`` (report.md, CSVs, plots); ``None`` if no run is complete."""

    try:
        res = build_report(runs_dir, reference=reference)
    except VlpromptError as e:
        log.warning("no report: %s", e)
        return None
    return res.markdown
