"""Optimiser and per-epoch learning-rate schedule of the reference toolkit (Dassl), reproduced exactly.

Dassl wraps ``CosineAnnealingLR(T_max=epochs)`` in a ``ConstantWarmupScheduler``: during the first
``warmup_epochs`` epochs the lr is the constant ``warmup_lr``; afterwards the *un-advanced* cosine takes
over, so epoch ``e >= W`` runs at ``cosine(e - W)`` -- the cosine lags the warm-up by W epochs and never
reaches its minimum (MaPLe, 5 epochs: 1e-5, 0.0035, 0.00316578, 0.00229078, 0.00120922).  We compute
that sequence in closed form, set it on the optimiser once per epoch, and checkpoint only the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from vlprompt.errors import VlpromptError
from vlprompt.train.config import TrainConfig


def epoch_lr(
    epoch: int,
    *,
    lr: float,
    epochs: int,
    warmup_epochs: int = 1,
    warmup_lr: float = 1e-5,
    warmup_type: str = "constant",
    scheduler: str = "cosine",
    eta_min: float = 0.0,
) -> float:
    """Learning rate of 0-based ``epoch`` (see module docstring for why the cosine lags)."""
    w = int(warmup_epochs) if warmup_type != "none" else 0
    if epoch < w:
        if warmup_type == "constant":
            return float(warmup_lr)
        if warmup_type == "linear":  # Dassl LinearWarmupScheduler: min_lr at 0, then lr * e / W
            return float(warmup_lr) if epoch == 0 else float(lr) * epoch / w
        raise VlpromptError(f"unknown warmup_type '{warmup_type}'; use constant, linear or none")
    if scheduler == "constant":
        return float(lr)
    if scheduler == "cosine":
        t = epoch - w
        return eta_min + (float(lr) - eta_min) * (1 + math.cos(math.pi * t / float(epochs))) / 2
    raise VlpromptError(f"unknown scheduler '{scheduler}'; use cosine or constant")


class EpochSchedule:
    """Sets the optimiser's lr at the start of every epoch; its state is just the epoch (checkpointable)."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig):
        t = train
        self.optimizer = optimizer
        self.kw = {
            "lr": t.lr,
            "epochs": t.epochs,
            "warmup_epochs": t.warmup_epochs,
            "warmup_lr": t.warmup_lr,
            "warmup_type": t.warmup_type,
            "scheduler": t.scheduler,
        }
        self.epoch = 0
        self.set_epoch(0)

    def lr_at(self, epoch: int) -> float:
        return epoch_lr(epoch, **self.kw)

    def set_epoch(self, epoch: int) -> float:
        """Set epoch ``epoch``'s lr on every group (a group's ``lr_scale`` multiplies ``train.lr``, as
        Dassl's per-group base lrs; the constant warm-up lr is the same for all groups); the base lr."""
        self.epoch = int(epoch)
        lr = self.lr_at(self.epoch)
        for g in self.optimizer.param_groups:
            scale = g.get("lr_scale", 1.0)
            g["lr"] = lr if scale == 1.0 else epoch_lr(self.epoch, **{**self.kw, "lr": self.kw["lr"] * scale})
        return lr

    def step(self) -> float:
        """Advance one epoch (call after each epoch, like a torch scheduler)."""
        return self.set_epoch(self.epoch + 1)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, **self.kw}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))


def lr_sequence(train: Mapping[str, Any]) -> list[float]:
    """Per-epoch learning rates of a train config (for docs, reports and tests)."""
    kw = {k: train[k] for k in ("lr", "epochs") if k in train}
    for k in ("warmup_epochs", "warmup_lr", "warmup_type", "scheduler"):
        if k in train:
            kw[k] = train[k]
    return [epoch_lr(e, **kw) for e in range(int(train["epochs"]))]


def build_optimizer(
    params: Iterable[torch.nn.Parameter], train: TrainConfig, lr_scales: Sequence[float] | None = None
) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, weight decay 5e-4 in the recipes); Adam/AdamW for experiments.

    ``lr_scales`` (one per parameter, default all 1): parameters with another factor of ``train.lr``
    go into their own group (``lr_scale`` read by :class:`EpochSchedule`), in order of first appearance."""
    t = train
    params = list(params)
    if not params:
        raise VlpromptError(
            "the method has no trainable parameters; evaluate it with `vlprompt eval --method NAME`"
        )
    scales = [1.0] * len(params) if lr_scales is None else [float(s) for s in lr_scales]
    if len(scales) != len(params):
        raise ValueError(f"{len(scales)} lr scales for {len(params)} parameters")
    if any(s != 1.0 for s in scales):
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for p, s in zip(params, scales):
            groups.setdefault(s, []).append(p)
        params = [{"params": ps, "lr_scale": s} for s, ps in groups.items()]  # type: ignore[misc]
    name, lr, wd = t.optimizer, t.lr, t.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, eps=t.eps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, eps=t.eps)
    raise VlpromptError(f"unknown optimizer '{name}'; use sgd, adam or adamw")
