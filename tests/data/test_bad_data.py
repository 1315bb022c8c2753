"""Every kind of bad data gives a one-line VlpromptError naming the problem, or is dropped with skip_bad."""

from __future__ import annotations

import json
import logging

import pytest
from data_helpers import class_folders, fake_eurosat, write_image

from vlprompt.data import ImageDataset, build_loader, build_transform, fewshot, get_dataset, verify_dataset
from vlprompt.errors import VlpromptError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_good_fake_eurosat_loads(tmp_path):
    splits = get_dataset("eurosat", fake_eurosat(tmp_path))
    assert splits.counts() == {"train": 10, "val": 10, "test": 10}
    assert splits.classnames[3] == "Highway or Road"


def test_missing_root(tmp_path):
    with pytest.raises(VlpromptError) as e:
        get_dataset("caltech101", tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(e) and "data root not found" in str(e.value)


def test_missing_dataset_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(VlpromptError) as e:
        get_dataset("caltech101", tmp_path)
    msg = _one_line(e)
    assert str(tmp_path / "caltech-101") in msg and "101_ObjectCategories" in msg


def test_missing_split_file(tmp_path):
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)
    with pytest.raises(VlpromptError) as e:
        get_dataset("caltech101", tmp_path)
    assert "split_zhou_Caltech101.json" in _one_line(e) and "split file not found" in str(e.value)


def test_listed_image_missing_and_skip_bad(tmp_path, caplog):
    root = fake_eurosat(tmp_path)
    gone = tmp_path / "eurosat" / "2750" / "Forest" / "Forest_test0.jpg"
    gone.unlink()
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root)
    assert str(gone) in _one_line(e) and "skip_bad=True" in str(e.value)
    with caplog.at_level(logging.WARNING):
        splits = get_dataset("eurosat", root, skip_bad=True)
    assert len(splits.test) == 9 and "dropping 1 missing" in caplog.text


def test_truncated_and_corrupt_images(tmp_path, caplog):
    root = fake_eurosat(tmp_path)
    img_dir = tmp_path / "eurosat" / "2750"
    truncated = img_dir / "River" / "River_train0.jpg"
    write_image(truncated, size=(256, 256), fmt="JPEG")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = img_dir / "Forest" / "Forest_val0.jpg"
    garbage.write_bytes(b"this is not an image")
    splits = get_dataset("eurosat", root)  # existence is fine; decoding fails on use, naming the file
    ds = ImageDataset(splits.train, build_transform(train=False))
    idx = next(i for i, d in enumerate(splits.train) if d.impath == str(truncated))
    with pytest.raises(VlpromptError) as e:
        ds[idx]
    assert str(truncated) in _one_line(e)
    with caplog.at_level(logging.WARNING):
        clean = get_dataset("eurosat", root, skip_bad=True)
    assert len(clean.train) == 9 and len(clean.val) == 9
    assert "dropping 1 unreadable images" in caplog.text
    loader = build_loader(splits.train, build_transform(train=False, size=8), 4, shuffle=False, num_workers=1)
    with pytest.raises(VlpromptError) as e:  # raised in a worker process, still one line
        list(loader)
    assert str(truncated) in _one_line(e) and str(e.value).startswith("cannot read image")
    report = verify_dataset("eurosat", root, check_images=True)
    assert not report.ok and {p for p, _ in report.unreadable} == {str(truncated), str(garbage)}
    assert "2 unreadable images" in report.format()


def test_k_larger_than_every_class_is_refused(tmp_path):
    # refused, not capped: the run's folder and fingerprint would claim 16 shots it never used
    splits = get_dataset("eurosat", fake_eurosat(tmp_path, per_class=3))
    with pytest.raises(VlpromptError) as e:
        fewshot(splits, 16, seed=1)
    assert "--shots 16 is more than any class of eurosat has" in _one_line(e) and "--shots 3" in _one_line(e)
    fs = fewshot(splits, 3, seed=1)
    assert len(fs.train) == 30 and len(fs.val) == 30  # all 3 per class, val K = min(3, 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(VlpromptError, match=f"shots must be a positive integer, got {bad!r}"):
            fewshot(splits, bad, seed=1)


def test_custom_folder_with_one_class(tmp_path):
    class_folders(tmp_path / "only", {"cat": 4})
    with pytest.raises(VlpromptError) as e:
        get_dataset(f"folder:{tmp_path / 'only'}")
    assert "at least 2" in _one_line(e)


def _edit_split(root, edit):
    path = root / "eurosat" / "split_zhou_EuroSAT.json"
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))


def test_label_with_two_names(tmp_path):
    root = fake_eurosat(tmp_path)
    _edit_split(root, lambda s: s["test"][0].__setitem__(2, "Farmland"))
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root)
    assert "label 0 has two class names" in _one_line(e)


def test_names_not_in_registry(tmp_path):
    names = ["AnnualCrop"] + [n for n in fake_names()[1:]]
    root = fake_eurosat(tmp_path, names=names)
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root)
    assert "'AnnualCrop' should be 'Annual Crop Land'" in _one_line(e)
    root2 = fake_eurosat(tmp_path / "b", names=["Farmland"] + fake_names()[1:])
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root2)
    assert "not in EuroSAT's class list" in _one_line(e)


def test_wrong_class_count_and_bad_rows(tmp_path):
    root = fake_eurosat(tmp_path)
    _edit_split(root, lambda s: [s[k].__setitem__(slice(None), [r for r in s[k] if r[1] < 9]) for k in s])
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root)
    assert "has 9 classes but EuroSAT has 10" in _one_line(e)
    _edit_split(root, lambda s: s["train"].append(["x.jpg", "3", "River"]))
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root)
    assert "is not [relpath, label>=0, classname]" in _one_line(e)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text("{not json")
    with pytest.raises(VlpromptError) as e:
        get_dataset("eurosat", root)
    assert "not valid JSON" in _one_line(e)


def test_unknown_dataset_name():
    with pytest.raises(VlpromptError) as e:
        get_dataset("caltec101", "/")
    assert "caltech101" in _one_line(e)


def fake_names() -> list[str]:
    from vlprompt.data.registry import EUROSAT_CLASSNAMES

    return list(EUROSAT_CLASSNAMES.values())


def test_folder_layouts_of_imagenet_variants(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text(
        "".join(f"{w} class {i}\n" for i, w in enumerate(wnids))
    )
    for w in (wnids[5], wnids[2]):
        write_image(tmp_path / "imagenet-adversarial" / "imagenet-a" / w / "a.jpg", fmt="JPEG")
    with pytest.raises(VlpromptError) as e:
        get_dataset("imagenet_a", tmp_path)
    assert "has 2 classes but ImageNet-A has 200" in _one_line(e)
    for w in wnids[:200]:
        write_image(tmp_path / "imagenet-adversarial" / "imagenet-a" / w / "a.jpg", size=(4, 4), fmt="JPEG")
    a = get_dataset("ImageNet-A", tmp_path)
    assert a.num_classes == 200 and a.classnames[2] == "class 2" and len(a.test) == 200 and not a.train
    write_image(
        tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "7" / "x.jpeg", fmt="JPEG"
    )
    v2 = get_dataset("imagenetv2", tmp_path)
    assert v2.num_classes == 1000 and [(d.label, d.classname) for d in v2.test] == [(7, "class 7")]
