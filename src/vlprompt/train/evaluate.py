"""Evaluation: top-1 accuracy, macro-F1 and per-class accuracy of a PromptModel on a loader.

Text features are computed once per evaluation (PromptModel caches them while gradients are off and
the prompts are unchanged); image-conditioned methods (CoCoOp) build them per batch.  Macro-F1 follows
the reference evaluator: sklearn's macro average over the labels present in the ground truth.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vlprompt.train.precision import resolve_device, resolve_precision
from vlprompt.train.progress import progress_bar


def scores_from_confusion(conf: torch.Tensor, classnames: list[str]) -> dict[str, Any]:
    """Metrics from a (true, predicted) count matrix; only classes present in the ground truth count."""
    conf = conf.to(torch.float64)
    support = conf.sum(1)
    tp = conf.diag()
    pred = conf.sum(0)
    present = support > 0
    n = int(support.sum().item())
    f1 = torch.where(
        (2 * tp + (pred - tp) + (support - tp)) > 0,
        2 * tp / (2 * tp + (pred - tp) + (support - tp)).clamp_min(1e-300),
        torch.zeros_like(tp),
    )
    per_class = {
        classnames[i]: round(100.0 * float(tp[i] / support[i]), 4)
        for i in range(len(classnames))
        if present[i]
    }
    return {
        "accuracy": 100.0 * float(tp.sum() / max(n, 1)),
        "macro_f1": 100.0 * float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": per_class,
        "n": n,
        "n_classes": len(classnames),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    precision: str = "auto",
    confusion: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy (%), macro_f1 (%), per_class_accuracy {classname: %}, n, n_classes [, confusion].

    ``model`` is a PromptModel (``forward(images) -> logits`` over ``model.classnames``); labels index
    those class names.  ``progress``: a bar over the images (only on a terminal, see
    :func:`vlprompt.train.progress.progress_enabled`).
    """

    dev = resolve_device(device) if device is not None else model.backbone.device
    prec = resolve_precision(precision, dev)
    was_training = model.training
    model.eval()
    c = model.n_classes
    conf = torch.zeros(c, c, dtype=torch.long)
    bar = progress_bar(_n_images(loader), "eval", progress, unit="img")
    try:
        for images, labels in loader:
            with prec.autocast():
                logits = model(images.to(dev, non_blocking=True))
            pred = logits.float().argmax(-1).cpu()
            labels = torch.as_tensor(labels).long().cpu()
            if labels.numel() and (labels.min() < 0 or labels.max() >= c):
                raise ValueError(f"label {int(labels.max())} outside the model's {c} classes")
            conf += torch.bincount(labels * c + pred, minlength=c * c).view(c, c)
            bar.update(int(labels.numel()))
    finally:
        bar.close()
        model.train(was_training)
    out = scores_from_confusion(conf, list(model.classnames))
    if confusion:
        out["confusion"] = conf.tolist()
        out["confusion_sparse"] = sparse_confusion(conf, list(model.classnames))
    return out


def sparse_confusion(conf: torch.Tensor, classnames: list[str]) -> dict[str, Any]:
    """``{"classes": [...], "counts": [[true, predicted, count], ...]}``: the non-zero cells only.

    What metrics.json stores (a 1000-class dense matrix would be a million numbers; the non-zero
    cells are at most one per test image).
    """
    nz = conf.nonzero().tolist()
    return {"classes": list(classnames), "counts": [[i, j, int(conf[i, j])] for i, j in nz]}


def dense_confusion(sparse: dict[str, Any]) -> torch.Tensor:
    """The ``(C, C)`` count matrix back from :func:`sparse_confusion`."""
    c = len(sparse["classes"])
    conf = torch.zeros(c, c, dtype=torch.long)
    for i, j, n in sparse.get("counts", []):
        conf[int(i), int(j)] = int(n)
    return conf


def _n_images(loader: Iterable) -> int | None:
    """How many images ``loader`` yields, when it can tell (a DataLoader over a sized dataset)."""
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None
