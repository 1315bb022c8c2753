"""Runs written before the configuration was rebuilt keep their fingerprints, and resume exactly.

The fixtures (``fixtures/runs_before_issue21``, see its README) were written by the code of commit
5b2f792; these tests hold every later change of the configuration, the registry and the trainer to
them: a request equal to theirs must compute the same fingerprint, a complete run must be reused
untouched, and the interrupted run must resume to the prompt the uninterrupted one ended with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlprompt.cli.main import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs_before_issue21"
TINY = ["--dataset", "demo", "--shots", "2", "--model", "vlp-tiny", "--no-progress"]
COOP = ["--method", "coop", *TINY, "--epochs", "1", "--set", "train.batch_size=4", "--set", "train.lr=0.01"]
PROMPTSRC = [
    "--method", "promptsrc", *TINY, "--epochs", "2", "--set", "train.batch_size=4",
    "--set", "options.depth_text=2", "--set", "options.depth_image=2",
]  # fmt: skip


def _copy(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    return out


def _fingerprint(run: Path) -> str:
    return json.loads((run / "fingerprint.json").read_text())["fingerprint"]


def test_complete_run_is_reused_with_its_fingerprint(tmp_path, capsys):
    run = _copy("coop_complete", tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", *COOP, "--out", str(run)]) == 0
    assert "already complete with these settings" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing retrained, nothing rewritten


def test_interrupted_run_resumes_to_the_uninterrupted_prompt(tmp_path):
    run = _copy("promptsrc_interrupted", tmp_path)
    assert main(["train", *PROMPTSRC, "--out", str(run), "--resume"]) == 0
    assert (run / "done").is_file()
    full = FIXTURES / "promptsrc_uninterrupted"
    assert _fingerprint(run) == _fingerprint(full)
    got, want = load_file(run / "prompt.safetensors"), load_file(full / "prompt.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape
        assert float((got[k] - want[k]).abs().max()) <= 1e-5, k

    def accuracy(d: Path) -> float:
        return json.loads((d / "metrics.json").read_text())["evaluations"][-1]["accuracy"]

    assert accuracy(run) == pytest.approx(accuracy(full))
