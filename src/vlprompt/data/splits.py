"""Items, split containers, and reading/writing CoOp split files with validation.

A CoOp split file is ``{"train"|"val"|"test": [[relpath, label, classname], ...]}`` with paths relative
to the data set's image folder. Everything that can be wrong in one (shape, labels with two names,
names that do not match the data set) becomes a one-line :class:`VlpromptError` here, so later stages
can trust the items they get.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write_json, read_json, sha256_json

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(slots=True)
class Datum:
    """One labelled image: ``impath`` is absolute, ``relpath`` is relative to the image folder."""

    impath: str
    label: int
    classname: str
    relpath: str


@dataclass
class DatasetSplits:
    """A data set ready for a protocol: three item lists plus class names ordered by label.

    ``subsample``, ``shots`` and ``seed`` record which protocol transforms were applied
    (``shots == 0`` means the full training split).
    """

    name: str
    root: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    template: str
    image_dir: str = ""
    subsample: str = "all"
    shots: int = 0
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def counts(self) -> dict[str, int]:
        return {s: len(getattr(self, s)) for s in SPLITS}

    def with_(self, **changes: object) -> DatasetSplits:
        """A copy with some fields replaced (the item lists are shared, never mutated)."""
        return replace(self, **changes)


def final_classname(raw: str) -> str:
    """The class name shown to the text encoder: underscores become spaces."""
    return raw.replace("_", " ").strip()


def split_hash(splits: DatasetSplits) -> str:
    """sha256 over (relpath, label) of train/val/test: identifies exactly which items a run used."""
    return sha256_json({s: [[d.relpath, d.label] for d in getattr(splits, s)] for s in SPLITS})


def load_split_json(path: str | os.PathLike) -> dict[str, list[tuple[str, int, str]]]:
    """Parse a split file and check its shape; rows come back as ``(relpath, label, raw classname)``."""
    path = Path(path)
    if not path.is_file():
        raise VlpromptError(f"split file not found: {path}; put the data set's split file there")
    obj = read_json(path, error="split file {path} is not valid JSON ({detail}); replace it with a good copy")
    if not isinstance(obj, dict) or not all(isinstance(obj.get(s), list) for s in SPLITS):
        raise VlpromptError(
            f"split file {path} must be a JSON object with lists 'train', 'val' and 'test'; replace it"
        )
    out: dict[str, list[tuple[str, int, str]]] = {}
    for s in SPLITS:
        rows = []
        for i, row in enumerate(obj[s]):
            ok = (
                isinstance(row, list | tuple)
                and len(row) == 3
                and isinstance(row[0], str)
                and isinstance(row[1], int)
                and not isinstance(row[1], bool)
                and row[1] >= 0
                and isinstance(row[2], str)
            )
            if not ok:
                raise VlpromptError(
                    f"split file {path}: {s}[{i}] = {row!r} is not [relpath, label>=0, classname]; "
                    "fix that row"
                )
            rows.append((row[0], row[1], row[2]))
        out[s] = rows
    if not out["train"]:
        raise VlpromptError(f"split file {path} has an empty 'train' list; add training items")
    return out


def validate_classes(
    rows: dict[str, list[tuple[str, int, str]]],
    source: str,
    *,
    num_classes: int | None = None,
    classnames: Sequence[str] | None = None,
    renames: dict[str, str] | None = None,
    title: str = "this data set",
) -> list[str]:
    """Check label <-> name consistency and return the final class names ordered by label.

    Catches the silent-wrong-result cases: one label with two names, one name with two labels,
    gaps in the labels, labels only in val/test, and names or counts that disagree with the registry.
    """
    lab2name: dict[int, str] = {}
    name2lab: dict[str, int] = {}
    for s in SPLITS:
        for rel, label, name in rows[s]:
            old = lab2name.setdefault(label, name)
            if old != name:
                raise VlpromptError(
                    f"{source}: label {label} has two class names '{old}' and '{name}' (at {s} item {rel}); "
                    "fix the split file so each label has one name"
                )
            old_lab = name2lab.setdefault(name, label)
            if old_lab != label:
                raise VlpromptError(
                    f"{source}: class name '{name}' has two labels {old_lab} and {label}; "
                    "fix the split file so each name has one label"
                )
    labels = sorted(lab2name)
    if labels != list(range(len(labels))):
        gaps = sorted(set(range(labels[-1] + 1)) - set(labels))[:5]
        raise VlpromptError(
            f"{source}: labels must be 0..{len(labels) - 1} without gaps (missing {gaps}); relabel"
        )
    train_labels = {r[1] for r in rows["train"]}
    extra = sorted(set(labels) - train_labels)
    if extra:
        raise VlpromptError(
            f"{source}: labels {extra[:5]} occur in val/test but not in train; "
            "every class needs training items"
        )
    if num_classes is not None and len(labels) != num_classes:
        raise VlpromptError(
            f"{source} has {len(labels)} classes but {title} has {num_classes}; use the official split "
            "file, or load your own split as a custom data set (folder:PATH or csv:PATH)"
        )
    for raw, new in (renames or {}).items():
        if raw != new and raw in name2lab:
            raise VlpromptError(
                f"{source}: class name '{raw}' should be '{new}' for {title}; use the official split file"
            )
    final = [final_classname(lab2name[y]) for y in labels]
    if classnames is not None and sorted(final) != sorted(classnames):
        unknown = sorted(set(final) - set(classnames))[:3]
        raise VlpromptError(
            f"{source}: class names {unknown} are not in {title}'s class list; use the official split file"
        )
    return final


def rows_to_items(rows: Iterable[tuple[str, int, str]], image_dir: str | os.PathLike) -> list[Datum]:
    base = os.path.abspath(image_dir)
    return [Datum(os.path.join(base, rel), label, final_classname(name), rel) for rel, label, name in rows]


def drop_missing(items: list[Datum], skip_bad: bool, source: str, what: str = "images") -> list[Datum]:
    """Fail (or, with ``skip_bad``, drop and log) items whose image file does not exist."""
    missing = [d for d in items if not os.path.isfile(d.impath)]
    if not missing:
        return items
    if not skip_bad:
        raise VlpromptError(
            f"{len(missing)} of {len(items)} {what} listed in {source} are missing, "
            f"first: {missing[0].impath}; "
            "restore them (see `vlprompt data verify`) or pass --skip-bad (skip_bad=True in Python) "
            "to drop them"
        )
    log.warning(
        "dropping %d missing %s listed in %s (first: %s)", len(missing), what, source, missing[0].impath
    )
    gone = {id(d) for d in missing}
    return [d for d in items if id(d) not in gone]


def read_split(
    path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    check_files: bool = True,
    skip_bad: bool = False,
    num_classes: int | None = None,
    classnames: Sequence[str] | None = None,
    renames: dict[str, str] | None = None,
    title: str = "this data set",
) -> tuple[list[Datum], list[Datum], list[Datum], list[str]]:
    """Read and validate a CoOp split file: ``(train, val, test, classnames)``.

    ``check_files=False`` parses without touching the images (for split files shipped without them).
    """
    rows = load_split_json(path)
    names = validate_classes(
        rows,
        f"split file {path}",
        num_classes=num_classes,
        classnames=classnames,
        renames=renames,
        title=title,
    )
    out = [rows_to_items(rows[s], image_dir) for s in SPLITS]
    if check_files:
        out = [drop_missing(items, skip_bad, f"{path} ({s})") for s, items in zip(SPLITS, out)]
    return out[0], out[1], out[2], names


def write_split(
    path: str | os.PathLike,
    train: list[Datum],
    val: list[Datum],
    test: list[Datum],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write items as a CoOp split file (atomically, so a crash never leaves half a split).

    ``extra`` keys (e.g. the listing digest of a custom folder) are stored beside the three lists;
    readers of the CoOp format ignore them.
    """
    obj: dict[str, Any] = {
        s: [[d.relpath, d.label, d.classname] for d in items] for s, items in zip(SPLITS, (train, val, test))
    }
    obj.update(extra or {})
    atomic_write_json(path, obj)
