"""Grid workers' lifetime and slots: a parent-only ``kill -9`` of a ``--jobs 2`` grid takes its workers with
it; ``--jobs-per-device`` repeats each device slot and splits threads and GPU memory between the jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlprompt.errors import VlpromptError
from vlprompt.protocols import parallel as P

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    (tmp_path / "sleepy.py").write_text(
        textwrap.dedent(
            """
            import os, time
            from pathlib import Path

            def sleepy(spec, progress=True, share_backbone=False):
                Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
                (Path(spec.out_dir) / "pid").write_text(str(os.getpid()))
                time.sleep(300)
            """
        )
    )
    (tmp_path / "parent.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path[:0] = [{str(tmp_path)!r}, {SRC!r}]
            from pathlib import Path
            from sleepy import sleepy
            from vlprompt.protocols.grid import Evaluation, RunSpec
            from vlprompt.protocols.parallel import run_grid_parallel

            if __name__ == "__main__":  # spawned workers re-import this file as __mp_main__
                root = Path({str(tmp_path)!r})
                specs = [RunSpec("fewshot", "coop", "demo", 2, s, root / f"seed{{s}}", {{}},
                                 [Evaluation("demo", "all")]) for s in (1, 2, 3)]
                run_grid_parallel(specs, jobs=2, progress=False, execute_fn=sleepy)
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], env=env)
    try:
        pidfiles = [tmp_path / "seed1" / "pid", tmp_path / "seed2" / "pid"]
        deadline = time.time() + 120
        while not all(p.is_file() and p.read_text() for p in pidfiles):
            assert parent.poll() is None, "the grid parent exited early"
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pidfiles]
        assert all(_alive(w) for w in workers) and parent.pid not in workers
        os.kill(parent.pid, signal.SIGKILL)  # the parent only; its workers are not signalled
        parent.wait(timeout=10)
        deadline = time.time() + 15
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "grid workers outlived their parent"
        assert not (tmp_path / "seed3" / "pid").exists()  # nothing new started after the parent died
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in tmp_path.glob("seed*/pid"):  # never leave a sleeper behind, even when the test fails
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def test_jobs_per_device_slots_threads_and_memory():
    assert P.per_device_slots(2, ["0", "1"]) == ["0", "0", "1", "1"]
    assert P.per_device_slots(2, ["0", "0", "1"]) == ["0", "0", "1", "1"]  # a repeated entry is one device
    assert P.per_device_slots(3, None, gpus=0) == [None, None, None]  # CPU: three jobs share the cores
    assert P.per_device_slots(2, None, gpus=2) == ["0", "0", "1", "1"]
    with pytest.raises(VlpromptError, match="--jobs-per-device must be >= 1"):
        P.per_device_slots(0, None, gpus=1)
    slots = P.per_device_slots(2, ["0", "1"])
    assert P.memory_fraction(slots, "0") == 0.5 and P.memory_fraction(slots, None) == 1.0
    assert P.memory_fraction(["0", "0", "0", "1"], "0") == pytest.approx(1 / 3)
    with pytest.raises(VlpromptError, match="omit --jobs"):
        P.run_grid_parallel([], jobs=3, devices=["0", "1"], jobs_per_device=2, progress=False)


@pytest.mark.slow
def test_jobs_per_device_report_equals_one_job_at_a_time(tmp_path, capsys):
    """Real training on the CPU: two jobs sharing the device (threads split) give the one-job report."""
    from fakeruns import demo_grid_argv

    from vlprompt.cli.main import main

    def report(out: Path, *extra: str) -> str:
        assert main(demo_grid_argv(out, "1,2", *extra)) == 0
        printed = capsys.readouterr().out
        assert "2 runs: 2 done, 0 skipped (complete), 0 failed" in printed
        return (out / "report" / "report.md").read_text().replace(str(out), "RUNS")

    shared = report(tmp_path / "k2", "--jobs-per-device", "2")
    single = report(tmp_path / "j1", "--jobs", "1")
    assert shared == single and "| Demo" in shared
