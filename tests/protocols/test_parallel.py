"""Parallel grid runner: concurrency, device slots and threads per job, skip/resume, failure isolation
(an exception and a dying worker), and a real `vlprompt run --jobs 2` that matches `--jobs 1`."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from vlprompt.errors import VlpromptError
from vlprompt.protocols import parallel as P
from vlprompt.protocols.grid import Evaluation, RunSpec
from vlprompt.protocols.runner import RunResult


def fake_execute(spec: RunSpec, progress: bool = True, share_backbone: bool = False) -> RunResult:
    """Stands in for runner.execute inside the workers: records where and how it ran."""
    import logging

    import torch

    t0 = time.time()
    logging.getLogger("fake").info("working on seed %d", spec.seed)
    if spec.seed == 4:
        os._exit(3)  # the worker process dies mid-run
    time.sleep(0.8)
    info = {
        "pid": os.getpid(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(),
        "start": t0,
        "end": time.time(),
    }
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    (spec.out_dir / "info.json").write_text(json.dumps(info))
    if spec.seed == 3:
        return RunResult(spec.name, str(spec.out_dir), "failed", "ValueError: boom", 0.1)
    entry = {"dataset": spec.dataset, "subsample": "all", "split": "test", "accuracy": 50.0}
    (spec.out_dir / "metrics.json").write_text(json.dumps({"evaluations": [entry]}))
    (spec.out_dir / "done").write_text("ok\n")
    return RunResult(spec.name, str(spec.out_dir), "done", "", time.time() - t0, True, 1)


def _specs(root: Path, seeds) -> list[RunSpec]:
    return [
        RunSpec("fewshot", "coop", "demo", 2, s, root / f"seed{s}", {}, [Evaluation("demo", "all")])
        for s in seeds
    ]


def test_devices_are_checked_against_the_allocation_this_process_was_given(monkeypatch):
    """Under a scheduler's CUDA_VISIBLE_DEVICES=2,3 the workers' entries are 2 and 3 (each worker's
    CUDA_VISIBLE_DEVICES is its entry): 2,3 pass, 0,1 (outside the allocation) are refused."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    P.check_visible(["2", "3", "3"])
    with pytest.raises(VlpromptError, match="names GPU 0, 1, but this process has GPU 2, 3"):
        P.check_visible(["0", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1f")  # UUIDs: not comparable, left to the worker
    P.check_visible(["0"])


def test_devices_and_slots():
    assert P.parse_devices("0,0,cuda:1, 1") == ["0", "0", "1", "1"]
    assert P.parse_devices(None) is None
    with pytest.raises(VlpromptError, match="bad device"):
        P.parse_devices("0,gpu1")
    assert P.device_slots(None, ["0", "0", "1"]) == ["0", "0", "1"]
    assert P.device_slots(3, None) == [None, None, None]
    with pytest.raises(VlpromptError, match="one --devices entry per job"):
        P.device_slots(2, ["0", "1", "2"])
    with pytest.raises(VlpromptError, match="--jobs"):
        P.device_slots(0, None)
    assert P.threads_per_job(P.cpu_count() * 4) == 1
    assert P.threads_per_job(1) == P.cpu_count()
    assert P._worker_env("cpu", 2)["CUDA_VISIBLE_DEVICES"] == ""
    P.check_visible(["0", "1", "cpu"], gpus=2)
    with pytest.raises(VlpromptError, match="names GPU 7, but this process has GPU 0, 1; give those"):
        P.check_visible(["0", "7"], gpus=2)
    with pytest.raises(VlpromptError, match="has no visible GPU; use --devices cpu or leave --devices out"):
        P.check_visible(["0"], gpus=0)


def test_parallel_workers_isolate_failures_and_resume(tmp_path, caplog):
    caplog.set_level("INFO")
    specs = _specs(tmp_path, [1, 2, 3, 4, 5, 6])
    res = P.run_grid_parallel(specs, devices=["3", "5"], progress=False, execute_fn=fake_execute)
    assert [r.status for r in res] == ["done", "done", "failed", "failed", "done", "done"]
    assert res[2].reason == "ValueError: boom"
    assert "worker process died (exit code 3)" in res[3].reason
    infos = {s: json.loads((tmp_path / f"seed{s}" / "info.json").read_text()) for s in (1, 2, 3, 5, 6)}
    threads = str(P.threads_per_job(2))
    assert {i["omp"] for i in infos.values()} == {threads}
    assert {i["threads"] for i in infos.values()} == {int(threads)}
    assert {i["cuda"] for i in infos.values()} <= {"3", "5"}
    # one slot per worker: a process never changes device; after the crash a fresh worker took the slot
    by_pid: dict[int, set] = {}
    for i in infos.values():
        by_pid.setdefault(i["pid"], set()).add(i["cuda"])
    assert all(len(v) == 1 for v in by_pid.values()) and len(by_pid) >= 2
    # runs 1 and 2 went to the two jobs at once: their time windows overlap
    a, b = infos[1], infos[2]
    assert a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
    # the workers' log records reach the parent's logging, prefixed with the run's name
    assert "[fewshot/coop/demo/shots2_seed1] working on seed 1" in caplog.text
    assert "FAILED fewshot/coop/demo/shots2_seed3" in caplog.text

    # second invocation, one job (in this process): complete runs are skipped, the failed one runs again
    again = P.run_grid_parallel(specs[:3], jobs=1, progress=False, execute_fn=fake_execute)
    assert [r.status for r in again] == ["skipped", "skipped", "failed"]
    assert json.loads((tmp_path / "seed1" / "info.json").read_text()) == infos[1]  # untouched
    assert json.loads((tmp_path / "seed3" / "info.json").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_run_jobs_2_gives_the_report_of_jobs_1(tmp_path, capsys):
    """Real training: `vlprompt run --jobs 2` (two worker processes) writes the same report as `--jobs 1`."""
    from fakeruns import demo_grid_argv

    from vlprompt.cli.main import main

    def run(out: Path, jobs: str) -> str:
        argv = demo_grid_argv(out, "1,2", "--jobs", jobs)
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert "2 runs: 2 done, 0 skipped (complete), 0 failed" in printed
        assert f"report: {out / 'report' / 'report.md'}" in printed
        return (out / "report" / "report.md").read_text().replace(str(out), "RUNS")

    parallel = run(tmp_path / "j2", "2")
    sequential = run(tmp_path / "j1", "1")
    row = next(line for line in parallel.splitlines() if line.startswith("| Demo"))
    assert row.endswith("| 2 |")  # both seeds' runs are in the table
    assert parallel == sequential
    for name in ("base2new_coop.csv", "base2new_comparison.csv"):
        assert (tmp_path / "j2" / "report" / name).read_text() == (
            tmp_path / "j1" / "report" / name
        ).read_text()
    # a second invocation finds everything complete and starts no worker; --no-report writes no report
    shutil.rmtree(tmp_path / "j2" / "report")
    assert main(["run", "--protocol", "base2new", "--method", "coop", "--datasets", "demo", "--seeds", "1,2",
                 "--shots", "2", "--model", "vlp-tiny", "--epochs", "1", "--set", "train.batch_size=8",
                 "--out", str(tmp_path / "j2"), "--jobs", "2", "--no-progress",
                 "--no-report"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "2 runs: 0 done, 2 skipped (complete), 0 failed" in printed
    assert "report:" not in printed and not (tmp_path / "j2" / "report").exists()


def test_a_run_that_cannot_reach_a_worker_fails_alone_instead_of_hanging(tmp_path):
    """A spec the queue cannot pickle used to die in the queue's feeder thread: the grid waited forever."""
    specs = _specs(tmp_path, [1, 2])
    specs[0].cfg = {"unpicklable": lambda: None}
    t0 = time.time()
    res = P.run_grid_parallel(specs, jobs=2, progress=False, execute_fn=fake_execute)
    assert time.time() - t0 < 120
    assert [r.status for r in res] == ["failed", "done"]
    assert "cannot hand the run to a worker process" in res[0].reason and "--jobs 1" in res[0].reason
