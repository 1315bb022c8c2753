"""The rest of ``fit()``'s contract: its guards and errors, batching, logging cadence, callbacks, the
execution settings a resume may change, and what it returns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlprompt.backbones import load_backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.run import RunDir
from vlprompt.train import fit
from vlprompt.train.config import RunConfig
from vlprompt.train.trainer import EXECUTION_KEYS

CLASSES = ["cat", "dog", "car"]
CFG = RunConfig.from_dict(
    {
        "train": {
            "lr": 0.05,
            "batch_size": 3,
            "eval_batch_size": 4,
            "epochs": 2,
            "warmup_epochs": 1,
            "device": "cpu",
            "precision": "fp32",
        },
        "data": {"seed": 3},
    },
    partial=True,
)


def _cfg(**train) -> RunConfig:
    return CFG.but(train=train)


def _data(n: int) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 224, 224, generator=g), i % 3) for i in range(n)]


def _model(backbone):
    torch.manual_seed(0)
    return create_model("tinyctx", backbone, CLASSES)


def test_returns_the_run_summary(backbone) -> None:
    model = _model(backbone)
    res = fit(model, _data(6), CFG, None, eval_data=_data(5), progress=False)
    assert (res["epochs_done"], res["epochs"], res["stopped"], res["steps"]) == (2, 2, False, 4)
    assert (res["device"], res["precision"]) == ("cpu", "fp32")
    assert res["trainable_parameters"] == 2 * backbone.text.width
    assert res["eval"]["n"] == 5 and set(res["eval"]) >= {"accuracy", "macro_f1", "per_class_accuracy"}
    h = res["history"][-1]
    assert (h["kind"], h["epoch"], h["step"]) == ("epoch", 2, 4)
    assert h["eval"] == {k: res["eval"][k] for k in ("accuracy", "macro_f1", "n")}
    assert "eval" not in res["history"][0]  # evaluated after the last epoch only by default


@pytest.mark.parametrize("n,batch,steps", [(7, 3, 2), (6, 3, 2), (2, 3, 1)])
def test_last_partial_batch_dropped_only_when_a_full_one_exists(backbone, n, batch, steps) -> None:
    res = fit(_model(backbone), _data(n), _cfg(batch_size=batch, epochs=1), None, progress=False)
    assert res["steps"] == steps
    trained = steps * batch if n >= batch else n  # images in the batches actually trained on
    assert res["history"][0]["acc"] * trained / 100 == pytest.approx(
        round(res["history"][0]["acc"] * trained / 100)
    )


def test_log_every_eval_every_epoch_and_callbacks(backbone, tmp_path) -> None:
    seen = []
    res = fit(
        _model(backbone),
        _data(6),
        _cfg(epochs=3, log_every=2, eval_every_epoch=True),
        RunDir(tmp_path),
        eval_data=_data(4),
        progress=False,
        callbacks=[seen.append],
    )
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "step"] == [2, 4, 6]
    assert [x["epoch"] for x in lines if x["kind"] == "epoch"] == [1, 2, 3]
    assert [s["epoch"] for s in seen] == [1, 2, 3] and seen == res["history"]
    assert all(s["eval"]["n"] == 4 for s in seen)
    assert [h["lr"] for h in res["history"]] == [1e-5, 0.05, pytest.approx(0.0375)]


def test_resume_may_change_execution_settings_only(backbone, tmp_path) -> None:
    assert set(EXECUTION_KEYS) == {
        "device",
        "eval_every_epoch",
        "log_every",
        "eval_batch_size",
        "shard_text",
        "attention",
    }
    fit(_model(backbone), _data(6), CFG, RunDir(tmp_path), progress=False, stop_after_epoch=1)
    changed = _cfg(eval_batch_size=2, log_every=3, eval_every_epoch=True, shard_text=False)
    res = fit(_model(backbone), _data(6), changed, RunDir(tmp_path), resume=True, progress=False)
    assert res["epochs_done"] == 2 and [h["epoch"] for h in res["history"]] == [1, 2]
    for other in (_cfg(batch_size=2), _cfg(momentum=0.5), CFG.but(data={"seed": 4})):
        with pytest.raises(VlpromptError, match="different settings; resume with the same config"):
            fit(_model(backbone), _data(6), other, RunDir(tmp_path), resume=True, progress=False)
    for model in (  # other prompt shapes, other classes
        create_model("tinyctx", backbone, CLASSES, n_ctx=3),
        create_model("tinyctx", backbone, ["cat", "dog", "bus"]),
    ):
        with pytest.raises(VlpromptError, match="different settings; resume with the same config"):
            fit(model, _data(6), CFG, RunDir(tmp_path), resume=True, progress=False)


def test_frozen_backbone_is_enforced(backbone) -> None:
    model = _model(backbone)
    p = next(backbone.clip.parameters())
    p.requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="CLIP weights would be trained .*only prompt parameters"):
            fit(model, _data(3), CFG, None, progress=False)
    finally:
        p.requires_grad_(False)


def test_prompt_parameters_must_be_fp32(backbone) -> None:
    model = _model(backbone)
    model.method.ctx.data = model.method.ctx.data.half()
    with pytest.raises(TypeError, match=r"learnable parameters must be fp32 master weights: \['.*ctx'\]"):
        fit(model, _data(3), CFG, None, progress=False)


def test_bad_data_and_settings_are_one_line_errors(backbone) -> None:
    msg = "train.image_features_cache='on' is invalid; choose one of: off, eval, train"
    with pytest.raises(VlpromptError, match=msg):
        fit(_model(backbone), _data(3), _cfg(image_features_cache="on"), None, progress=False)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 3))
    for data in ([], empty, torch.utils.data.DataLoader(empty, batch_size=3)):
        with pytest.raises(VlpromptError, match="the training split is empty; check the data set"):
            fit(_model(backbone), data, CFG, None, progress=False)
    with pytest.raises(TypeError, match="cannot train on int; pass a Dataset, a DataLoader or Datum items"):
        fit(_model(backbone), 5, CFG, None, progress=False)


def test_non_finite_loss_stops_with_advice(backbone) -> None:
    model = _model(backbone)
    with torch.no_grad():
        model.method.ctx.fill_(float("nan"))
    msg = r"training diverged at epoch 1, step 1: the loss became nan; lower train.lr \(now"
    with pytest.raises(VlpromptError, match=msg):
        fit(model, _data(3), CFG, None, progress=False)


def test_feature_cache_leaves_tensor_data_alone(backbone) -> None:
    """``image_features_cache`` caches Datum items only; ready tensors train exactly as without it."""
    runs = []
    for mode in ("off", "train"):
        model = _model(backbone)
        res = fit(model, _data(6), _cfg(image_features_cache=mode), None, eval_data=_data(4), progress=False)
        runs.append((model.prompt_state_dict()["ctx"], [h["loss"] for h in res["history"]], res["eval"]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]


@pytest.mark.parametrize("n_items", [1, 4])
def test_feature_cache_on_items_equals_training_on_test_transform_tensors(tmp_path, n_items) -> None:
    """Datum items with ``image_features_cache=train``: the same training as on the items run through
    the backbone's own deterministic test transform (its mean/std, here not CLIP's defaults)."""
    from PIL import Image

    from vlprompt.data import Datum, ImageDataset, build_transform

    bb = load_backbone("vlp-tiny")
    bb.clip.visual.image_mean, bb.clip.visual.image_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    items = []
    for i in range(n_items):
        path = tmp_path / f"{i}.png"
        x, y = np.meshgrid(np.arange(40), np.arange(30))  # not uniform: a random crop would change it
        Image.fromarray(np.stack([5 * x + 40 * i, 8 * y, 255 - 5 * x], -1).astype(np.uint8)).save(path)
        items.append(Datum(str(path), i % 3, CLASSES[i % 3], path.name))
    tensors = list(ImageDataset(items, build_transform(False, **bb.preprocess_cfg)))
    cfg = _cfg(batch_size=1, epochs=1, warmup_epochs=0).but(data={"seed": 3, "dataset": f"items{n_items}"})
    a, b = _model(bb), _model(bb)
    fit(a, items, cfg.but(train={"image_features_cache": "train"}), None, progress=False)
    fit(b, tensors, cfg, None, progress=False)
    torch.testing.assert_close(a.prompt_state_dict()["ctx"], b.prompt_state_dict()["ctx"], rtol=0, atol=1e-5)
    assert not torch.equal(a.prompt_state_dict()["ctx"], _model(bb).prompt_state_dict()["ctx"])


def test_data_seed_decides_the_batch_order(backbone, tmp_path) -> None:
    def step_losses(seed: int) -> list[float]:
        out = tmp_path / f"seed{seed}"
        fit(_model(backbone), _data(6), CFG.but(data={"seed": seed}), RunDir(out), progress=False)
        lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if x["kind"] == "step"]

    assert step_losses(3) == step_losses(3)
    assert step_losses(3) != step_losses(4)  # same data and init: only the shuffling differs


def test_fit_writes_through_the_files_object_it_is_handed_and_refuses_a_bare_folder(backbone, tmp_path):
    """The trainer knows no file name: it writes where the run layer's RunDir (a TrainerFiles) says, and a
    folder given instead is refused with the fix (the names live in run/layout.py only)."""
    from vlprompt.run import layout
    from vlprompt.train import files as trainer_files

    run = RunDir(tmp_path / "r")
    assert isinstance(run, trainer_files.TrainerFiles)
    fit(_model(backbone), _data(6), CFG, run, progress=False)
    assert sorted(p.name for p in run.path.iterdir()) == sorted(
        [layout.LOG, layout.LOG_TABLE, layout.CHECKPOINT]
    )
    assert not any(
        isinstance(v, str) and v.endswith((".jsonl", ".csv")) for v in vars(trainer_files).values()
    )
    with pytest.raises(TypeError, match=r"pass vlprompt\.run\.RunDir\(folder\)"):
        fit(_model(backbone), _data(6), CFG, tmp_path / "folder", progress=False)
    assert not (tmp_path / "folder").exists()


def test_fit_trains_on_the_placement_it_is_handed_without_resolving_one(backbone, monkeypatch):
    """The run layer resolves device, precision and DDP role once and hands them down; fit given a
    placement does not resolve them again (``resolve_placement`` is only fit's default)."""
    from vlprompt.train import placement as P
    from vlprompt.train import trainer as T
    from vlprompt.train.precision import Precision

    place = P.resolve_placement("cpu", "fp32")
    assert place == P.Placement(torch.device("cpu"), Precision("fp32", "cpu"), True)

    def refuse(*a, **k):
        raise AssertionError("fit resolved the placement again")

    monkeypatch.setattr(T, "resolve_placement", refuse)
    res = fit(_model(backbone), _data(6), CFG, None, placement=place, progress=False)
    assert res["device"] == "cpu" and res["precision"] == "fp32" and res["epochs_done"] == 2
    with pytest.raises(AssertionError, match="resolved the placement again"):
        fit(_model(backbone), _data(6), CFG, None, progress=False)
