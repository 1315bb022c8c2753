"""Training augmentations beyond crop + flip: Dassl's RandAugment and several views of one image.

``RandAugment`` follows the operation list and magnitude rule of the Dassl toolkit's ``RandAugment``
(``dassl/data/transforms/randaugment.py``, ``randaugment_list``), which the CoOp-family trainers
select with ``INPUT.TRANSFORMS: ["randaugment", ...]``: ``n`` operations drawn with replacement from
16, each at value ``m / 30 * (max - min) + min``; geometric ones flip sign with probability 1/2.
Ours: every draw comes from torch's RNG (Dassl uses Python's ``random`` and numpy), so the loader's
seeding (main process: the checkpointed global RNG; workers: seeds from the loader's generator)
makes the views reproducible and resume exact.

``MultiView`` applies one transform per view to the same decoded image and stacks the results:
``(V, 3, H, W)`` per item, ``(B, V, 3, H, W)`` per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms as T

from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD, _check, interpolation_mode


def _flip() -> bool:
    return bool(torch.rand(()) > 0.5)


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs)


def _shear_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, -v if _flip() else v, 0, 0, 1, 0))


def _shear_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, -v if _flip() else v, 1, 0))


def _translate_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, -v if _flip() else v, 0, 1, 0))


def _translate_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, -v if _flip() else v))


def _rotate(img: Image.Image, v: float) -> Image.Image:
    return img.rotate(-v if _flip() else v)


def _solarize_add(img: Image.Image, v: float) -> Image.Image:
    a = np.clip(np.asarray(img).astype(np.float64) + v, 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(a), 128)


def _cutout(img: Image.Image, v: float) -> Image.Image:
    # Dassl draws the centre with numpy's uniform(w) == uniform(low=w, high=1.0): between 1 and w
    w, h = img.size
    x0 = 1.0 + float(torch.rand(())) * (w - 1.0)
    y0 = 1.0 + float(torch.rand(())) * (h - 1.0)
    x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
    out = img.copy()
    ImageDraw.Draw(out).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), (125, 123, 114))
    return out


#: (operation, min, max) in Dassl's ``randaugment_list`` order
RANDAUGMENT_OPS: tuple[tuple[Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    (lambda im, _: ImageOps.autocontrast(im), 0, 1),
    (lambda im, _: ImageOps.equalize(im), 0, 1),
    (lambda im, _: ImageOps.invert(im), 0, 1),
    (_rotate, 0, 30),
    (lambda im, v: ImageOps.posterize(im, int(v)), 4, 8),
    (lambda im, v: ImageOps.solarize(im, v), 0, 256),
    (_solarize_add, 0, 110),
    (lambda im, v: ImageEnhance.Color(im).enhance(v), 0.1, 1.9),
    (lambda im, v: ImageEnhance.Contrast(im).enhance(v), 0.1, 1.9),
    (lambda im, v: ImageEnhance.Brightness(im).enhance(v), 0.1, 1.9),
    (lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 0.1, 1.9),
    (_shear_x, 0.0, 0.3),
    (_shear_y, 0.0, 0.3),
    (_cutout, 0, 40),
    (_translate_x, 0.0, 100),
    (_translate_y, 0.0, 100),
)


class RandAugment:
    """``n`` of Dassl's 16 RandAugment operations (drawn with replacement) at magnitude ``m`` of 30."""

    def __init__(self, n: int = 2, m: int = 10) -> None:
        if not 0 <= m <= 30 or n < 0:
            raise ValueError(f"RandAugment needs n >= 0 and 0 <= m <= 30, got n={n}, m={m}")
        self.n, self.m = int(n), int(m)

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(RANDAUGMENT_OPS), (self.n,)).tolist()
        for i in picks:
            op, lo, hi = RANDAUGMENT_OPS[i]
            img = op(img, (self.m / 30) * (hi - lo) + lo)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m}, ops=dassl)"


def randaugment_transform(
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
    n: int = 2,
    m: int = 10,
    **_: Any,
) -> T.Compose:
    """Dassl's training transform for ``TRANSFORMS: ["randaugment", "normalize"]``: resize to
    ``size x size`` (no crop, no flip), RandAugment(n, m), ToTensor, Normalize."""
    _check(size, mean, std)
    return T.Compose(
        [
            T.Resize((size, size), interpolation=interpolation_mode(interpolation)),
            RandAugment(n, m),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class MultiView:
    """One transform per view of the same image; the views stacked as ``(V, 3, H, W)``."""

    def __init__(self, transforms: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        if len(transforms) < 1:
            raise ValueError("MultiView needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> torch.Tensor:
        return torch.stack([tf(img) for tf in self.transforms])

    def __repr__(self) -> str:
        return f"MultiView({self.transforms!r})"
