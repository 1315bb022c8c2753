"""Runs that learned nothing say so: too few real optimiser steps, or predictions identical to zero-shot.

A short run (few epochs, a batch as large as the few-shot training set, a warm-up epoch that takes
most of the steps) can end exactly where zero-shot CLIP started; its accuracy then looks like a
result.  After training, :func:`learned_nothing` returns one line naming the symptom and the likely
cause (or None); the run log prints it, ``metrics.json`` keeps it (``learned_nothing``), and the grid
summary and the report repeat it (:func:`read_warning`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vlprompt.run.layout import METRICS, RunDir
from vlprompt.utils import atomic_write_json

log = logging.getLogger(__name__)

#: fewer optimiser steps than this at the scheduled (post-warm-up) learning rate -> "learned little"
MIN_STEPS = 20
#: test images compared with zero-shot's predictions (the first ones of the evaluation loader)
MAX_COMPARED = 2048
KEY = "learned_nothing"


def steps_after_warmup(result: dict[str, Any], epochs: int, warmup_epochs: int, warmup_type: str) -> int:
    """Optimiser steps that ran at the scheduled learning rate (after the warm-up epochs)."""
    steps, done = int(result.get("steps") or 0), int(result.get("epochs_done") or 0)
    if done <= 0:
        return 0
    warm = 0 if warmup_type == "none" else min(int(warmup_epochs), done)
    return steps * (done - warm) // done


@torch.no_grad()
def same_predictions(model: torch.nn.Module, zero_shot: torch.nn.Module, loader: Any) -> tuple[bool, int]:
    """Whether ``model`` predicts the class zero-shot predicts on each of the first test images."""
    was = model.training
    model.eval()
    n = 0
    try:
        for images, _ in loader:
            images = images.to(model.backbone.device)
            if not torch.equal(model(images).argmax(-1), zero_shot(images).argmax(-1)):
                return False, n
            n += int(images.shape[0])
            if n >= MAX_COMPARED:
                break
    finally:
        model.train(was)
    return True, n


def learned_nothing(
    result: dict[str, Any], train: Any, model: torch.nn.Module, zero_shot: Any, loader: Any, n_train: int
) -> str | None:
    """One line when the trained ``model`` learned nothing (``zero_shot``: a callable building zero-shot
    CLIP on the same classes), else None."""
    if not result.get("trainable_parameters"):
        return None  # zero-shot itself
    real = steps_after_warmup(result, train.epochs, train.warmup_epochs, train.warmup_type)
    if real < MIN_STEPS:
        return (
            f"learned little: only {real} optimiser steps ran at the scheduled learning rate "
            f"({result.get('steps')} steps in {result.get('epochs_done')} epochs of batch {train.batch_size} "
            f"over {n_train} training images, {train.warmup_epochs} warm-up epoch(s)); "
            "raise --epochs, or lower train.batch_size"
        )
    if loader is None:
        return None
    same, n = same_predictions(model, zero_shot(), loader)
    if same and n:
        return (
            f"learned nothing: predictions equal zero-shot CLIP's on all {n} test images compared; "
            f"likely cause: the learning rate ({train.lr:g}) is too small for this backbone, "
            "or too few epochs"
        )
    return None


def record_warning(run: RunDir, line: str | None) -> None:
    """Keep the line in metrics.json (absent when the run learned)."""
    metrics = run.metrics()
    if line:
        metrics[KEY] = line
    else:
        metrics.pop(KEY, None)
    atomic_write_json(run.path / METRICS, metrics)


def read_warning(run_dir: str | Path) -> str | None:
    """The run's "learned nothing" line, if its training left one."""
    try:
        return RunDir(run_dir).metrics().get(KEY)
    except Exception:  # a run without (readable) metrics has nothing to say here
        return None
