"""Grids beyond one machine: ``vlprompt run --executor slurm`` through submitit (an optional dependency).

The grid is planned here exactly as for the local runner; complete runs are skipped before anything is
submitted, and every other run becomes one task of a submitit job array that calls the same
:func:`~vlprompt.protocols.runner.execute` the local runners use -- so fingerprints, skipping, resuming
and the added evaluations are decided by the same code whichever executor runs a run. The parent waits
for the array, then writes the one aggregated report (``cmd_run``).

``--executor local-submitit`` runs the same array through submitit's local executor (subprocesses on
this machine): what the tests exercise, and a way to try a cluster submission without a cluster.
Resources per job (GPUs, CPUs, memory, time limit, partition, array parallelism) come from flags; job
logs and submitit's pickles live in ``<runs dir>/.submitit/`` (written by this process, read by
submitit on the cluster -- never by vlprompt from a run directory).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError
from vlprompt.protocols.grid import RunSpec
from vlprompt.protocols.runner import RunResult, execute

log = logging.getLogger(__name__)

EXECUTORS = ("local", "local-submitit", "slurm")


@dataclass
class JobResources:
    """What each run's job asks the scheduler for."""

    gpus: int = 1
    cpus: int = 8
    mem_gb: float | None = None
    time_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 64
    extra: dict[str, Any] | None = None  # any other submitit parameter (e.g. slurm_account)

    def parameters(self, cluster: str) -> dict[str, Any]:
        p: dict[str, Any] = {
            "timeout_min": int(self.time_min),
            "cpus_per_task": int(self.cpus),
            "nodes": 1,
            "tasks_per_node": 1,
        }
        if self.gpus or cluster != "slurm":  # no GPU request at all on a CPU partition (no gres there)
            p["gpus_per_node"] = int(self.gpus)
        if self.mem_gb:
            p["mem_gb"] = float(self.mem_gb)
        if cluster == "slurm":
            p["slurm_array_parallelism"] = int(self.array_parallelism)
            if self.partition:
                p["slurm_partition"] = self.partition
            if self.account:
                p["slurm_account"] = self.account
            if self.qos:
                p["slurm_qos"] = self.qos
        p.update(self.extra or {})
        return p


def _submitit():
    try:
        import submitit
    except ImportError:
        raise VlpromptError(
            "--executor slurm/local-submitit needs submitit; install it with `pip install 'vlprompt[slurm]'`"
        ) from None
    return submitit


def job_failure_reason(exc: BaseException) -> str:
    """The one line that says why a job failed: the job's own exception line, not submitit's log paths."""

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    pat = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt|Exit)\b.*")
    hits = [ln for ln in lines if pat.match(ln)]
    return hits[-1] if hits else (lines[0] if lines else type(exc).__name__)


#: seconds a task may be out of the queue before its missing result counts as a failure (NFS latency)
GRACE_S_ENV = "VLPROMPT_SLURM_GRACE_S"


class _QueueWatch:
    """Which array tasks left the SLURM queue without writing a result.

    submitit learns that a task died without a result (``scancel``, time limit, out of memory, node
    failure) only through ``sacct``, which needs SLURM's accounting database; many small clusters (and
    the tests' one-node SLURM) have none, and then submitit would wait forever. ``squeue`` always
    works: a task that is no longer queued or running and has no result pickle after a grace period
    (``VLPROMPT_SLURM_GRACE_S``, default 60 s, for shared file systems that show files late) failed.
    """

    def __init__(self, jobs: Sequence[Any]):
        self.jobs = list(jobs)
        self.arrays = sorted({str(j.job_id).split("_")[0] for j in self.jobs})
        self.queued: set[str] | None = None
        self.gone_at: dict[str, float] = {}
        self.grace = float(os.environ.get(GRACE_S_ENV, "60"))

    def poll(self) -> None:
        try:
            out = subprocess.run(
                ["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(self.arrays)],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:  # the controller is busy: ask again later
            log.debug("squeue failed: %s", e)
            return
        self.queued = {ln.strip() for ln in out.splitlines() if ln.strip()}

    def lost(self, job: Any) -> str | None:
        """The one-line reason when ``job`` left the queue without a result, else ``None``."""
        jid = str(job.job_id)
        if self.queued is None or jid in self.queued or job.paths.result_pickle.exists():
            self.gone_at.pop(jid, None)
            return None
        first = self.gone_at.setdefault(jid, time.monotonic())
        if time.monotonic() - first < self.grace:
            return None
        return f"left the queue without a result ({_slurm_verdict(job)}); log: {job.paths.stderr}"


def _slurm_verdict(job: Any) -> str:
    """SLURM's own line about a task's end (``*** JOB 12 ... CANCELLED AT ... ***``, time limit, OOM)."""
    try:
        lines = job.paths.stderr.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    verdicts = [m.group(1).strip() for ln in lines if (m := re.search(r"\*\*\* (.*?) \*\*\*", ln))]
    jobs = [v for v in verdicts if v.startswith("JOB ")]  # the job's line, not its steps' echoes
    if jobs or verdicts:
        return (jobs or verdicts)[-1]
    if any("oom-kill" in ln or "Out Of Memory" in ln for ln in lines):
        return "out of memory"
    return "cancelled, timed out or killed"


def run_job(spec: RunSpec) -> RunResult:
    """One array task: the local runner's :func:`execute` (top-level, so submitit can pickle it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return execute(spec, progress=False, share_backbone=True)


def run_grid_submitit(
    specs: Sequence[RunSpec],
    executor: str = "slurm",
    folder: str | Path | None = None,
    resources: JobResources | None = None,
    job_fn: Callable[[RunSpec], RunResult] = run_job,
    poll_s: float = 2.0,
) -> list[RunResult]:
    """Run ``specs`` as one submitit job array; results in grid order (complete runs skipped, not sent)."""
    if executor not in ("slurm", "local-submitit"):
        raise VlpromptError(f"unknown executor '{executor}'; choose one of: {', '.join(EXECUTORS)}")
    submitit = _submitit()
    specs = list(specs)
    results: dict[int, RunResult] = {}
    todo = []
    for i, s in enumerate(specs):
        if s.is_complete():
            results[i] = RunResult(s.name, str(s.out_dir), "skipped")
        else:
            todo.append(i)
    if results:
        log.info("%d of %d runs already complete; skipping them", len(results), len(specs))
    if todo:
        cluster = "slurm" if executor == "slurm" else "local"
        folder = Path(folder) if folder is not None else Path(specs[todo[0]].out_dir).parents[3] / ".submitit"
        ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
        res = resources or JobResources(gpus=1 if cluster == "slurm" else 0)
        ex.update_parameters(name="vlprompt-grid", **res.parameters(cluster))
        jobs = ex.map_array(job_fn, [specs[i] for i in todo])
        log.info(
            "submitted %d runs as %s job array %s (logs: %s)",
            len(jobs),
            executor,
            jobs[0].job_id.split("_")[0],
            folder,
        )
        t0 = time.perf_counter()
        watch = _QueueWatch(jobs) if cluster == "slurm" else None
        pending = dict(zip(todo, jobs, strict=True))
        while pending:
            if watch is not None:
                watch.poll()
            for i, job in list(pending.items()):
                spec = specs[i]
                gone = watch.lost(job) if watch is not None else None
                finished = job.paths.result_pickle.exists() if watch is not None else job.done()
                if gone is None and not finished:  # slurm: the result file or squeue decide, not sacct
                    continue
                del pending[i]
                try:
                    if gone is not None:
                        raise RuntimeError(gone)
                    r = job.result()
                except Exception as exc:  # a job that failed or was killed fails its run, not the grid
                    reason = job_failure_reason(exc)
                    r = RunResult(
                        spec.name,
                        str(spec.out_dir),
                        "failed",
                        f"job {job.job_id}: {reason}"[:300],
                        time.perf_counter() - t0,
                    )
                results[i] = r
                level = logging.ERROR if r.status == "failed" else logging.INFO
                log.log(
                    level,
                    "[%d/%d] %s %s%s",
                    len(results),
                    len(specs),
                    r.status,
                    r.name,
                    f": {r.reason}" if r.reason else "",
                )
            if pending:
                time.sleep(poll_s)
    return [results[i] for i in range(len(specs))]
