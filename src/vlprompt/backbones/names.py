"""Model names as researchers write them, and the catalogue of what can be loaded.

The official repositories and papers spell CLIP models the OpenAI way (``ViT-B/16``, ``RN50``,
``ViT-L/14@336px``); open_clip spells them ``ViT-B-16``, ``RN50``, ``ViT-L-14-336``.
:func:`canonical_model_name` turns the first into the second (and fixes the case of an open_clip
name), so every place that takes a model name accepts both.  :func:`list_models` is the catalogue
``vlprompt models`` prints: architectures, their pretrained tags, the weights bundled with vlprompt
and the tags already in the local cache, each with what it needs before it can be loaded.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import open_clip

from vlprompt.backbones.bundled import TAG, bundled_names
from vlprompt.backbones.loading import _cached_pretrained_file, canonical_model_name, list_architectures

#: what a catalogue row needs before it loads
NEEDS_NOTHING = "nothing"  # bundled weights, or a tag already in the local cache
NEEDS_DOWNLOAD = "download"  # an open_clip tag not cached yet (a network, once)
NEEDS_FILE = "file"  # an architecture with no published tag: pass --weights FILE (or use random init)


@dataclass(frozen=True)
class ModelEntry:
    """One loadable thing: an architecture with a tag (or bundled weights, or none at all)."""

    architecture: str
    tag: str | None  # open_clip pretrained tag, "bundled", or None (no published weights)
    source: str  # "bundled" | "cached" | "open_clip" | "none"
    needs: str  # NEEDS_NOTHING | NEEDS_DOWNLOAD | NEEDS_FILE
    openai_name: str | None = None  # the OpenAI / papers' spelling, where one exists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _openai_spelling(arch: str) -> str | None:
    m = re.match(r"^(ViT-[A-Za-z]+)-(\d+)(?:-(\d+))?$", arch)
    if m:
        return f"{m.group(1)}/{m.group(2)}" + (f"@{m.group(3)}px" if m.group(3) else "")
    return arch if re.match(r"^RN\d+(x\d+)?$", arch) else None


def list_models(filter: str | None = None, *, check_cache: bool = True) -> list[ModelEntry]:
    """Every architecture and pretrained tag vlprompt can load, with what each needs.

    ``filter``: keep architectures whose name contains it (case-insensitive; OpenAI spellings work).
    ``check_cache``: look in the local caches for downloaded tags (``needs="nothing"`` then).
    """
    want = None
    if filter:
        want = (canonical_model_name(filter) or filter).lower()
    bundled = set(bundled_names())
    rows: list[ModelEntry] = []
    for arch in sorted(list_architectures(), key=str.lower):
        if want and want not in arch.lower():
            continue
        alias = _openai_spelling(arch)
        if arch in bundled:
            rows.append(ModelEntry(arch, TAG, "bundled", NEEDS_NOTHING, alias))
            continue
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            rows.append(ModelEntry(arch, None, "none", NEEDS_FILE, alias))
        for tag in tags:
            cached = False
            if check_cache:
                try:
                    pcfg = open_clip.get_pretrained_cfg(arch, tag)
                    cached = _cached_pretrained_file(pcfg, None) is not None
                except Exception:  # a malformed cache entry is "not cached"
                    cached = False
            rows.append(
                ModelEntry(
                    arch,
                    tag,
                    "cached" if cached else "open_clip",
                    NEEDS_NOTHING if cached else NEEDS_DOWNLOAD,
                    alias,
                )
            )
    return rows
