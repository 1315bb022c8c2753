"""`vlprompt run --executor local-submitit`: the grid as a submitit job array through the local runner's
execute() -- complete runs skipped before submission, failures isolated, and the same report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")

from vlprompt.protocols import cluster as C  # noqa: E402
from vlprompt.protocols.grid import Evaluation, RunSpec  # noqa: E402
from vlprompt.protocols.runner import RunResult  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    """submitit's local jobs are fresh interpreters: they must import vlprompt and this module's job."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def fake_job(spec: RunSpec) -> RunResult:
    if spec.seed == 3:
        raise ValueError("boom in the job")
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    (spec.out_dir / "pid").write_text(str(os.getpid()))
    entry = {"dataset": spec.dataset, "subsample": "all", "split": "test", "accuracy": 50.0}
    (spec.out_dir / "metrics.json").write_text(json.dumps({"evaluations": [entry]}))
    (spec.out_dir / "done").write_text("ok\n")
    return RunResult(spec.name, str(spec.out_dir), "done", "", 0.1, True, 1)


def test_job_array_skips_complete_runs_and_isolates_failures(tmp_path):
    specs = [
        RunSpec("fewshot", "coop", "demo", 2, s, tmp_path / f"seed{s}", {}, [Evaluation("demo", "all")])
        for s in (1, 2, 3)
    ]
    fake_job(specs[0])  # already complete: never submitted
    (specs[0].out_dir / "pid").write_text("parent")
    res = C.run_grid_submitit(
        specs,
        "local-submitit",
        folder=tmp_path / "sub",
        job_fn=fake_job,
        resources=C.JobResources(gpus=0, cpus=1, time_min=5),
    )
    assert [r.status for r in res] == ["skipped", "done", "failed"]
    assert "boom in the job" in res[2].reason
    assert (specs[0].out_dir / "pid").read_text() == "parent"
    assert int((specs[1].out_dir / "pid").read_text()) != os.getpid()  # ran in a submitit job process
    assert len(list((tmp_path / "sub").glob("*/*_submitted.pkl"))) == 2  # an array of the 2 runs to do


def test_resources_and_errors():
    p = C.JobResources(gpus=2, cpus=16, mem_gb=64, time_min=90, partition="gpu").parameters("slurm")
    assert p == {
        "timeout_min": 90,
        "cpus_per_task": 16,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 2,
        "mem_gb": 64.0,
        "slurm_array_parallelism": 64,
        "slurm_partition": "gpu",
    }
    assert "slurm_partition" not in C.JobResources(partition="gpu").parameters("local")
    cpu = C.JobResources(gpus=0, account="lab", qos="low").parameters("slurm")
    assert "gpus_per_node" not in cpu  # a CPU partition has no gres: ask for no GPU at all
    assert (cpu["slurm_account"], cpu["slurm_qos"]) == ("lab", "low")
    from vlprompt.errors import VlpromptError

    with pytest.raises(VlpromptError, match="unknown executor 'pbs'"):
        C.run_grid_submitit([], "pbs")


@pytest.mark.slow
def test_local_submitit_grid_gives_the_local_runners_report(tmp_path, capsys):
    from fakeruns import demo_grid_argv

    from vlprompt.cli.main import main
    from vlprompt.protocols.parallel import report_grid

    assert (
        main(demo_grid_argv(tmp_path / "sub", "1", "--executor", "local-submitit", "--cpus-per-job", "1"))
        == 0
    )
    out = capsys.readouterr().out
    assert "1 runs: 1 done, 0 skipped (complete), 0 failed" in out
    assert f"report: {tmp_path / 'sub' / 'report' / 'report.md'}" in out
    assert main(demo_grid_argv(tmp_path / "loc", "1")) == 0  # the local runner, one run at a time
    capsys.readouterr()
    report_grid(tmp_path / "loc")

    def read(root: Path, name: str) -> str:
        return (root / "report" / name).read_text().replace(str(root), "RUNS")

    for name in ("report.md", "base2new_coop.csv", "base2new_comparison.csv"):
        assert read(tmp_path / "sub", name) == read(tmp_path / "loc", name)
    # again: everything complete, nothing submitted
    assert main(demo_grid_argv(tmp_path / "sub", "1", "--executor", "local-submitit")) == 0
    assert "1 runs: 0 done, 1 skipped (complete), 0 failed" in capsys.readouterr().out
