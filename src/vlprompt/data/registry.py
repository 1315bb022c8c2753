"""Specifications of the built-in data sets: folder layout, counts, templates, how to obtain them.

Everything here is plain data so that loaders, ``verify_dataset`` and the CLI agree on one
description per data set. Layouts follow CoOp's DATASETS.md: ``get_dataset(name, root)`` expects
``root/<folder>/...`` (``root`` is the directory that holds all data sets, CoOp's ``$DATA``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlprompt.errors import VlpromptError, unknown_name

#: shot counts of the few-shot protocol
FEWSHOT_K: tuple[int, ...] = (1, 2, 4, 8, 16)

#: EuroSAT folder name -> natural phrase used as the class name (CoOp's NEW_CLASSNAMES)
EUROSAT_CLASSNAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

#: Caltech101 folder name -> class name; BACKGROUND_Google and Faces_easy are not used
CALTECH101_RENAMES: dict[str, str] = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)


@dataclass(frozen=True)
class DatasetSpec:
    """How one data set is laid out on disk and what it should contain.

    ``kind`` selects the reader: ``split`` (a CoOp ``split_zhou_*.json``), ``imagenet``
    (class folders + ``classnames.txt``), ``imagenet_variant`` (test-only ImageNet variants),
    ``aircraft`` (FGVC's ``images_variant_*.txt``), ``demo`` / ``world`` (generated) or ``custom``.
    """

    name: str
    title: str
    kind: str
    folder: str
    image_dirs: tuple[str, ...]  # candidates relative to the data set folder; the first existing wins
    template: str
    num_classes: int
    counts: tuple[int, int, int] | None  # expected train / val / test; None when not fixed
    split_file: str | None = None
    source: str = ""
    howto: str = ""
    classnames: tuple[str, ...] | None = None  # the full class list, where it is fixed
    renames: dict[str, str] = field(default_factory=dict)  # raw -> final names (raw must not appear)
    fewshot_val: bool = True  # ImageNet: val is the test set and is not sampled (as CoOp)
    test_only: bool = False
    #: False where a horizontal flip changes the label (left / right is a class): training never flips
    flip: bool = True
    #: generated sets: what generated the images (``world-v3r1``).  Part of a run's identity, because a
    #: new generation can keep every item's relative path and label (all the split hash sees)
    generation: str | None = None


_IMAGENET_HOWTO = (
    "download ILSVRC-2012 train/val from https://image-net.org/download.php, put class folders "
    "under {root}/imagenet/images/train/<wnid>/ and {root}/imagenet/images/val/<wnid>/ (val sorted into "
    "wnid folders), and write {root}/imagenet/classnames.txt with one 'wnid class name' per line "
    "(CoOp's DATASETS.md links the file)"
)
_VARIANT_NOTE = " classnames.txt is read from this folder or, failing that, from {root}/imagenet/."

_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "imagenet",
        "ImageNet",
        "imagenet",
        "imagenet",
        ("images",),
        "a photo of a {}.",
        1000,
        (1281167, 50000, 50000),
        source="https://image-net.org/download.php",
        howto=_IMAGENET_HOWTO,
        fewshot_val=False,
    ),
    DatasetSpec(
        "caltech101",
        "Caltech101",
        "split",
        "caltech-101",
        ("101_ObjectCategories",),
        "a photo of a {}.",
        100,
        (4128, 1649, 2465),
        split_file="split_zhou_Caltech101.json",
        source="https://data.caltech.edu/records/mzrjq-6wc02",
        howto="extract 101_ObjectCategories.tar.gz to {root}/caltech-101/101_ObjectCategories/ and put "
        "split_zhou_Caltech101.json (CoOp's DATASETS.md) in {root}/caltech-101/",
        renames=CALTECH101_RENAMES,
    ),
    DatasetSpec(
        "oxford_pets",
        "OxfordPets",
        "split",
        "oxford_pets",
        ("images",),
        "a photo of a {}, a type of pet.",
        37,
        (2944, 736, 3669),
        split_file="split_zhou_OxfordPets.json",
        source="https://www.robots.ox.ac.uk/~vgg/data/pets/",
        howto="extract images.tar.gz and annotations.tar.gz into {root}/oxford_pets/ (giving images/ and "
        "annotations/) and put split_zhou_OxfordPets.json there",
    ),
    DatasetSpec(
        "stanford_cars",
        "StanfordCars",
        "split",
        "stanford_cars",
        ("",),
        "a photo of a {}.",
        196,
        (6509, 1635, 8041),
        split_file="split_zhou_StanfordCars.json",
        source="https://ai.stanford.edu/~jkrause/cars/car_dataset.html "
        "(mirror: Kaggle 'stanford-cars-dataset')",
        howto="extract cars_train.tgz, cars_test.tgz and car_devkit.tgz into {root}/stanford_cars/ (giving "
        "cars_train/, cars_test/, devkit/, plus cars_test_annos_withlabels.mat) and put "
        "split_zhou_StanfordCars.json there",
    ),
    DatasetSpec(
        "oxford_flowers",
        "Flowers102",
        "split",
        "oxford_flowers",
        ("jpg",),
        "a photo of a {}, a type of flower.",
        102,
        (4093, 1633, 2463),
        split_file="split_zhou_OxfordFlowers.json",
        source="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        howto="extract 102flowers.tgz into {root}/oxford_flowers/ (giving jpg/), add imagelabels.mat, "
        "cat_to_name.json and split_zhou_OxfordFlowers.json there",
    ),
    DatasetSpec(
        "food101",
        "Food101",
        "split",
        "food-101",
        ("images",),
        "a photo of {}, a type of food.",
        101,
        (50500, 20200, 30300),
        split_file="split_zhou_Food101.json",
        source="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        howto="extract food-101.tar.gz into {root}/ (giving {root}/food-101/images/) and put "
        "split_zhou_Food101.json in {root}/food-101/",
    ),
    DatasetSpec(
        "fgvc_aircraft",
        "FGVCAircraft",
        "aircraft",
        "fgvc_aircraft",
        ("images",),
        "a photo of a {}, a type of aircraft.",
        100,
        (3334, 3333, 3333),
        source="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        howto="extract fgvc-aircraft-2013b.tar.gz and move its data/ folder to {root}/fgvc_aircraft/ (giving "
        "images/, variants.txt and images_variant_{{train,val,test}}.txt)",
    ),
    DatasetSpec(
        "sun397",
        "SUN397",
        "split",
        "sun397",
        ("SUN397",),
        "a photo of a {}.",
        397,
        (15880, 3970, 19850),
        split_file="split_zhou_SUN397.json",
        source="http://vision.princeton.edu/projects/2010/SUN/",
        howto="extract SUN397.tar.gz into {root}/sun397/ (giving SUN397/) and put "
        "split_zhou_SUN397.json there",
    ),
    DatasetSpec(
        "dtd",
        "DTD",
        "split",
        "dtd",
        ("images", "dtd/images"),
        "{} texture.",
        47,
        (2820, 1128, 1692),
        split_file="split_zhou_DescribableTextures.json",
        source="https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        howto="extract dtd-r1.0.1.tar.gz into {root}/ (giving {root}/dtd/images/; dtd/dtd/images/ "
        "is accepted too) and put split_zhou_DescribableTextures.json in {root}/dtd/",
    ),
    DatasetSpec(
        "eurosat",
        "EuroSAT",
        "split",
        "eurosat",
        ("2750",),
        "a centered satellite photo of {}.",
        10,
        (13500, 5400, 8100),
        split_file="split_zhou_EuroSAT.json",
        source="https://madm.dfki.de/files/sentinel/EuroSAT.zip (RGB version; also https://github.com/phelber/EuroSAT)",
        howto="extract EuroSAT.zip into {root}/eurosat/ (giving 2750/) and put split_zhou_EuroSAT.json there",
        classnames=tuple(EUROSAT_CLASSNAMES.values()),
        renames=EUROSAT_CLASSNAMES,
    ),
    DatasetSpec(
        "ucf101",
        "UCF101",
        "split",
        "ucf101",
        ("UCF-101-midframes",),
        "a photo of a person doing {}.",
        101,
        (7639, 1898, 3783),
        split_file="split_zhou_UCF101.json",
        source="https://www.crcv.ucf.edu/data/UCF101.php "
        "(mid-frames: UCF-101-midframes.zip linked from CoOp's DATASETS.md)",
        howto="extract UCF-101-midframes.zip into {root}/ucf101/ (giving UCF-101-midframes/) and put "
        "split_zhou_UCF101.json there",
    ),
    DatasetSpec(
        "imagenetv2",
        "ImageNet-V2",
        "imagenet_variant",
        "imagenetv2",
        ("imagenetv2-matched-frequency-format-val",),
        "a photo of a {}.",
        1000,
        (0, 0, 10000),
        source="https://github.com/modestyachts/ImageNetV2 (matched-frequency)",
        howto="extract imagenetv2-matched-frequency.tar.gz into {root}/imagenetv2/ (giving "
        "imagenetv2-matched-frequency-format-val/<0..999>/)." + _VARIANT_NOTE,
        test_only=True,
    ),
    DatasetSpec(
        "imagenet_sketch",
        "ImageNet-Sketch",
        "imagenet_variant",
        "imagenet-sketch",
        ("images",),
        "a photo of a {}.",
        1000,
        (0, 0, 50889),
        source="https://github.com/HaohanWang/ImageNet-Sketch",
        howto="extract ImageNet-Sketch.zip into {root}/imagenet-sketch/ and rename sketch/ to images/ "
        "(giving images/<wnid>/)." + _VARIANT_NOTE,
        test_only=True,
    ),
    DatasetSpec(
        "imagenet_a",
        "ImageNet-A",
        "imagenet_variant",
        "imagenet-adversarial",
        ("imagenet-a",),
        "a photo of a {}.",
        200,
        (0, 0, 7500),
        source="https://github.com/hendrycks/natural-adv-examples",
        howto="extract imagenet-a.tar into {root}/imagenet-adversarial/ (giving imagenet-a/<wnid>/)."
        + _VARIANT_NOTE,
        test_only=True,
    ),
    DatasetSpec(
        "imagenet_r",
        "ImageNet-R",
        "imagenet_variant",
        "imagenet-rendition",
        ("imagenet-r",),
        "a photo of a {}.",
        200,
        (0, 0, 30000),
        source="https://github.com/hendrycks/imagenet-r",
        howto="extract imagenet-r.tar into {root}/imagenet-rendition/ (giving imagenet-r/<wnid>/)."
        + _VARIANT_NOTE,
        test_only=True,
    ),
    DatasetSpec(
        "demo",
        "Demo (scikit-learn digits)",
        "demo",
        "demo",
        ("images",),
        "a photo of the digit {}.",
        10,
        None,
        split_file="split_demo.json",
        source="generated from sklearn.datasets.load_digits on first use (no download)",
        howto="nothing to do: get_dataset('demo') writes it into the vlprompt cache",
        classnames=DIGIT_NAMES,
    ),
)


#: packages above ``data`` that add generated data sets ("module:function", entry-point style; each
#: function calls :func:`register_generated`): named as strings, so ``data`` never imports them
DATASET_ENTRY_POINTS: list[str] = ["vlprompt.world.sets:register_world_sets"]


class _Specs(dict):
    """The spec table; data sets of packages above ``data`` (the generated world) join it on first use.

    Those packages are named in :data:`DATASET_ENTRY_POINTS` ("module:function", entry-point
    style); each function calls :func:`register_generated`.  So ``data`` never imports them, and
    ``import vlprompt`` stays cheap.
    """

    _loaded = False

    def _load(self) -> None:
        if not _Specs._loaded:
            _Specs._loaded = True
            for entry in DATASET_ENTRY_POINTS:
                module, _, func = entry.partition(":")
                getattr(importlib.import_module(module), func)()

    def __getitem__(self, key: str) -> DatasetSpec:
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._load()
        return super().__contains__(key)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def get(self, key: str, default: Any = None) -> Any:
        self._load()
        return super().get(key, default)

    def keys(self):
        self._load()
        return super().keys()

    def values(self):
        self._load()
        return super().values()

    def items(self):
        self._load()
        return super().items()


SPECS: dict[str, DatasetSpec] = _Specs((s.name, s) for s in _SPECS)
#: name -> function that writes a generated data set into the cache on first use and returns its folder
GENERATORS: dict[str, Callable[[], Path]] = {}


def register_generated(spec: DatasetSpec, generate: Callable[[], Path]) -> None:
    """Add a data set generated on first use (``spec.kind`` ``"world"``: no root, cached)."""
    dict.__setitem__(SPECS, spec.name, spec)
    GENERATORS[spec.name] = generate


def generate_dataset(name: str) -> Path:
    """Folder of the generated data set ``name`` (written into the cache on first use)."""
    SPECS._load()  # type: ignore[attr-defined]
    if name not in GENERATORS:
        raise VlpromptError(f"data set {name!r} is not a generated one")
    return GENERATORS[name]()


#: the 11 base-to-new / cross-dataset data sets, in the papers' table order
BENCHMARKS: tuple[str, ...] = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
#: cross-dataset protocol: train on the source, evaluate on the full test sets of the targets
CROSS_DATASET_SOURCE = "imagenet"
CROSS_DATASET_TARGETS: tuple[str, ...] = BENCHMARKS[1:]
#: domain generalisation: train on ImageNet, evaluate on its four shifted variants
DG_SOURCE = "imagenet"
DG_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

_ALIASES = {
    "caltech": "caltech101",
    "oxfordpets": "oxford_pets",
    "pets": "oxford_pets",
    "stanfordcars": "stanford_cars",
    "cars": "stanford_cars",
    "oxfordflowers": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "flowers": "oxford_flowers",
    "food": "food101",
    "fgvcaircraft": "fgvc_aircraft",
    "aircraft": "fgvc_aircraft",
    "describabletextures": "dtd",
    "imagenetv2": "imagenetv2",
    "imagenetsketch": "imagenet_sketch",
    "imageneta": "imagenet_a",
    "imagenetr": "imagenet_r",
    "imagenetadversarial": "imagenet_a",
    "imagenetrendition": "imagenet_r",
}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def canonical_name(name: str) -> str:
    """Registry name for CoOp-style or loose spellings (``Caltech101``, ``ImageNet-A``, ``Flowers102``)."""
    key = _norm(name)
    for spec_name in SPECS:
        if _norm(spec_name) == key:
            return spec_name
    if key in _ALIASES:
        return _ALIASES[key]
    raise unknown_name("data set", name, list(SPECS) + ["folder:PATH", "csv:PATH"])


def get_spec(name: str) -> DatasetSpec:
    """The spec of a built-in data set (any accepted spelling)."""
    return SPECS[canonical_name(name)]


def training_preprocess(preprocess_cfg: dict[str, Any], dataset: str | None) -> dict[str, Any]:
    """The backbone's ``preprocess_cfg`` for *training* on ``dataset``: with ``flip=False`` where the
    data set's spec forbids flipping (its labels say left or right), else unchanged.  Every training
    transform is built from it (``build_transform(True, **cfg)``, methods' ``train_transform``)."""
    if not isinstance(dataset, str) or ":" in dataset:  # folder:/csv: sets (or none): flip as always
        return preprocess_cfg
    try:
        spec = get_spec(dataset)
    except VlpromptError:
        return preprocess_cfg
    return preprocess_cfg if spec.flip else {**preprocess_cfg, "flip": False}


def list_datasets() -> list[str]:
    """Built-in names for ``get_dataset``: 15 benchmarks, ``demo``, the ``world-*`` sets (and ``folder:PATH``,
    ``csv:PATH``)."""
    return list(SPECS)
