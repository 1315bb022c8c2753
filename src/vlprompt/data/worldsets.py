"""Classification data sets of the generated world: ``world-colour-shape``, ``world-colour-background``.

Each set is a fixed list of classes (attribute combinations of :mod:`vlprompt.data.world`) and a
number of images per class and split; images show one object of the class with every other attribute
(size, texture or colour, background, position) drawn at random.  Generation is deterministic and
atomic like the ``demo`` set: PNGs plus a CoOp-style split file in ``cache_dir()/<name>``, written on
first use in a second or two.  The class order is a fixed shuffle, so the base half (first classes) and
the new half each mix every colour, shape and texture: new classes are unseen *combinations*.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.data import world
from vlprompt.data.splits import Datum, write_split
from vlprompt.errors import VlpromptError
from vlprompt.utils import cache_dir

log = logging.getLogger(__name__)

WORLD_VERSION = 1  # bump when generation changes, so cached sets are regenerated


@dataclass(frozen=True)
class WorldSet:
    name: str
    title: str
    attributes: tuple[str, str]  # what a class fixes, e.g. ("colour", "shape"); "background" is allowed
    values: tuple[tuple[str, str], ...]  # per label, the two attribute values
    name_format: str  # class name from the two values: "{} {}" -> "red circle"
    template: str
    counts: tuple[int, int, int]  # images per class: train, val, test
    seed: int
    sizes: tuple[str, ...] = tuple(world.SIZES)  # sizes the object may have

    @property
    def split_file(self) -> str:
        return f"split_{self.name}.json"

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.name_format.format(a, b) for a, b in self.values)


def _classes(first: tuple[str, ...], second: tuple[str, ...], seed: int) -> tuple[tuple[str, str], ...]:
    """Every (first, second) pair in a fixed shuffled order (so each half mixes all values)."""
    pairs = [(a, b) for a in first for b in second]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return tuple(pairs[i] for i in order)


WORLD_SETS: dict[str, WorldSet] = {
    s.name: s
    for s in (
        WorldSet(
            "world-colour-shape",
            "World: colour x shape",
            ("colour", "shape"),
            _classes(tuple(world.COLOURS), world.SHAPES, 101),
            "{} {}",
            "a photo of a {}.",
            (20, 4, 16),
            seed=1,
        ),
        WorldSet(
            "world-colour-background",
            "World: colour x background",
            ("colour", "background"),
            _classes(tuple(world.COLOURS), world.BACKGROUNDS, 102),
            "{} on {} background",
            "a photo of a {}.",
            (20, 4, 16),
            seed=2,
        ),
    )
}


def world_root(name: str) -> Path:
    return cache_dir() / f"{name}-v{WORLD_VERSION}"


def _write(ws: WorldSet, dest: Path) -> None:
    img_dir = dest / "images"
    splits: list[list[Datum]] = [[], [], []]
    for label, (cname, pair) in enumerate(zip(ws.classnames, ws.values)):
        fixed = dict(zip(ws.attributes, pair))
        obj_attrs = {k: v for k, v in fixed.items() if k != "background"}
        folder = cname.replace(" ", "_")
        (img_dir / folder).mkdir(parents=True)
        k = 0
        for part, n in enumerate(ws.counts):
            for _ in range(n):
                rng = np.random.default_rng([ws.seed, label, k])
                size = ws.sizes[rng.integers(len(ws.sizes))]
                scene = world.sample_scene(rng, 1, size=size, **obj_attrs)
                if "background" in fixed:
                    scene = world.Scene(fixed["background"], scene.objects)
                rel = f"{folder}/{k:03d}.png"
                Image.fromarray(world.render(scene, rng)).save(img_dir / rel, format="PNG", compress_level=1)
                splits[part].append(Datum(str(img_dir / rel), label, cname, rel))
                k += 1
    write_split(dest / ws.split_file, *splits)


def ensure_world(name: str) -> Path:
    """Generate the world data set ``name`` on first use and return its folder."""
    ws = WORLD_SETS[name]
    root = world_root(name)
    if (root / ws.split_file).is_file():
        return root
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    except OSError as e:
        raise VlpromptError(
            f"cannot write the {name} data set under {parent} ({e}); set VLPROMPT_HOME to a writable folder"
        ) from None
    try:
        _write(ws, tmp)
        if root.exists() and not (root / ws.split_file).is_file():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / ws.split_file).is_file():
                raise
        log.info("generated the %s data set in %s", name, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
