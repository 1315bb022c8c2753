"""A tiny learnable task for method tests (shared by every method's tests).

A randomly initialised CLIP knows nothing about real images or words, so "learns" can only be
tested on a task whose classes the *frozen random* image tower already separates: each class is a
solid colour far from the others (cube corners in normalised RGB, the first four a tetrahedron)
plus a little pixel noise.  Measured on random ``vlp-tiny``: class-mean image features have cosine
<= 0.54 between classes (random block patterns or pixel noise give >= 0.98, which a text-only
method cannot separate at CLIP's initial logit scale), so any working prompt method -- text side
or image prompts -- can learn it in a few dozen SGD steps.

Use::

    from toy import make_toy_task, train_steps
    images, labels, classnames = make_toy_task(backbone)
    losses, acc = train_steps(model, images, labels, steps=30, lr=0.01, batch_size=8)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOY_CLASSNAMES = ["cat", "dog", "car", "tree", "house", "boat", "bird", "fish", "lamp", "cup", "sun", "hat"]
# cube corners (tetrahedron first, then its mirror), then the six axis points
_COLOURS = [
    (1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1),
    (-1, -1, -1), (-1, 1, 1), (1, -1, 1), (1, 1, -1),
    (1, 0, 0), (0, 1, 0), (0, 0, 1), (-1, 0, 0),
]  # fmt: skip


def make_toy_task(
    backbone, n_classes: int = 4, n_per_class: int = 8, seed: int = 0, noise: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images (N, 3, S, S), labels (N,), classnames)`` with N = n_classes * n_per_class.

    The image size is read from the backbone; the pixel values are already roughly
    normalised (mean 0, std ~1), as the data layer's transform would give.
    """
    if not 2 <= n_classes <= len(TOY_CLASSNAMES):
        raise ValueError(f"toy task has 2..{len(TOY_CLASSNAMES)} classes, got {n_classes}")
    g = torch.Generator().manual_seed(seed)
    size = backbone.preprocess_cfg["size"]
    colours = torch.tensor(_COLOURS[:n_classes], dtype=torch.float32).view(n_classes, 3, 1, 1) * 1.5
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    images = colours[labels].expand(-1, -1, size, size) + noise * torch.randn(
        len(labels), 3, size, size, generator=g
    )
    dev = backbone.device
    return images.to(dev), labels.to(dev), TOY_CLASSNAMES[:n_classes]


def train_steps(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[list[float], float]:
    """Plain SGD (momentum 0.9) on ``model.trainable_parameters()``: ``(per-step losses, final train acc)``.

    Mini-batches come from a seeded reshuffle each pass over the data; the final accuracy is measured
    in eval mode over all ``images``.
    """
    params = [p for p in model.trainable_parameters()]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        acc = float((model(images).argmax(-1) == labels).float().mean())
    return losses, acc
