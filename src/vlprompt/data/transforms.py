"""Image pre-processing with torchvision; sizes and statistics come from the backbone."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vlprompt.errors import VlpromptError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return _INTERP[name.lower()]
    except (KeyError, AttributeError):
        raise VlpromptError(f"unknown interpolation '{name}'; choose one of: {', '.join(_INTERP)}") from None


def _check(size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise VlpromptError(f"image size must be a positive integer, got {size!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise VlpromptError(f"mean/std must be 3 numbers each with std > 0, got {mean!r} / {std!r}")


def eval_resize_crop(size: int = 224, interpolation: str = "bicubic") -> T.Compose:
    """The deterministic PIL part of the test transform (shorter side to ``size``, centre crop)."""
    mode = interpolation_mode(interpolation)
    return T.Compose([T.Resize(size, interpolation=mode), T.CenterCrop(size)])


def build_transform(
    train: bool,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> T.Compose:
    """Train: RandomResizedCrop + horizontal flip; test: Resize + CenterCrop; both ToTensor + Normalize.

    Expects an RGB PIL image (``ImageDataset`` converts); the random ops draw from torch's RNG, so a
    seeded run (and seeded loader workers) gives the same crops.  ``flip=False``: no flip, for data
    sets whose labels say left or right (``registry.training_preprocess``).
    """
    _check(size, mean, std)
    mode = interpolation_mode(interpolation)
    norm = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if train:
        flips = [T.RandomHorizontalFlip()] if flip else []
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=mode), *flips, *norm])
    return T.Compose([*eval_resize_crop(size, interpolation).transforms, *norm])
