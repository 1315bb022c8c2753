"""The reference per-epoch lr schedule, presets and --set overrides."""

from __future__ import annotations

import math

import pytest
import torch

from vlprompt.errors import VlpromptError
from vlprompt.train.config import DEFAULT_TRAIN, TrainConfig, apply_overrides, load_preset, resolve_config
from vlprompt.train.schedule import EpochSchedule, lr_sequence


class _DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Independent re-implementation of Dassl's ConstantWarmupScheduler around torch's cosine."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
            for g, lr in zip(self.optimizer.param_groups, self._last_lr):
                g["lr"] = lr
        else:
            super().step()


def _dassl_sequence(lr: float, epochs: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    sched = _DasslConstantWarmup(opt, cos, 1, 1e-5)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


REFERENCE = {
    (0.0035, 5): [1e-5, 0.0035, 0.00316578, 0.00229078, 0.00120922],
    (0.0035, 2): [1e-5, 0.0035],
    (0.002, 10): [
        1e-5,
        0.002,
        0.00195106,
        0.00180902,
        0.00158779,
        0.00130902,
        0.001,
        0.000690983,
        0.000412215,
        0.000190983,
    ],
}


@pytest.mark.parametrize(("lr", "epochs"), list(REFERENCE))
def test_published_lr_sequences(lr: float, epochs: int) -> None:
    got = lr_sequence({**DEFAULT_TRAIN, "lr": lr, "epochs": epochs})
    want = REFERENCE[(lr, epochs)]
    assert len(got) == len(want)
    for g, w in zip(got, want):  # published to 6 significant digits: within half a unit of the last
        assert abs(g - w) <= 0.5 * 10 ** (math.floor(math.log10(w)) - 5) + 1e-15


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize(("lr", "epochs"), [(0.0035, 5), (0.0035, 2), (0.002, 10), (0.002, 200)])
def test_matches_dassl_scheduler_exactly(lr: float, epochs: int) -> None:
    got = lr_sequence({**DEFAULT_TRAIN, "lr": lr, "epochs": epochs})
    ref = _dassl_sequence(lr, epochs)
    for g, w in zip(got, ref):
        assert g == pytest.approx(w, rel=1e-8, abs=0)


def test_coop_200_epochs_head_and_tail() -> None:
    seq = lr_sequence({**DEFAULT_TRAIN, "lr": 0.002, "epochs": 200})
    for g, w in zip(seq[:4], [1e-5, 0.002, 0.00199988, 0.00199951]):
        assert abs(g - w) <= 0.5 * 10 ** (math.floor(math.log10(w)) - 5) + 1e-15
    assert seq[-1] == pytest.approx(0.001 * (1 + math.cos(math.pi * 198 / 200)), rel=1e-12)
    assert min(seq[1:]) > 0  # the lagging cosine never reaches zero


def test_schedule_state_roundtrip() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0035)
    s = EpochSchedule(opt, TrainConfig(lr=0.0035, epochs=5))
    s.step()
    s.step()
    state = s.state_dict()
    opt2 = torch.optim.SGD([p], lr=0.0035)
    s2 = EpochSchedule(opt2, TrainConfig(lr=0.0035, epochs=5))
    s2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0035 * (1 + math.cos(math.pi / 5)) / 2, rel=1e-12)
    assert s2.step() == s.step()


def test_preset_default_and_overrides() -> None:
    p = load_preset("zeroshot")  # no preset file: generic recipe
    assert p["train"]["lr"] == 0.002 and p["train"]["batch_size"] == 32 and p["train"]["epochs"] == 5
    assert p["train"]["warmup_lr"] == 1e-5 and p["train"]["scheduler"] == "cosine"
    with pytest.raises(VlpromptError, match="unknown protocol"):
        load_preset("zeroshot", "base2nwe")
    with pytest.raises(VlpromptError, match="unknown method"):
        load_preset("nosuchmethod")
    out = apply_overrides(p, ["train.lr=0.01", "options.template=a {}", "train.epochs_by_shots={1: 3}"])
    assert out["train"]["lr"] == 0.01 and out["options"]["template"] == "a {}"
    assert out["train"]["epochs_by_shots"] == {1: 3}
    assert p["train"]["lr"] == 0.002  # input untouched
    with pytest.raises(VlpromptError, match="valid sections: method, options, train"):
        apply_overrides(p, ["trian.lr=1"])
    with pytest.raises(VlpromptError, match="unknown train key 'lrr'"):
        apply_overrides(p, ["train.lrr=1"])
    with pytest.raises(VlpromptError, match="KEY=VALUE"):
        apply_overrides(p, ["train.lr"])


def test_resolve_config_order() -> None:
    cfg = resolve_config(
        "zeroshot",
        "demo",
        shots=2,
        protocol="base2new",
        model="vlp-tiny",
        overrides=["train.epochs_by_shots={1: 7, 2: 9}"],
        device="cpu",
    )
    assert cfg.data.to_dict() == {
        "dataset": "demo",
        "root": None,
        "shots": 2,
        "seed": 1,
        "subsample": "base",
        "skip_bad": False,
        "listing": "sorted",
        "num_workers": 0,
        "max_image_pixels": 178_956_970,
        "descriptions": None,
    }
    assert cfg.train.device == "cpu"
    assert cfg.backbone.to_dict() == {"name": "vlp-tiny", "pretrained": None, "weights": None}
    # epochs_by_shots applies, explicit flags win over it
    cfg = resolve_config("zeroshot", "demo", shots=2, overrides=["train.epochs_by_shots={2: 9}"])
    assert cfg.train.epochs == 9
    cfg = resolve_config("zeroshot", "demo", shots=2, overrides=["train.epochs_by_shots={2: 9}"], epochs=3)
    assert cfg.train.epochs == 3
    with pytest.raises(VlpromptError, match="train.lr"):
        resolve_config("zeroshot", "demo", overrides=["train.lr=-1"])
    with pytest.raises(VlpromptError, match="precision"):
        resolve_config("zeroshot", "demo", overrides=["train.precision=fp8"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.momentum=1", "train.momentum=1 is invalid; it must be a number >= 0 and < 1"),
        ("train.momentum=-0.1", "train.momentum=-0.1 is invalid; it must be a number >= 0 and < 1"),
        (
            "train.weight_decay=-0.5",
            "train.weight_decay=-0.5 is invalid; it must be a number >= 0 and <= 1",
        ),
        ("train.lr=0", "train.lr=0 is invalid; it must be a number > 0 and <= 10"),
        ("train.lr=100", "train.lr=100 is invalid; it must be a number > 0 and <= 10"),
        ("train.warmup_lr=-1", "train.warmup_lr=-1 is invalid; it must be a number >= 0 and <= 10"),
        ("options.n_ctx=0", "options.n_ctx=0 is invalid; it must be an integer >= 1"),
    ],
)
def test_optimiser_and_method_ranges_are_one_line_errors(override, message):
    with pytest.raises(VlpromptError) as e:
        resolve_config("coop", "demo", overrides=[override])
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("vpt", {"init": "xavier"}, "options.init='xavier' is invalid; choose one of: normal, uniform"),
        ("prograd", {"temperature": 0}, "options.temperature=0 is invalid; it must be a number > 0"),
        ("kgcoop", {"weight": -1}, "options.weight=-1 is invalid; it must be a number >= 0"),
        ("promptsrc", {"gpa_std": 0.0}, "options.gpa_std=0.0 is invalid; it must be a number > 0"),
        ("dpl", {"mode": "soft"}, "options.mode='soft' is invalid; choose one of: gated, exact"),
    ],
)
def test_method_options_are_checked_by_their_descriptor(method, options, message):
    from vlprompt.methods import build_config, get_method

    with pytest.raises(VlpromptError) as e:
        build_config(get_method(method), options)  # the same check for the CLI, the API and create_model
    assert str(e.value) == message
