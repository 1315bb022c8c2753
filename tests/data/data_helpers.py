"""Tiny on-disk data sets for tests (a few PNG/JPEG files written with PIL)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from vlprompt.data.registry import EUROSAT_CLASSNAMES


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size=(40, 30), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def class_folders(root: Path, classes: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_image(root / name / f"img{i}.png", color=(20 * c, 10 * i, 100))
    return root


def fake_eurosat(root: Path, per_class: int = 1, names: list[str] | None = None) -> Path:
    """A minimal EuroSAT layout (10 classes, ``per_class`` image per split) with its split file."""
    ddir = root / "eurosat"
    names = names or list(EUROSAT_CLASSNAMES.values())
    split = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(zip(EUROSAT_CLASSNAMES, names)):
        for s in split:
            for i in range(per_class):
                rel = f"{folder}/{folder}_{s}{i}.jpg"
                write_image(ddir / "2750" / rel, color=(label * 20, 50, 50), fmt="JPEG")
                split[s].append([rel, label, name])
    (ddir / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return root
