"""Classification data sets of the generated world (``world-*``), a miniature of the real benchmark suite.

Each set is a fixed list of classes (attribute values or combinations from :mod:`vlprompt.world.scene`)
and a number of images per class and split; an image shows the class's object (or count, or
position) with every other attribute drawn at random.  The class order is a fixed shuffle, so the base
half (first classes) and the new half each mix every value: new classes are unseen *combinations* or
unseen values of a seen attribute.  Generation is deterministic and atomic like the ``demo`` set: PNGs
plus a CoOp-style split file in ``cache_dir()/<name>-v<world version>[r<set revision>]``,
written on first use in seconds.

Domain generalisation: ``world-shapes`` (photos) has three test-only re-renderings of *the same
scenes* -- ``world-shapes-sketch``, ``world-shapes-noisy``, ``world-shapes-painting`` -- as ImageNet
has -Sketch and -R.  docs/world.md lists the sets and their zero-shot accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.data.registry import DatasetSpec, register_generated
from vlprompt.data.splits import Datum, write_split
from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write_text, cache_dir
from vlprompt.world import scene as world

log = logging.getLogger(__name__)

WORLD_VERSION = 3  # bump when generation changes, so cached sets are regenerated


@dataclass(frozen=True)
class WorldSet:
    name: str
    title: str
    attributes: tuple[
        str, ...
    ]  # what a class fixes: shape, colour, texture, size, background, count, position
    values: tuple[tuple[str, ...], ...]  # per label, the attribute values
    name_format: str  # class name from the values: "{} {}" -> "red circle"
    template: str
    counts: tuple[int, int, int]  # images per class: train, val, test
    seed: int
    kind: str  # what it mirrors in the real suite (docs)
    n_objects: tuple[int, ...] = (1,)  # objects per image, drawn uniformly (the class object is the first)
    domain: str = "photo"
    test_only: bool = False  # a DG target (its train / val splits exist: the same scenes, restyled)
    #: bump when this set's images or classes change (its cache folder becomes ``<name>-v3r1``, ...):
    #: per set, so that the other sets' caches stay valid.  0: the world version's own generation.
    #: A run's fingerprint holds the set's generation (``world_generation``: world version + revision)
    revision: int = 0
    #: False: a horizontal flip changes the label (left/right), so the training transform must not flip
    flip: bool = True

    @property
    def split_file(self) -> str:
        return f"split_{self.name}.json"

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.name_format.format(*v) for v in self.values)


def _classes(*axes: tuple[str, ...], seed: int) -> tuple[tuple[str, ...], ...]:
    """Every combination of the axes' values, base half first, each half in a fixed shuffled order.

    One axis: a shuffle (base and new values are disjoint, as in the real suite).  Two axes: a
    checkerboard split -- (i, j) goes to base when i + j is even -- so every value of each attribute
    occurs in both halves and a new class is an unseen combination of seen words.
    """
    rng = np.random.default_rng(seed)
    if len(axes) == 1:
        return tuple((axes[0][i],) for i in rng.permutation(len(axes[0])))
    a, b = axes
    halves = [[(x, y) for i, x in enumerate(a) for j, y in enumerate(b) if (i + j) % 2 == h] for h in (0, 1)]
    return tuple(h[i] for h in halves for i in rng.permutation(len(h)))


_COLOURS = tuple(world.COLOURS)
_COUNTS = ("one shape", "two shapes", "three shapes", "four shapes")  # "one shapes" until v3
#: world-count's count axis: ordered 1, 3, 2, 4 so that the checkerboard split gives each half
#: adjacent counts (1-2 or 3-4) on a background -- not 1 vs 3, which zero-shot already tells apart
#: (halves at 90 % with the natural order; docs/world.md)
_COUNT_AXIS = (_COUNTS[0], _COUNTS[2], _COUNTS[1], _COUNTS[3])
_BASE_SETS: tuple[WorldSet, ...] = (
    WorldSet(
        "world-shapes",
        "World: objects by shape",
        ("shape",),
        _classes(world.SHAPES, seed=100),
        "{}",
        "a photo of a {}.",
        (24, 4, 20),
        seed=10,
        kind="objects (Caltech101-like)",
        n_objects=(1, 2, 3),
    ),
    WorldSet(
        "world-shape-texture",
        "World: shape x texture",
        ("texture", "shape"),
        _classes(world.TEXTURES, world.SHAPES, seed=101),
        "{} {}",
        "a photo of a {}.",
        (20, 4, 12),
        seed=11,
        kind="fine-grained (Cars/Aircraft-like)",
    ),
    WorldSet(
        "world-textures",
        "World: texture x colour",
        ("texture", "colour"),
        _classes(world.TEXTURES, _COLOURS, seed=102),
        "{} {} shape",
        "a photo of a {}.",
        (20, 4, 12),
        seed=12,
        kind="textures (DTD-like)",
        n_objects=(1, 2, 3),
    ),
    WorldSet(
        "world-colour-background",
        "World: colour x background",
        ("colour", "background"),
        _classes(_COLOURS, world.BACKGROUNDS, seed=103),
        "{} shape on a {} background",
        "a photo of a {}.",
        (20, 4, 12),
        seed=13,
        kind="scenes (SUN397-like)",
        n_objects=(2, 3, 4),
    ),
    WorldSet(
        "world-colour-shape",
        "World: colour x shape",
        ("colour", "shape"),
        _classes(_COLOURS, world.SHAPES, seed=104),
        "{} {}",
        "a photo of a {}.",
        (20, 4, 12),
        seed=14,
        kind="fine-grained, many classes (Flowers-like)",
    ),
    WorldSet(
        "world-size-shape",
        "World: size x shape",
        ("size", "shape"),
        _classes(world.NAMED_SIZES, world.SHAPES, seed=105),
        "{} {}",
        "a photo of a {}.",
        (20, 4, 12),
        seed=15,
        kind="fine-grained by scale (Pets-like)",
    ),
    WorldSet(
        "world-count",
        "World: count x background",
        ("count", "background"),
        _classes(_COUNT_AXIS, world.BACKGROUNDS, seed=106),
        "{} on a {} background",
        "a photo of {}.",
        (20, 4, 12),
        seed=16,
        kind="counting (CLEVR-count-like)",
        revision=1,
    ),
    WorldSet(
        "world-position",
        "World: colour x position",
        ("colour", "position"),
        _classes(_COLOURS, world.POSITIONS, seed=107),
        "{} shape on the {}",
        "a photo of a {}.",
        (20, 4, 12),
        seed=17,
        kind="layout (EuroSAT-like)",
        revision=1,
        flip=False,
    ),
)
#: DG: the same scenes as world-shapes' test split, in the other rendering styles (test only)
_DG_SETS: tuple[WorldSet, ...] = tuple(
    WorldSet(
        f"world-shapes-{d}", f"World: objects by shape, {d} style", ("shape",), _BASE_SETS[0].values,
        "{}", "a photo of a {}.", _BASE_SETS[0].counts, seed=_BASE_SETS[0].seed,
        kind=f"domain shift ({d})", n_objects=_BASE_SETS[0].n_objects, domain=d, test_only=True,
    )
    for d in world.DOMAINS[1:]
)  # fmt: skip
WORLD_SETS: dict[str, WorldSet] = {s.name: s for s in (*_BASE_SETS, *_DG_SETS)}
#: the base-to-new world suite (`vlprompt bench world`) and the DG source / targets
BASE2NEW_SETS: tuple[str, ...] = tuple(s.name for s in _BASE_SETS)
DG_SOURCE = "world-shapes"
DG_TARGETS: tuple[str, ...] = tuple(s.name for s in _DG_SETS)
CROSS_SOURCE = "world-colour-shape"


def world_generation(name: str) -> str:
    """What generates the set's images: the world version and the set's revision (``world-v3r1``)."""
    rev = WORLD_SETS[name].revision
    return f"world-v{WORLD_VERSION}" + (f"r{rev}" if rev else "")


def world_root(name: str) -> Path:
    """The set's cache folder, named by its generation (``world-count-v3r1``)."""
    return cache_dir() / (name + world_generation(name).removeprefix("world"))


#: sentences about each class for the methods that read class descriptions (CoPrompt's come from a
#: language model; there is none here, so the world's own caption templates around the class phrase,
#: other than the set's template: every word is one the backbone was pretrained on).  Our choice.
_DESCRIBE = ("a {}.", "a picture of a {}.", "an image of a {}.", "there is a {}.", "{}.")
_DESCRIBE_BARE = ("{}.", "a picture of {}.", "an image of {}.", "a photo of {}.")  # "three shapes on ..."


def class_descriptions() -> dict[str, list[str]]:
    """Every world class name -> its sentences (:data:`_DESCRIBE`; the same on every machine)."""
    out: dict[str, list[str]] = {}
    for ws in WORLD_SETS.values():
        forms = _DESCRIBE if "a {}" in ws.template else _DESCRIBE_BARE
        for name in ws.classnames:
            out[name] = [f.format(name) for f in forms if f.format(name) != ws.template.format(name)]
    return out


def descriptions_file() -> Path:
    """The world's class descriptions as a JSON file (``--descriptions``), written into the cache once."""
    path = cache_dir() / f"world-descriptions-v{WORLD_VERSION}.json"
    text = json.dumps(class_descriptions(), indent=1, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return path


def class_scene(ws: WorldSet, label: int, k: int) -> tuple[world.Scene, np.random.Generator]:
    """The ``k``-th scene of class ``label`` (and the generator that renders it): random access.

    The DG sets share ``seed`` and values with their source, so they draw the very same scenes.
    """
    rng = np.random.default_rng([ws.seed, label, k])
    fixed = dict(zip(ws.attributes, ws.values[label]))
    n = ws.n_objects[int(rng.integers(len(ws.n_objects)))]
    if "count" in fixed:
        n = _COUNTS.index(fixed.pop("count")) + 1
    background = fixed.pop("background", None)
    main = dict(fixed)
    if n > 1 and "size" not in main:
        main["size"] = "large" if ws.name.startswith("world-shapes") else None
    return world.sample_scene(rng, n, background=background, **{k: v for k, v in main.items() if v}), rng


def _write(ws: WorldSet, dest: Path) -> None:
    img_dir = dest / "images"
    splits: list[list[Datum]] = [[], [], []]
    for label, cname in enumerate(ws.classnames):
        folder = cname.replace(" ", "_")
        (img_dir / folder).mkdir(parents=True)
        k = 0
        for part, n in enumerate(ws.counts):
            for _ in range(n):
                scene, rng = class_scene(ws, label, k)
                rel = f"{folder}/{k:03d}.png"
                img = world.render(scene, rng, domain=ws.domain)
                Image.fromarray(img).save(img_dir / rel, format="PNG", compress_level=1)
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


def world_spec(ws: WorldSet) -> DatasetSpec:
    counts = tuple(n * len(ws.classnames) for n in ws.counts)
    return DatasetSpec(
        ws.name,
        ws.title,
        "world",
        world_root(ws.name).name,
        ("images",),
        ws.template,
        len(ws.classnames),
        counts,
        split_file=ws.split_file,
        source="generated by vlprompt's world (vlprompt.world, docs/world.md) on first use",
        howto=f"nothing to do: get_dataset('{ws.name}') writes it into the vlprompt cache",
        classnames=ws.classnames,
        flip=ws.flip,
        generation=world_generation(ws.name),
    )


def register_world_sets() -> None:
    """Entry point (``data.registry.DATASET_ENTRY_POINTS``): add the world sets to the data registry."""
    for ws in WORLD_SETS.values():
        register_generated(world_spec(ws), lambda name=ws.name: ensure_world(name))
