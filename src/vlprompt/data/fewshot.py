"""Few-shot sampling that reproduces the reference toolkit's picks bit for bit.

The reference (Dassl's ``generate_fewshot_dataset`` as CoOp calls it) seeds python/numpy/torch,
groups items by label in order of first appearance, and calls ``random.sample(group, K)`` per group
(all items when a group is smaller) -- train first, then val with ``min(K, 4)``. Picks are cached as
JSON of relative paths under ``cache_dir()/fewshot/`` so reruns and other tools see the same items.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence

from vlprompt.data.splits import DatasetSplits, Datum, split_hash
from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write_json, cache_dir, set_seed

log = logging.getLogger(__name__)


def sample_per_class(items: Sequence[Datum], k: int, source: str = "") -> list[Datum]:
    """``random.sample(group, k)`` per label group (first-appearance order), with the global RNG."""
    groups: dict[int, list[Datum]] = {}
    for d in items:
        groups.setdefault(d.label, []).append(d)
    out: list[Datum] = []
    short = 0
    for group in groups.values():
        if len(group) >= k:
            out.extend(random.sample(group, k))
        else:
            short += 1
            out.extend(group)
    if short:
        log.warning(
            "%s: %d classes have fewer than %d images; using all of theirs", source or "few-shot", short, k
        )
    return out


def _cache_path(splits: DatasetSplits, shots: int, seed: int, digest: str):
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", splits.name).strip("_")[:60] or "dataset"
    return cache_dir() / "fewshot" / safe / f"shot{shots}-seed{seed}-{digest[:16]}.json"


def _from_relpaths(items: list[Datum], relpaths: list[str]) -> list[Datum] | None:
    index: dict[str, Datum] = {}
    for d in items:
        index.setdefault(d.relpath, d)
    try:
        return [index[r] for r in relpaths]
    except KeyError:
        return None


def fewshot(splits: DatasetSplits, shots: int, seed: int, *, use_cache: bool = True) -> DatasetSplits:
    """K-shot train (and ``min(K, 4)``-shot val) picked exactly as the reference; test is unchanged.

    Sample before base/new subsampling (the reference does). As a side effect the global RNGs are
    re-seeded with ``seed`` (``set_seed``) and advanced by the draws, whether the picks are sampled
    or read from the cache (a hit replays the draws), so what runs next sees the same RNG state.
    ImageNet's val is its test set and is left whole, as in CoOp.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise VlpromptError(f"shots must be a positive integer, got {shots!r}; use one of 1, 2, 4, 8, 16")
    if splits.shots:
        raise VlpromptError(
            f"{splits.name} is already a {splits.shots}-shot split; sample from the full data set"
        )
    if not splits.train:
        raise VlpromptError(f"{splits.name} has no training split (test only); few-shot needs a training set")
    most = max(Counter(d.label for d in splits.train).values())
    if shots > most:  # refused, not capped: the run's folder and fingerprint would claim K shots
        raise VlpromptError(
            f"--shots {shots} is more than any class of {splits.name} has for training (at most {most} "
            f"images); use --shots {most} or fewer, or --shots 0 for the full training split"
        )
    sample_val = splits.extra.get("fewshot_val", True)
    set_seed(seed)
    digest = split_hash(splits)
    path = _cache_path(splits, shots, seed, digest)
    train = val = None
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            train = _from_relpaths(splits.train, cached["train"])
            val = _from_relpaths(splits.val, cached["val"]) if sample_val else splits.val
        except (OSError, ValueError, KeyError, TypeError):
            train = val = None
        if train is None or val is None:
            log.warning("ignoring stale few-shot cache %s", path)
        else:  # replay the draws: a cache hit leaves the global RNGs exactly as sampling does
            sample_per_class(splits.train, shots, f"{splits.name} train")
            if sample_val:
                sample_per_class(splits.val, min(shots, 4), f"{splits.name} val")
    if train is None or val is None:
        train = sample_per_class(splits.train, shots, f"{splits.name} train")
        val = sample_per_class(splits.val, min(shots, 4), f"{splits.name} val") if sample_val else splits.val
        if use_cache:
            atomic_write_json(
                path,
                {
                    "dataset": splits.name,
                    "shots": shots,
                    "seed": seed,
                    "split_hash": digest,
                    "train": [d.relpath for d in train],
                    "val": [d.relpath for d in val] if sample_val else None,
                },
            )
    return splits.with_(train=train, val=val, shots=shots, seed=seed)
