"""Frozen image-feature cache: compute CLIP image features once, reuse them across steps and runs.

Methods whose image side has no prompts (zero-shot, CoOp, CoCoOp -- whose meta-net reads the
frozen feature) see exactly the same image features every time an image is shown with the same
deterministic transform.  Computing them once turns CoOp training into text-tower-only work and lets
every evaluation of such a method on one test set share the image tower's work.

Keys cover everything the features depend on: the backbone (name, tag and a hash of its weights),
the data set, the split, the transform (its ``repr``: sizes, interpolation, mean/std) and the exact
items (relative paths and labels).  Training with random augmentation must NOT use this cache (every
epoch sees a new view); use it at training only with augmentation off or pre-computed views (opt-in).
Features are L2-normalised fp32, identical to :meth:`PromptModel.encode_image` with no image plan.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlprompt.backbones import Backbone
from vlprompt.data import build_loader
from vlprompt.engine import Attention, attention_mode, encode_image
from vlprompt.utils import atomic_write, cache_dir, sha256_json

log = logging.getLogger(__name__)

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def backbone_fingerprint(backbone: Backbone) -> str:
    """sha256 over the backbone's architecture and every weight tensor (memoised per backbone object)."""
    if backbone in _FINGERPRINTS:
        return _FINGERPRINTS[backbone]
    h = hashlib.sha256()
    h.update(repr((backbone.name, backbone.pretrained, backbone.meta.get("quick_gelu"))).encode())
    for name, t in sorted(backbone.clip.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    fp = h.hexdigest()
    _FINGERPRINTS[backbone] = fp
    return fp


def items_digest(items: Sequence[Any]) -> str:
    """Hash of a list of data items (``impath``, ``relpath`` and ``label``), order included."""
    lines = []
    for d in items:
        path = f"{getattr(d, 'impath', '')}\t{getattr(d, 'relpath', '')}" if hasattr(d, "impath") else str(d)
        lines.append(f"{path}\t{getattr(d, 'label', '')}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class FeatureCache:
    """Image features by key, in memory and (when ``root`` is given) as ``<root>/<key>.pt`` files.

    ``hits`` / ``misses`` count lookups, so callers and tests can see that nothing was recomputed.
    Disk files are written atomically; an unreadable file is recomputed, never trusted.
    """

    def __init__(self, root: str | Path | None = None, memory: bool = True):
        self.root = Path(root) if root is not None else None
        self.memory = memory
        self._mem: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def default(cls) -> FeatureCache:
        """A cache under ``cache_dir()/features`` (``$VLPROMPT_HOME``)."""
        return cls(cache_dir() / "features")

    @staticmethod
    def key(
        backbone: Backbone,
        *,
        dataset: str,
        split: str,
        transform: Any,
        items: Sequence[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Cache key: backbone weights, data set, split, transform and the item list."""
        parts = {
            "backbone": backbone_fingerprint(backbone),
            "dataset": str(dataset),
            "split": str(split),
            "transform": transform if isinstance(transform, str) else repr(transform),
            "items": items_digest(items) if items is not None else None,
            "extra": extra or {},
        }
        return sha256_json(parts)[:32]

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                feats = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(feats, torch.Tensor):
                    raise TypeError(f"holds {type(feats).__name__}, not a tensor")
            except Exception as e:  # damaged file: recompute
                log.warning("ignoring unreadable feature cache %s (%s)", path, e)
            else:
                self.hits += 1
                if self.memory:
                    self._mem[key] = feats
                return feats
        self.misses += 1
        return None

    def put(self, key: str, feats: torch.Tensor) -> torch.Tensor:
        """Store ``feats`` (detached, CPU) and return the stored tensor."""
        feats = feats.detach().cpu().contiguous()
        if self.memory:
            self._mem[key] = feats
        path = self._path(key)
        if path is not None:
            atomic_write(path, lambda tmp: torch.save(feats, tmp))
        return feats

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        feats = self.get(key)
        if feats is None:
            feats = self.put(key, compute())
        return feats

    def clear(self) -> None:
        self._mem.clear()


@torch.no_grad()
def frozen_image_features(
    backbone: Backbone, images: torch.Tensor, attention: str | Attention = "sdpa"
) -> torch.Tensor:
    """L2-normalised fp32 features of frozen CLIP (no image prompts) -- as ``PromptModel.encode_image``."""
    feats = encode_image(
        backbone.clip.visual, images.to(backbone.device), None, default_attention=attention_mode(attention)
    )
    return F.normalize(feats.float(), dim=-1)


def image_features(
    backbone: Backbone,
    items: Sequence[Any],
    transform: Any,
    *,
    dataset: str,
    split: str,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, e)`` (CPU, fp32, normalised) and labels ``(N,)`` of ``items`` under ``transform``.

    ``transform`` must be deterministic (the test transform, or augmentation off): the cache cannot
    know about random crops.  With ``cache`` the image tower runs only on a miss.
    """

    labels = torch.tensor([int(d.label) for d in items], dtype=torch.long)

    def compute() -> torch.Tensor:
        loader = build_loader(list(items), transform, batch_size, shuffle=False, num_workers=num_workers)
        out = [frozen_image_features(backbone, x).cpu() for x, _ in loader]
        return torch.cat(out) if out else torch.empty(0, backbone.embed_dim)

    if cache is None:
        return compute(), labels
    key = FeatureCache.key(backbone, dataset=dataset, split=split, transform=transform, items=items)
    return cache.get_or_compute(key, compute), labels


def feature_dataset(
    backbone: Backbone,
    items: Sequence[Any],
    transform: Any,
    *,
    dataset: str,
    split: str,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
) -> torch.utils.data.TensorDataset:
    """``(feature, label)`` pairs for :func:`vlprompt.train.fit` / ``evaluate`` in place of images.

    :meth:`PromptModel.forward` accepts ``(B, e)`` features for methods whose image side has no
    prompts, so the trainer and evaluator run on this dataset unchanged (deterministic transform only).
    """
    feats, labels = image_features(
        backbone, items, transform, dataset=dataset, split=split, cache=cache, batch_size=batch_size
    )
    return torch.utils.data.TensorDataset(feats, labels)
