"""Optional loggers: each epoch summary reaches TensorBoard / W&B under fixed tags; log.jsonl unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from vlprompt.backbones import load_backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.run import RunDir
from vlprompt.train import fit, loggers
from vlprompt.train.config import RunConfig
from vlprompt.train.loggers import TensorBoardLogger, epoch_scalars, make_loggers, parse_loggers

CFG = RunConfig.from_dict(
    {"train": {"lr": 0.05, "batch_size": 2, "eval_batch_size": 4, "epochs": 2}, "data": {"seed": 1}},
    partial=True,
)


class _Writer:
    def __init__(self):
        self.scalars, self.flushes, self.closed = [], 0, False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def _train(tmp_path, callbacks):
    torch.manual_seed(0)
    model = create_model("tinyctx", load_backbone("vlp-tiny"), ["cat", "dog"])
    data = [(torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(i)), i % 2) for i in range(4)]
    return fit(model, data, CFG, RunDir(tmp_path), eval_data=data, progress=False, callbacks=callbacks)


def test_tensorboard_logger_gets_every_epoch(tmp_path):
    writer = _Writer()
    res = _train(tmp_path, [TensorBoardLogger(tmp_path / "tb", writer=writer)])
    by_step = {}
    for tag, value, step in writer.scalars:
        by_step.setdefault(step, {})[tag] = value
    assert sorted(by_step) == [1, 2] and writer.flushes == 2
    for h in res["history"]:
        got = by_step[h["epoch"]]
        assert got["train/loss"] == pytest.approx(h["loss"]) and got["train/lr"] == pytest.approx(h["lr"])
    assert by_step[2]["test/accuracy"] == pytest.approx(res["eval"]["accuracy"])  # evaluated last epoch
    assert "test/accuracy" not in by_step[1]
    epochs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]  # the report's source is intact


def test_epoch_scalars_and_names():
    s = epoch_scalars({"epoch": 3, "loss": 0.5, "acc": 80, "lr": 0.1, "eval": {"accuracy": 70.0, "n": 9}})
    assert s == {"train/loss": 0.5, "train/acc": 80.0, "train/lr": 0.1, "test/accuracy": 70.0}
    assert parse_loggers("TensorBoard, wandb") == ["tensorboard", "wandb"] and parse_loggers(None) == []
    with pytest.raises(VlpromptError, match="unknown logger 'mlflow'"):
        parse_loggers("mlflow")


def test_real_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (vlprompt[logging])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logger,) = make_loggers("tensorboard", RunDir(tmp_path))
    _train(tmp_path, [logger])
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_missing_package_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name == "wandb":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(VlpromptError, match=r"pip install 'vlprompt\[logging\]'"):
        TensorBoardLogger("unused")
    with pytest.raises(VlpromptError, match="pip install wandb"):
        make_loggers("wandb", RunDir("unused"))


def test_loggers_write_where_the_run_directory_says(tmp_path, monkeypatch):
    """The run layer names the TensorBoard folder (run/layout.py); W&B keeps its files in the run."""
    seen = {}
    monkeypatch.setattr(loggers, "TensorBoardLogger", lambda log_dir: seen.setdefault("tb", log_dir))
    monkeypatch.setattr(loggers, "WandbLogger", lambda config, run_dir: seen.setdefault("wandb", run_dir))
    run = RunDir(tmp_path / "run")
    make_loggers("tensorboard,wandb", run, {"method": "coop"})
    assert seen == {"tb": tmp_path / "run" / "tensorboard", "wandb": tmp_path / "run"}
    with pytest.raises(TypeError, match=r"pass vlprompt.run.RunDir\(folder\)"):
        make_loggers("tensorboard", str(tmp_path / "run"))  # a bare path, as before: the fix is named
