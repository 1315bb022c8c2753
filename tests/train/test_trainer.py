"""Trainer: only prompts learn, determinism, exact resume, atomic checkpoints, metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from vlprompt.methods import create_model
from vlprompt.run import RunDir
from vlprompt.train import checkpoint as ckpt
from vlprompt.train import evaluate, fit
from vlprompt.train.config import RunConfig
from vlprompt.train.zeroshot import evaluate_without_training

CLASSES = ["cat", "dog", "car"]
CFG = RunConfig.from_dict(
    {
        "train": {"lr": 0.05, "batch_size": 3, "eval_batch_size": 4, "epochs": 4, "warmup_epochs": 1},
        "data": {"seed": 3},
    },
    partial=True,
)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 224, 224, generator=g), i % 3) for i in range(6)]


def _model(backbone, init_seed: int = 0):
    torch.manual_seed(init_seed)
    return create_model("tinyctx", backbone, CLASSES)


@pytest.fixture(scope="module")
def straight(backbone, data, tmp_path_factory):
    model = _model(backbone)
    init = model.prompt_state_dict()["ctx"].clone()
    res = fit(model, data, CFG, RunDir(tmp_path_factory.mktemp("straight")), eval_data=data, progress=False)
    return model.prompt_state_dict()["ctx"].clone(), res, init


def test_only_prompts_learn(backbone, straight) -> None:
    final, res, init = straight
    assert not torch.equal(final, init)  # the prompt moved
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    assert res["trainable_parameters"] == 2 * backbone.text.width
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert res["history"][0]["lr"] == 1e-5 and res["history"][1]["lr"] == 0.05
    assert res["eval"]["n"] == 6 and res["eval"]["n_classes"] == 3


def test_deterministic(backbone, data, straight, tmp_path) -> None:
    model = _model(backbone)
    res = fit(model, data, CFG, RunDir(tmp_path), eval_data=data, progress=False)
    assert torch.equal(model.prompt_state_dict()["ctx"], straight[0])
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in straight[1]["history"]]


def test_resume_equals_uninterrupted(backbone, data, straight, tmp_path) -> None:
    first = fit(
        _model(backbone), data, CFG, RunDir(tmp_path), eval_data=data, progress=False, stop_after_epoch=2
    )
    assert first["stopped"] and first["epochs_done"] == 2 and first["eval"] is None
    state = ckpt.load_checkpoint(tmp_path / "checkpoint")
    assert state["epoch"] == 2
    saved = load_file(tmp_path / "checkpoint" / "last.safetensors")
    assert torch.equal(saved["ctx"], state["prompt"]["ctx"])

    resumed_model = _model(backbone, init_seed=123)  # different init: weights must come from the checkpoint
    res = fit(resumed_model, data, CFG, RunDir(tmp_path), resume=True, eval_data=data, progress=False)
    assert torch.equal(resumed_model.prompt_state_dict()["ctx"], straight[0])
    ref = straight[1]
    assert res["eval"] == ref["eval"]
    strip = ("time", "images_per_s", "eval_s")
    assert [{k: v for k, v in h.items() if k not in strip} for h in res["history"]] == [
        {k: v for k, v in h.items() if k not in strip} for h in ref["history"]
    ]
    # logs read like an uninterrupted run: every step once
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    steps = [eval(line.replace("null", "None"))["step"] for line in lines if '"kind": "step"' in line]
    assert steps == list(range(1, 9))
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 8 + 4


def test_resume_rejects_other_settings(backbone, data, tmp_path) -> None:
    from vlprompt.errors import VlpromptError

    cfg = RunConfig.from_dict(CFG.but(train={"epochs": 2}), partial=True)
    fit(_model(backbone), data, cfg, RunDir(tmp_path), progress=False, stop_after_epoch=1)
    other = cfg.but(train={"lr": 0.01})
    with pytest.raises(VlpromptError, match="different settings"):
        fit(_model(backbone), data, other, RunDir(tmp_path), resume=True, progress=False)


def test_failed_write_keeps_old_checkpoint(backbone, data, tmp_path, monkeypatch) -> None:
    cfg = RunConfig.from_dict(CFG.but(train={"epochs": 2}), partial=True)
    fit(_model(backbone), data, cfg, RunDir(tmp_path), progress=False, stop_after_epoch=1)
    before = (tmp_path / "checkpoint" / "state.json").read_bytes()

    from vlprompt.utils import atomic_write

    def half_then_fail(path, obj):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write("partial garbage")
            raise OSError("disk full")

        atomic_write(path, write)

    monkeypatch.setattr(ckpt, "atomic_write_json", half_then_fail)  # the last write of a checkpoint fails
    with pytest.raises(OSError, match="disk full"):
        fit(_model(backbone), data, cfg, RunDir(tmp_path), resume=True, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint" / "state.json").read_bytes() == before
    state = ckpt.load_checkpoint(tmp_path / "checkpoint")
    assert state["epoch"] == 1
    res = fit(_model(backbone), data, cfg, RunDir(tmp_path), resume=True, progress=False)
    assert res["epochs_done"] == 2 and [h["epoch"] for h in res["history"]] == [1, 2]


class _FixedModel(torch.nn.Module):
    """Returns prescribed logits, to check the metric arithmetic against sklearn."""

    def __init__(self, preds: list[int], n_classes: int):
        super().__init__()
        self.preds = torch.tensor(preds)
        self.classnames = [f"c{i}" for i in range(n_classes)]
        self.n_classes = n_classes
        self.pos = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        p = self.preds[self.pos : self.pos + len(x)]
        self.pos += len(x)
        return torch.nn.functional.one_hot(p, self.n_classes).float()


def test_evaluate_metrics_match_sklearn() -> None:
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    p = [0, 1, 0, 1, 3, 2, 2, 0, 2, 3]
    model = _FixedModel(p, 5)  # class 4 is absent from the ground truth
    batches = [(torch.zeros(4, 1), torch.tensor(y[:4])), (torch.zeros(6, 1), torch.tensor(y[4:]))]
    res = evaluate(model, batches, device="cpu", confusion=True)
    assert res["accuracy"] == pytest.approx(70.0)
    want = 100 * f1_score(y, p, average="macro", labels=sorted(set(y)))
    assert res["macro_f1"] == pytest.approx(want, abs=1e-9)
    assert res["per_class_accuracy"] == {
        "c0": pytest.approx(200 / 3, abs=1e-3),
        "c1": 50.0,
        "c2": 75.0,
        "c3": 100.0,
    }
    assert res["n"] == 10 and res["n_classes"] == 5
    assert sum(map(sum, res["confusion"])) == 10 and res["confusion"][0][1] == 1


def test_zero_shot_records_the_device_of_its_placement_as_fit_does(backbone) -> None:
    """Zero-shot's cost record names the run's placement device (``cuda``), as ``fit`` does for every
    trained run; it named the backbone's parameter device (``cuda:0``) on the H200, a second spelling."""
    model = create_model("zeroshot", backbone, ["a", "b"])
    placed = SimpleNamespace(device=torch.device("cuda"))  # nothing runs: no eval data
    assert evaluate_without_training(model, [], None, placement=placed)["device"] == "cuda"
    assert evaluate_without_training(model, [], None)["device"] == "cpu"  # library use: the backbone's
