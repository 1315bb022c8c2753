"""A user's own images as a data set: ``folder:PATH`` (a sub-folder per class) or ``csv:PATH``.

On first load a seeded, per-class 50/20/30 train/val/test split is written as a CoOp-format JSON --
next to the data (``PATH/split_vlprompt.json`` or ``<csv>.split_vlprompt.json``), or under
``cache_dir()/custom/`` when that folder is read-only -- and reused on every later load, so few-shot,
base/new and evaluation treat the data exactly like a benchmark.  The split records a digest of
the listing it was made from; when the folder (or CSV) gains or loses a class or an image, the split
is rebuilt with a warning, so a changed data set is never evaluated with a stale split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from pathlib import Path

from vlprompt.data.images import is_image_file
from vlprompt.data.splits import DatasetSplits, Datum, final_classname, read_split, write_split
from vlprompt.errors import VlpromptError
from vlprompt.utils import cache_dir, read_json

log = logging.getLogger(__name__)

CUSTOM_SPLIT_SEED = 0
CUSTOM_FRACTIONS = (0.5, 0.2)
CUSTOM_TEMPLATE = "a photo of a {}."
SPLIT_NAME = "split_vlprompt.json"


def parse_custom_name(name: str) -> tuple[str, Path] | None:
    """``("folder"|"csv", path)`` for ``folder:PATH`` / ``csv:PATH`` names, else ``None``."""
    for kind in ("folder", "csv"):
        if name.startswith(kind + ":"):
            path = name[len(kind) + 1 :]
            if not path:
                raise VlpromptError(f"'{name}' has no path; write {kind}:/path/to/data")
            return kind, Path(path).expanduser().resolve()
    return None


def public_name(name: str) -> str:
    """``folder:/home/me/pets`` -> ``folder:pets`` (likewise ``csv:``): what run files, exports and reports
    record, so no machine path leaves the machine; built-in names come back unchanged."""
    for kind in ("folder", "csv"):
        if name.startswith(kind + ":"):
            path = name[len(kind) + 1 :].rstrip("/\\")
            return f"{kind}:{Path(path).name or path}"
    return name


def _utf8(name: str, where: str) -> str:
    """File and folder names are recorded as UTF-8 text (split files, manifests): refuse one that is not."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise VlpromptError(
            f"{where}: the name '{shown}' is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"
        ) from None
    return name


def _scan_folder(root: Path) -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    real: dict[str, str] = {}  # resolved class folder -> class name
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        _utf8(entry.name, f"class folder in {root}")
        target = os.path.realpath(entry.path)
        for other_real, other in real.items():
            if (
                target == other_real
                or target.startswith(other_real + os.sep)
                or other_real.startswith(target + os.sep)
            ):
                raise VlpromptError(
                    f"class folders '{other}' and '{entry.name}' in {root} hold the same images (one links "
                    "to or lies inside the other); remove the link or merge the classes"
                )
        real[target] = entry.name
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [
                _utf8(os.path.relpath(os.path.join(dirpath, f), root), f"image in {root}")
                for f in sorted(filenames)
                if is_image_file(f)
            ]
        if not files:
            raise VlpromptError(f"class folder {entry.path} has no images; add images or remove the folder")
        classes[entry.name] = files
    _refuse_shared_files(root, classes)
    return classes


def _refuse_shared_files(base: Path, classes: dict[str, list[str]]) -> None:
    """One image file (after links) listed twice -- under two labels or two spellings -- would land in
    train and test at once: refused, naming both entries."""
    seen: dict[str, tuple[str, str]] = {}
    for label, files in classes.items():
        for rel in files:
            key = os.path.realpath(os.path.join(base, rel))
            if key in seen:
                other_rel, other_label = seen[key]
                raise VlpromptError(
                    f"{base}: '{other_rel}' ({other_label}) and '{rel}' ({label}) are the same image file; "
                    "keep it once, under one label"
                )
            seen[key] = (rel, label)


def _csv_relpath(raw: str, base: Path, where: str) -> str:
    """A CSV row's image path as a normalised path relative to the CSV's folder; refused when it points
    outside that folder (absolute elsewhere, or ``..``)."""
    p = Path(raw).expanduser()
    rel = os.path.relpath(os.path.normpath(p if p.is_absolute() else base / p), base)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise VlpromptError(
            f"{where}: image '{raw}' lies outside the data folder {base}; give paths inside it (relative "
            "to the CSV)"
        )
    return rel


def _scan_csv(path: Path) -> dict[str, list[str]]:
    classes: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VlpromptError(
            f"cannot read CSV {path} ({e}); give a UTF-8 CSV with rows 'path,label'"
        ) from None
    if rows and [c.strip().lower() for c in rows[0]] == ["path", "label"]:
        rows = rows[1:]
    for n, row in enumerate(rows, 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise VlpromptError(f"{path} row {n}: expected 'path,label', got {row!r}; fix that row")
        raw, label = row[0].strip(), row[1].strip()
        rel = _csv_relpath(raw, base, f"{path} row {n}")
        if rel in seen:
            raise VlpromptError(
                f"{path} rows {seen[rel]} and {n} name the same image {rel}; keep one row per image"
            )
        seen[rel] = n
        classes.setdefault(label, []).append(rel)
    classes = dict(sorted(classes.items()))
    _refuse_shared_files(base, classes)
    return classes


def _split(classes: dict[str, list[str]], base: Path) -> list[list[Datum]]:
    rng = random.Random(CUSTOM_SPLIT_SEED)
    out: list[list[Datum]] = [[], [], []]
    for label, (raw, files) in enumerate(classes.items()):
        files = list(files)
        rng.shuffle(files)
        n_tr = max(1, round(len(files) * CUSTOM_FRACTIONS[0]))
        n_va = round(len(files) * CUSTOM_FRACTIONS[1])
        name = final_classname(raw)
        if len(files) - n_tr - n_va <= 0:
            log.warning("class '%s' has only %d images: none go to the test split", raw, len(files))
        for part, chunk in enumerate((files[:n_tr], files[n_tr : n_tr + n_va], files[n_tr + n_va :])):
            out[part] += [Datum(str(base / r), label, name, r) for r in chunk]
    return out


LISTING_KEY = "vlprompt_listing_sha256"


def listing_digest(classes: dict[str, list[str]]) -> str:
    """sha256 of the class -> files listing a split was made from (a change means a new split)."""
    return hashlib.sha256(json.dumps(classes, sort_keys=True).encode()).hexdigest()


def _stored_digest(split_file: Path) -> str | None:
    obj = read_json(split_file, None)
    value = obj.get(LISTING_KEY) if isinstance(obj, dict) else None
    return str(value) if value else None


def _split_paths(kind: str, path: Path) -> list[Path]:
    local = path / SPLIT_NAME if kind == "folder" else path.with_name(f"{path.name}.{SPLIT_NAME}")
    cached = cache_dir() / "custom" / hashlib.sha256(str(path).encode()).hexdigest()[:16] / SPLIT_NAME
    return [local, cached]


def _meant_writable(folder: Path) -> bool:
    """The folder may be written to and someone is meant to: root passes every access check, so a
    folder whose mode grants no write (``dr-xr-xr-x``, shared data) counts as read-only too."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def load_custom(kind: str, path: Path, skip_bad: bool = False) -> DatasetSplits:
    """Load (splitting on first use) a custom data set; see the module docstring for the layout."""
    if kind == "folder" and not path.is_dir():
        raise VlpromptError(
            f"custom data folder not found: {path}; give a folder with one sub-folder per class"
        )
    if kind == "csv" and not path.is_file():
        raise VlpromptError(f"custom CSV not found: {path}; give a CSV file with rows 'path,label'")
    base = path if kind == "folder" else path.parent
    name = f"{kind}:{path}"
    split_file = next((p for p in _split_paths(kind, path) if p.is_file()), None)
    classes = _scan_folder(path) if kind == "folder" else _scan_csv(path)
    digest = listing_digest(classes)
    if split_file is not None:
        stored = _stored_digest(split_file)
        if stored != digest:
            log.warning(
                "%s changed since its split %s was made (%s); writing a new split",
                name,
                split_file,
                "no listing recorded"
                if stored is None
                else f"now {len(classes)} classes, {sum(len(v) for v in classes.values())} images",
            )
            split_file = None
    if split_file is None:
        if len(classes) < 2:
            found = ", ".join(classes) or "none"
            raise VlpromptError(
                f"{name} has {len(classes)} class(es) ({found}); a classifier needs at least 2 -- add a "
                "sub-folder (or label) per class"
            )
        parts = _split(classes, base)
        for split_file in _split_paths(kind, path):
            if split_file.parent.is_dir() and not _meant_writable(split_file.parent):
                continue  # a folder made read-only (root could still write there): the cache instead
            try:
                write_split(split_file, *parts, extra={LISTING_KEY: digest})
                break
            except OSError:
                continue
        else:
            raise VlpromptError(f"cannot write a split file for {name}; make {cache_dir()} writable")
        log.info("wrote a new split for %s to %s", name, split_file)
    train, val, test, classnames = read_split(split_file, base, skip_bad=skip_bad, title=name)
    if not test:
        biggest = max((len(v) for v in classes.values()), default=0)
        raise VlpromptError(
            f"{public_name(name)} has no test images: with a 50/20/30 split a class needs at least 4 images "
            f"(the largest has {biggest}); add images"
        )
    return DatasetSplits(
        name=name,
        root=str(base),
        train=train,
        val=val,
        test=test,
        classnames=classnames,
        template=CUSTOM_TEMPLATE,
        image_dir=str(base),
        extra={"split_file": str(split_file)},
    )
