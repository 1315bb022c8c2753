"""Decode once, evaluate many: a shared on-disk cache of preprocessed images.

Every run of a grid evaluates on the same test images (ImageNet's 50,000, SUN397's 19,850, ...), once
per method and seed; decoding JPEGs and resizing them dominates a short evaluation. This cache stores
each image **after the deterministic part of its transform** as uint8 pixels and serves them to every
later evaluation, which only scales and normalises them -- on the device, batch-wise, with the same
float operations as ``ToTensor`` + ``Normalize`` (so results are bit-identical to the uncached path).

* **Entries** are keyed by data set, split, transform (size, interpolation, crop) and a digest of the
  items (relative path, label, file size and mtime): a changed split or a replaced image file gives a
  new key, never stale pixels. One entry = ``<key>.u8`` (raw HWC uint8 rows, concatenated) +
  ``<key>.json`` (identity, shapes, labels, sha256 of the pixel file). Nothing is unpickled.
* **Location**: ``$VLPROMPT_IMAGE_CACHE`` (a directory; ``off`` disables the cache), else
  ``<cache dir>/images`` (``$VLPROMPT_HOME`` or ``~/.cache/vlprompt``).
* **Bounded**: ``$VLPROMPT_IMAGE_CACHE_GB`` (default 50) caps the total; least-recently-used entries
  are deleted after a build; an entry larger than the cap is not cached (the caller decodes as before).
* **Concurrency-safe**: an exclusive ``flock`` per key while an entry is checked or built (two jobs of a
  grid wanting the same test set build it once); files are written atomically; readers memory-map the
  pixel file, which a later rebuild replaces by rename and never overwrites in place.
* **Verified**: the first use in a process checks the file size and the sha256; a corrupt, truncated
  or half-written entry is rebuilt with a warning.

Training images are cached *decoded* (full resolution, before augmentation), because random crops and
flips must still see the original pixels; :class:`CachedDecodedDataset` then applies the same random
transform to the same PIL image the uncached path would decode, so augmentation is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlprompt.data.images import load_rgb
from vlprompt.data.splits import Datum
from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD, eval_resize_crop
from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write, atomic_write_json, cache_dir, file_lock

log = logging.getLogger(__name__)

ENV_DIR = "VLPROMPT_IMAGE_CACHE"
ENV_MAX_GB = "VLPROMPT_IMAGE_CACHE_GB"
DEFAULT_MAX_GB = 50.0
VERSION = 1
_VERIFIED: set[tuple[str, float, int]] = set()  # (data file, mtime, size) checked in this process


def default_dir() -> Path | None:
    """``$VLPROMPT_IMAGE_CACHE`` (``off``/``0``/``none`` = disabled), else ``<cache dir>/images``."""
    env = os.environ.get(ENV_DIR, "").strip()
    if env.lower() in ("off", "0", "none", "false", "no"):
        return None
    return Path(env).expanduser() if env else cache_dir() / "images"


def max_bytes_from_env() -> int:
    text = os.environ.get(ENV_MAX_GB, "").strip()
    try:
        gb = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        raise VlpromptError(
            f"{ENV_MAX_GB}={text!r} is not a number; give the cache cap in GB, e.g. 50"
        ) from None
    if not gb >= 0:
        raise VlpromptError(f"{ENV_MAX_GB}={text!r} must be >= 0 (GB)")
    return int(gb * 1e9)


def items_digest(items: Sequence[Datum]) -> str:
    """sha256 over each item's relative path, label, file size and mtime (a replaced file changes it)."""
    h = hashlib.sha256()
    for d in items:
        try:
            st = os.stat(d.impath)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{d.relpath}\t{d.label}\t{stamp}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One cached image list: pixel file, per-item shapes (H, W, 3) and byte offsets, labels."""

    data: Path
    shapes: list[tuple[int, int, int]]
    offsets: list[int]
    labels: list[int]
    key: str

    def __len__(self) -> int:
        return len(self.labels)


class ImageCache:
    """A directory of cached image lists (see the module docstring for layout and guarantees)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes_from_env() if max_bytes is None else int(max_bytes)
        self.hits = 0
        self.builds = 0

    @classmethod
    def default(cls) -> ImageCache | None:
        """The cache at the documented location, or ``None`` when disabled."""
        root = default_dir()
        return None if root is None else cls(root)

    # ---------------------------------------------------------------- keys and files
    @staticmethod
    def key(ident: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        return self.root / f"{key}.u8", self.root / f"{key}.json", self.root / f"{key}.lock"

    def _load(self, key: str, ident: dict[str, Any]) -> Entry | None:
        data, header, _ = self._paths(key)
        if not data.is_file() or not header.is_file():
            return None
        try:
            head = json.loads(header.read_text(encoding="utf-8"))
            if head.get("version") != VERSION or head.get("ident") != ident:
                raise ValueError("identity differs")
            st = data.stat()
            if st.st_size != int(head["nbytes"]):
                raise ValueError(f"pixel file has {st.st_size} bytes, header says {head['nbytes']}")
            stamp = (str(data), st.st_mtime, st.st_size)
            if stamp not in _VERIFIED:
                if _sha256(data) != head["sha256"]:
                    raise ValueError("checksum mismatch")
                _VERIFIED.add(stamp)
            shapes = [tuple(int(v) for v in s) for s in head["shapes"]]
            entry = Entry(data, shapes, _offsets(shapes), [int(v) for v in head["labels"]], key)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            log.warning("image cache entry %s is damaged or stale (%s); rebuilding it", data, e)
            return None
        os.utime(header)  # recently used: evicted last
        return entry

    # ---------------------------------------------------------------- main entry point
    def get(
        self,
        items: Sequence[Datum],
        ident: dict[str, Any],
        decode: Callable[[Datum], np.ndarray],
        workers: int = 1,
        estimate_bytes: Callable[[], int] | None = None,
    ) -> Entry | None:
        """The entry for ``ident`` (built from ``decode(item)`` HWC uint8 arrays if absent or damaged).

        ``None`` when the entry would not fit the cap (``estimate_bytes()`` decides before a build).
        """
        ident = {**ident, "items": items_digest(items), "n": len(items)}
        key = self.key(ident)
        data, header, lock = self._paths(key)
        with file_lock(lock):
            entry = self._load(key, ident)
            if entry is not None:
                self.hits += 1
                return entry
            need = estimate_bytes() if estimate_bytes is not None else 0
            if need > self.max_bytes:
                log.info(
                    "image cache: %s/%s would need %.1f GB > cap %.1f GB (%s); not cached",
                    ident.get("dataset"),
                    ident.get("split"),
                    need / 1e9,
                    self.max_bytes / 1e9,
                    ENV_MAX_GB,
                )
                return None
            entry = self._build(items, ident, key, decode, workers)
            self.builds += 1
        self._evict(keep=key)
        return entry if entry.data.is_file() else None

    def _build(
        self, items: Sequence[Datum], ident: dict[str, Any], key: str, decode: Callable, workers: int
    ) -> Entry:
        data, header, _ = self._paths(key)
        shapes: list[tuple[int, int, int]] = []
        digest = hashlib.sha256()
        log.info(
            "image cache: decoding %d images of %s/%s once",
            len(items),
            ident.get("dataset"),
            ident.get("split"),
        )

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f, ThreadPoolExecutor(max(1, int(workers))) as pool:
                for arr in pool.map(decode, items):
                    arr = np.ascontiguousarray(arr, dtype=np.uint8)
                    if arr.ndim != 3 or arr.shape[2] != 3:
                        raise VlpromptError(f"image cache expects HxWx3 uint8 pixels, got {arr.shape}")
                    shapes.append(tuple(int(v) for v in arr.shape))
                    buf = arr.tobytes()
                    digest.update(buf)
                    f.write(buf)

        atomic_write(data, write)
        nbytes = data.stat().st_size
        head = {
            "version": VERSION,
            "ident": ident,
            "nbytes": nbytes,
            "sha256": digest.hexdigest(),
            "shapes": [list(s) for s in shapes],
            "labels": [int(d.label) for d in items],
        }
        atomic_write_json(header, head)
        st = data.stat()
        _VERIFIED.add((str(data), st.st_mtime, st.st_size))
        return Entry(data, shapes, _offsets(shapes), list(head["labels"]), key)

    def _evict(self, keep: str) -> None:
        """Delete least-recently-used entries until the total fits ``max_bytes`` (``keep`` last of all)."""
        entries = []
        for header in self.root.glob("*.json"):
            data = header.with_suffix(".u8")
            try:
                entries.append((header.stat().st_mtime, header.stem, data.stat().st_size, header, data))
            except OSError:
                continue
        total = sum(e[2] for e in entries)
        for _, stem, size, header, data in sorted(entries, key=lambda e: (e[1] == keep, e[0])):
            if total <= self.max_bytes:
                break
            with file_lock(self.root / f"{stem}.lock"):
                for p in (header, data):
                    with contextlib.suppress(OSError):
                        p.unlink()
            total -= size
            log.info(
                "image cache: evicted %s (%.2f GB) to stay under %.1f GB",
                stem,
                size / 1e9,
                self.max_bytes / 1e9,
            )

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.u8")) if self.root.is_dir() else 0


def _offsets(shapes: Sequence[tuple[int, int, int]]) -> list[int]:
    out, pos = [], 0
    for h, w, c in shapes:
        out.append(pos)
        pos += h * w * c
    return out


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _Pixels:
    """Lazily memory-mapped pixel rows (opened per process, so loader workers never copy the file)."""

    def __init__(self, entry: Entry):
        self.entry = entry
        self._mm: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"entry": self.entry, "_mm": None}

    def row(self, i: int) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.entry.data, dtype=np.uint8, mode="r")
        h, w, c = self.entry.shapes[i]
        off = self.entry.offsets[i]
        return np.array(self._mm[off : off + h * w * c]).reshape(h, w, c)


class CachedImageDataset(Dataset):
    """Cached evaluation pixels: ``(uint8 (3, H, W) tensor, label)``, or normalised like the test
    transform's ``ToTensor`` + ``Normalize`` when ``mean``/``std`` are given (per item, on the CPU)."""

    def __init__(self, entry: Entry, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.pixels = _Pixels(entry)
        self.labels = entry.labels
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.pixels.row(i)).permute(2, 0, 1)
        if self.mean is not None and self.std is not None:
            x = normalize(x.unsqueeze(0), self.mean, self.std)[0]
        return x, self.labels[i]


class CachedDecodedDataset(Dataset):
    """Cached *decoded* training images: ``(transform(PIL image), label)`` with the uncached pixels."""

    def __init__(self, entry: Entry, transform: Callable[[Any], Any]):
        self.pixels = _Pixels(entry)
        self.labels = entry.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.pixels.row(i), "RGB")), self.labels[i]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> the floats ``ToTensor`` + ``Normalize`` give (same ops, same order)."""
    x = x.to(dtype=torch.get_default_dtype()).div(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class DeviceNormalizeLoader(DataLoader):
    """Batches of cached uint8 pixels moved to ``device`` and normalised there (4x less to copy)."""

    def __init__(self, dataset: CachedImageDataset, mean, std, device, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.norm_mean, self.norm_std = tuple(mean), tuple(std)
        self.norm_device = torch.device(device) if device is not None else torch.device("cpu")

    def __iter__(self):
        for x, y in super().__iter__():
            yield normalize(x.to(self.norm_device, non_blocking=True), self.norm_mean, self.norm_std), y


def eval_ident(dataset: str, split: str, size: int, interpolation: str) -> dict[str, Any]:
    return {
        "kind": "eval",
        "dataset": dataset,
        "split": split,
        "size": int(size),
        "interpolation": str(interpolation),
        "crop": "resize-shorter+center",
    }


def cached_eval_entry(
    items: Sequence[Datum],
    dataset: str,
    split: str = "test",
    size: int = 224,
    interpolation: str = "bicubic",
    cache: ImageCache | None = None,
    workers: int = 1,
) -> Entry | None:
    """The cached resize + centre-crop pixels of ``items`` (built on first use); ``None`` if disabled."""
    cache = cache if cache is not None else ImageCache.default()
    if cache is None or not items:
        return None
    crop = eval_resize_crop(size, interpolation)

    def decode(d: Datum) -> np.ndarray:
        return np.asarray(crop(load_rgb(d.impath)), dtype=np.uint8)

    ident = eval_ident(dataset, split, size, interpolation)
    return cache.get(items, ident, decode, workers, estimate_bytes=lambda: len(items) * 3 * size * size)


def cached_eval_loader(
    items: Sequence[Datum],
    preprocess: dict[str, Any],
    batch_size: int,
    *,
    dataset: str,
    split: str = "test",
    device: Any = None,
    num_workers: int = 0,
    cache: ImageCache | None = None,
) -> DataLoader | None:
    """An evaluation loader over cached pixels, normalised on ``device``; ``None`` when the cache is off
    (or the set exceeds the cap) so the caller builds its usual decoding loader.

    ``preprocess`` is the backbone's ``preprocess_cfg`` (size, mean, std, interpolation). Batches equal
    the uncached ``build_loader(items, build_transform(False, **preprocess), ...)`` batches exactly.
    """
    size, interp = int(preprocess.get("size", 224)), str(preprocess.get("interpolation", "bicubic"))
    entry = cached_eval_entry(items, dataset, split, size, interp, cache, workers=max(1, num_workers))
    if entry is None:
        return None
    return DeviceNormalizeLoader(
        CachedImageDataset(entry),
        preprocess.get("mean", CLIP_MEAN),
        preprocess.get("std", CLIP_STD),
        device,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )


def cached_train_dataset(
    items: Sequence[Datum],
    transform: Callable[[Any], Any],
    *,
    dataset: str,
    split: str = "train",
    cache: ImageCache | None = None,
    workers: int = 1,
) -> CachedDecodedDataset | None:
    """Few-shot training images decoded once (full resolution); augmentation runs per step as before.

    Same items, same PIL pixels, same random transform: batches equal the uncached loader's for the
    same seed. ``None`` when the cache is off or the images exceed the cap.
    """
    cache = cache if cache is not None else ImageCache.default()
    if cache is None or not items:
        return None

    def decode(d: Datum) -> np.ndarray:
        return np.asarray(load_rgb(d.impath), dtype=np.uint8)

    def estimate() -> int:  # header reads only: the decoded size of every image

        total = 0
        for d in items:
            with contextlib.suppress(OSError), Image.open(d.impath) as im:
                total += im.size[0] * im.size[1] * 3
        return total

    ident = {"kind": "decoded", "dataset": dataset, "split": split}
    entry = cache.get(items, ident, decode, workers, estimate_bytes=estimate)
    return None if entry is None else CachedDecodedDataset(entry, transform)
