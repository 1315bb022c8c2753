"""Torch datasets and loaders over :class:`Datum` items, plus an exact on-disk cache of test tensors."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from vlprompt.data.images import load_rgb
from vlprompt.data.splits import Datum
from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD, eval_resize_crop
from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write, cache_dir

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


class CachedEvalDataset(Dataset):
    """Pre-cropped uint8 pixels; ``__getitem__`` scales like ToTensor and normalises like the transform."""

    def __init__(
        self, pixels: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]
    ):
        self.pixels = pixels
        self.labels = labels
        self.normalize = T.Normalize(mean=list(mean), std=list(std))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.pixels[i].to(dtype=torch.get_default_dtype()).div(255)
        return self.normalize(x), int(self.labels[i])


def cached_eval_dataset(
    items: Sequence[Datum],
    key: str,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
) -> CachedEvalDataset:
    """Test items decoded and resized/cropped once, kept in ``cache_dir()/tensors/`` for later evaluations.

    Gives the same tensors as ``ImageDataset(items, build_transform(False, ...))``: the deterministic PIL
    part is cached as uint8 and ToTensor/Normalize run on load. ``key`` names the use (e.g.
    ``"caltech101/test/new"``); the file name also hashes the items and transform parameters, so a changed
    split or size never reuses stale pixels. Costs 3*size*size bytes per image on disk.
    """
    ident = {
        "key": key,
        "size": size,
        "interpolation": interpolation,
        "items": hashlib.sha256("\n".join(f"{d.relpath}\t{d.label}" for d in items).encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "tensors" / f"{digest}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["pixels"].shape[0] == len(items):
                return CachedEvalDataset(blob["pixels"], blob["labels"], mean, std)
        except Exception as e:  # a damaged cache file is rebuilt, never trusted
            log.warning("rebuilding unreadable tensor cache %s (%s)", path, e)
    crop = eval_resize_crop(size, interpolation)
    pixels = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    for i, d in enumerate(items):
        pixels[i] = torch.from_numpy(np.array(crop(load_rgb(d.impath)), dtype=np.uint8)).permute(2, 0, 1)
    labels = torch.tensor([d.label for d in items], dtype=torch.long)
    atomic_write(path, lambda tmp: torch.save({"pixels": pixels, "labels": labels, "ident": ident}, tmp))
    return CachedEvalDataset(pixels, labels, mean, std)
