"""Two torchrun "nodes" on localhost (--nnodes 2, c10d rendezvous, gloo) train one run through the
CLI: the same prompt as one process (no augmentation), and a node killed mid-run fails the other
with one line within the collective timeout instead of hanging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[2] / "src")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch without gloo",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(out: Path, epochs: int, shots: int, augment: bool = False) -> list[str]:
    # image_features_cache=train: CoOp on frozen image features, augmentation off -> exact comparison
    no_aug = [] if augment else ["--set", "train.image_features_cache=train"]
    return [
        "train", "--method", "coop", "--dataset", "demo", "--shots", str(shots), "--model", "vlp-tiny",
        "--epochs", str(epochs), "--set", "train.batch_size=4", *no_aug, "--out", str(out), "--no-progress",
    ]  # fmt: skip


def env(timeout_s: int = 60) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "VLPROMPT_DIST_TIMEOUT": str(timeout_s),  # collectives give up after this many seconds
    }


def node(rank: int, port: int, argv: list[str], timeout_s: int, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", f"vlp-{port}", "--max-restarts", "0", "--local-addr", "127.0.0.1",
        "-m", "vlprompt.cli.main", *argv,
    ]  # fmt: skip
    f = open(log, "w")  # noqa: SIM115 -- closed with the process
    return subprocess.Popen(
        cmd, stdout=f, stderr=subprocess.STDOUT, env=env(timeout_s), start_new_session=True
    )


def wait(procs: list[subprocess.Popen], limit: float) -> list[int | None]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    return [p.poll() for p in procs]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a whole "node": the torchrun agent and its workers, at once (a machine that died)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            kill_node(p)


@pytest.mark.slow
def test_two_nodes_train_the_prompt_of_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    port = free_port()
    procs = [node(r, port, train_argv(two, 2, 4), 120, tmp_path / f"node{r}.log") for r in (0, 1)]
    try:
        rcs = wait(procs, 600)
    finally:
        stop(procs)
    logs = "".join((tmp_path / f"node{r}.log").read_text() for r in (0, 1))
    assert rcs == [0, 0], logs
    assert "distributed: 2 processes, backend gloo" in logs
    single = subprocess.run(
        [sys.executable, "-m", "vlprompt", *train_argv(one, 2, 4)], capture_output=True, text=True, env=env()
    )
    assert single.returncode == 0, single.stderr
    a, b = load_file(two / "prompt.safetensors"), load_file(one / "prompt.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        diff = float((a[k] - b[k]).abs().max())
        assert diff < 1e-5, (k, diff)


@pytest.mark.slow
def test_a_node_killed_mid_run_fails_the_other_with_one_line(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    timeout_s = 20
    procs = [
        node(r, port, train_argv(out, 30, 16, augment=True), timeout_s, tmp_path / f"node{r}.log")
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint").is_dir():  # both nodes are training (~1 s per epoch, 30 epochs)
            assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        kill_node(procs[1])  # node 1 (agent and worker) vanishes
        t_kill = time.monotonic()
        rc = wait([procs[0]], timeout_s + 120)[0]
        took = time.monotonic() - t_kill
    finally:
        stop(procs)
    text = (tmp_path / "node0.log").read_text()
    assert rc is not None and rc != 0, f"node 0 still running {took:.0f} s after node 1 died:\n{text}"
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, text
    assert "distributed training stopped on rank" in errors[0]
    assert "rerun with --resume" in errors[0]
    assert 'File "' + SRC not in text  # no traceback through vlprompt's code
    assert not (out / "done").exists()
