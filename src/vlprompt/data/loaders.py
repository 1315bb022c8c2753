"""Torch datasets and loaders over :class:`Datum` items (the on-disk pixel cache: ``image_cache``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlprompt.data.image_cache import CachedImageDataset, cached_eval_entry
from vlprompt.data.images import load_rgb
from vlprompt.data.splits import Datum
from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD, build_transform
from vlprompt.errors import VlpromptError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """``(transform(rgb_image), label)`` per item; a bad image raises a one-line error naming the file."""

    def __init__(self, items: Sequence[Datum], transform: Callable[[Any], Any] | None = None) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        d = self.items[i]
        img = load_rgb(d.impath)
        return (self.transform(img) if self.transform is not None else img), d.label


class _Loader(DataLoader):
    """DataLoader that turns a worker's multi-line re-raised VlpromptError back into one line."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except VlpromptError as e:
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                last = lines[-1] if lines else ""
                raise VlpromptError(last.split("VlpromptError: ", 1)[-1]) from None
            yield batch


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy seeds from it too
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def build_loader(
    items: Sequence[Datum] | Dataset,
    transform: Callable[[Any], Any] | None,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling (and worker augmentation seeds) depend only on ``seed``.

    ``items`` may also be a ready Dataset (e.g. from ``cached_eval_dataset``), then ``transform`` is
    ignored; with ``transform=None`` a sequence of ``(tensor, label)`` pairs is used as it is.
    """
    if isinstance(items, Dataset) or transform is None:
        ds = items
    else:
        ds = ImageDataset(items, transform)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return _Loader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=g,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def cached_eval_dataset(
    items: Sequence[Datum],
    key: str,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
) -> Dataset:
    """Test items decoded and resized/cropped once (the shared :mod:`vlprompt.data.image_cache`).

    Gives the same tensors as ``ImageDataset(items, build_transform(False, ...))``: the deterministic PIL
    part is cached as uint8 and ToTensor/Normalize run on load. ``key`` names the use (e.g.
    ``"caltech101/test/new"``). With the cache disabled this is the plain decoding dataset.
    """

    entry = cached_eval_entry(items, key, "", size, interpolation)
    if entry is None:
        return ImageDataset(items, build_transform(False, size, mean, std, interpolation))
    return CachedImageDataset(entry, mean, std)
