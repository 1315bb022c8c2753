"""Real split files from ../shared/data: Caltech101 end to end, the other six parsed without images."""

from __future__ import annotations

import json
import os

import pytest

from vlprompt.data import (
    CROSS_DATASET_TARGETS,
    DG_TARGETS,
    FEWSHOT_K,
    fewshot,
    get_dataset,
    get_spec,
    list_datasets,
    read_split,
    split_hash,
    subsample,
    verify_dataset,
)
from vlprompt.data.registry import canonical_name

SPLIT_ONLY = ["dtd", "eurosat", "oxford_flowers", "oxford_pets", "stanford_cars", "ucf101"]


@pytest.fixture(scope="module")
def caltech(shared_data):
    return get_dataset("caltech101", shared_data)


@pytest.fixture(scope="module")
def reference(shared_data):
    return json.loads((shared_data / "caltech-101" / "fewshot_reference.json").read_text())["picks"]


def test_registry_lists_all_15_and_demo():
    names = list_datasets()
    assert len([n for n in names if not n.startswith("world-")]) == 16 and "demo" in names
    assert {"world-colour-shape", "world-colour-background"} <= set(names)  # generated (docs/world.md)
    assert len(CROSS_DATASET_TARGETS) == 10 and "imagenet" not in CROSS_DATASET_TARGETS
    assert set(DG_TARGETS) == {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    assert FEWSHOT_K == (1, 2, 4, 8, 16)
    assert canonical_name("Caltech101") == "caltech101" and canonical_name("ImageNet-A") == "imagenet_a"
    assert canonical_name("DescribableTextures") == "dtd" and canonical_name("Flowers102") == "oxford_flowers"
    assert get_spec("eurosat").template == "a centered satellite photo of {}."


def test_caltech101_counts_and_names(caltech, shared_data):
    assert caltech.counts() == {"train": 4128, "val": 1649, "test": 2465}
    assert caltech.num_classes == 100
    for name in ("airplane", "face", "leopard", "motorbike"):
        assert name in caltech.classnames
    assert not {"airplanes", "Faces", "Leopards", "Motorbikes"} & set(caltech.classnames)
    assert all("_" not in c for c in caltech.classnames)  # underscores become spaces
    assert caltech.template == "a photo of a {}."
    d = caltech.train[0]
    assert os.path.isabs(d.impath) and os.path.isfile(d.impath)
    assert d.impath.endswith(d.relpath) and caltech.classnames[d.label] == d.classname
    assert split_hash(caltech) == split_hash(get_dataset("Caltech101", shared_data / "caltech-101"))


def test_caltech101_base_new(caltech):
    base, new = subsample(caltech, "base"), subsample(caltech, "new")
    assert base.num_classes == 50 and new.num_classes == 50
    assert base.classnames + new.classnames == caltech.classnames
    assert {d.label for d in base.test} == set(range(50)) == {d.label for d in new.test}
    assert len(base.test) + len(new.test) == len(caltech.test)
    assert all(new.classnames[d.label] == d.classname for d in new.train)
    assert subsample(caltech, "all") is caltech


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fewshot_matches_reference_toolkit(caltech, reference, shots, seed):
    ref = reference[f"K{shots}/seed{seed}"]
    for attempt in ("sampled", "cached"):
        fs = fewshot(caltech, shots, seed)
        assert [d.relpath for d in fs.train] == ref["train"], attempt
        assert [d.relpath for d in fs.val] == ref["val"], attempt
        assert fs.test is caltech.test and fs.shots == shots and fs.seed == seed
    base = subsample(fs, "base")
    assert len(base.train) == 50 * shots


@pytest.mark.parametrize("name", SPLIT_ONLY)
def test_split_only_files_parse_with_official_counts(shared_data, name):
    spec = get_spec(name)
    ddir = shared_data / spec.folder
    train, val, test, classnames = read_split(
        ddir / spec.split_file,
        ddir / spec.image_dirs[0],
        check_files=False,
        num_classes=spec.num_classes,
        classnames=spec.classnames,
        renames=spec.renames,
        title=spec.title,
    )
    assert (len(train), len(val), len(test)) == spec.counts
    assert len(classnames) == spec.num_classes
    if name == "eurosat":
        assert "Annual Crop Land" in classnames and "Sea or Lake" in classnames
    if name == "ucf101":
        assert "Apply Eye Makeup" in classnames


@pytest.mark.parametrize("name", SPLIT_ONLY)
def test_verify_reports_missing_images(shared_data, name):
    report = verify_dataset(name, shared_data, check_images=False)
    spec = get_spec(name)
    total = sum(spec.counts)
    assert not report.ok
    assert report.counts == dict(zip(("train", "val", "test"), spec.counts))  # counts themselves are fine
    assert len(report.missing) == total
    text = report.format()
    assert f"{total:,} of {total:,} images listed in {spec.split_file} are missing" in text
    assert report.missing[0] in text
    if name != "stanford_cars":  # its image folder is the data set folder itself, which exists here
        assert "image folder not found" in text
    assert spec.source.split()[0] in text  # where to obtain it


def test_verify_caltech101_ok(shared_data):
    report = verify_dataset("caltech101", shared_data, check_images=True)
    assert report.ok, report.format()
    assert report.counts == {"train": 4128, "val": 1649, "test": 2465}
