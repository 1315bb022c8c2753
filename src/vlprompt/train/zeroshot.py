"""Zero-shot CLIP inside the run layer: ``fit`` for a method without trainable parameters.

A grid (``vlprompt run --method zeroshot,coop ...``) treats zero-shot CLIP as one more method: its
"training" takes no step and evaluates the hand-crafted prompts, so its runs are planned, fingerprinted,
recorded and reported like every other (the "zero-shot CLIP" row of a base-to-new table).
"""

from __future__ import annotations

from typing import Any

import torch

from vlprompt.train.evaluate import evaluate
from vlprompt.train.trainer import zero_epoch_result


def has_trainable_parameters(model: torch.nn.Module) -> bool:
    return any(True for _ in model.trainable_parameters())


def evaluate_without_training(
    model: torch.nn.Module,
    train_data: Any,
    cfg: Any,
    files: Any = None,
    resume: bool = False,
    *,
    eval_data: Any = None,
    progress: bool = True,
    placement: Any = None,
    **_: Any,
) -> dict[str, Any]:
    """What :func:`vlprompt.train.fit` returns, for zero epochs: the evaluation of the untouched model
    (in fp32; ``device`` as ``fit`` records it: the run's placement, e.g. ``cuda``, not ``cuda:0``)."""
    res = evaluate(model, eval_data, confusion=True, progress=progress) if eval_data is not None else None
    device = placement.device if placement is not None else model.backbone.device
    return zero_epoch_result(res, device, "fp32")
