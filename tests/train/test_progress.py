"""Progress: one whole-run training bar, one evaluation bar, the grid view; quiet off a terminal."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch

from vlprompt.backbones import load_backbone
from vlprompt.methods import create_model
from vlprompt.protocols.gridview import GridView, format_eta
from vlprompt.protocols.runner import RunResult
from vlprompt.train import evaluate, fit
from vlprompt.train import progress as progress_mod
from vlprompt.train.config import RunConfig

CLASSES = ["cat", "dog", "car"]
CFG = RunConfig.from_dict(
    {"train": {"lr": 0.05, "batch_size": 2, "eval_batch_size": 4, "epochs": 3}, "data": {"seed": 1}},
    partial=True,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tinyctx", load_backbone("vlp-tiny"), CLASSES)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 224, 224, generator=g), i % 3) for i in range(6)]


@pytest.fixture
def tty(monkeypatch):
    """Call it in the test body: pytest's own capture replaces sys.stderr again after fixture set-up."""

    def use() -> _Tty:
        fake = _Tty()
        monkeypatch.setattr(sys, "stderr", fake)
        return fake

    monkeypatch.delenv("VLPROMPT_PROGRESS", raising=False)
    progress_mod.set_progress(True)
    yield use
    progress_mod.set_progress(True)


def _frames(text: str) -> list[str]:
    return [f for f in re.split(r"[\r\n]", text) if f.strip()]


def test_training_has_one_bar_over_all_epochs(model, data, tty):
    tty = tty()
    fit(model, data, CFG, progress=True)
    frames = [f for f in _frames(tty.getvalue()) if "%|" in f]  # bar frames (log lines may interleave)
    assert frames and all(f.lstrip().startswith("train") for f in frames)  # one bar, no per-epoch bars
    assert any("9/9" in f for f in frames)  # 3 epochs x 3 steps
    assert any("epoch=3/3" in f and "lr=" in f and "loss=" in f for f in frames)
    assert any(re.search(r"<\d\d:\d\d", f) for f in frames)  # tqdm's remaining-time (ETA) field


def test_evaluation_bar_counts_images(model, data, tty):
    tty = tty()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    evaluate(model, loader)
    frames = _frames(tty.getvalue())
    assert any(f.lstrip().startswith("eval") and "/6 [" in f and "img" in f for f in frames)  # 6 images


def test_quiet_when_not_a_terminal_or_switched_off(model, data, tty, monkeypatch):
    tty = tty()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    progress_mod.set_progress(False)
    evaluate(model, loader)
    assert tty.getvalue() == ""
    progress_mod.set_progress(True)
    monkeypatch.setenv("VLPROMPT_PROGRESS", "0")
    evaluate(model, loader)
    assert tty.getvalue() == ""
    monkeypatch.delenv("VLPROMPT_PROGRESS")
    plain = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", plain)
    fit(model, data, CFG, progress=True)
    assert "%|" not in plain.getvalue() and "it/s" not in plain.getvalue()  # log lines only, no bar


def test_log_lines_print_above_the_bar_unchanged(tty):
    tty = tty()
    logger = logging.getLogger("vlprompt.test_progress")
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = progress_mod.progress_bar(3, "train", True, redirect_logs=True)
        logger.warning("epoch 1/3  loss 1.0000")
        bar.close()
    finally:
        root.removeHandler(handler)
    assert "epoch 1/3  loss 1.0000\n" in tty.getvalue()


def test_grid_view_counts_and_eta(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("vlprompt.protocols.gridview.time.perf_counter", lambda: clock[0])
    view = GridView(5, enabled=False, skipped=1)
    assert view.eta() is None  # nothing finished yet
    view.start(1)
    view.start(2)
    clock[0] = 110.0
    view.finish(1, RunResult("a", "a", "done", seconds=10.0))
    view.finish(2, RunResult("b", "b", "failed", "ValueError: boom", seconds=1.0))
    view.start(3)
    clock[0] = 114.0
    # mean 10 s per finished run; run 3 has ~6 s left, 1 more queued: (6 + 10) / 1 running
    assert view.eta() == pytest.approx(16.0)
    assert view.summary() == "1 done, 1 running, 1 failed, 1 skipped, 1 queued"
    view.finish(3, RunResult("c", "c", "done", seconds=14.0))
    view.finish(4, RunResult("d", "d", "skipped"))
    assert view.left == 0 and view.eta() == 0.0
    assert format_eta(3725) == "1:02:05" and format_eta(65) == "1:05" and format_eta(None) == "?"
