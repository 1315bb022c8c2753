"""The generated demo set and user data sets (class folders, CSV)."""

from __future__ import annotations

import hashlib
import shutil
import time

from data_helpers import class_folders, write_image

import vlprompt.data.custom as custom
from vlprompt.data import fewshot, get_dataset, split_hash, subsample, verify_dataset
from vlprompt.data.demo import demo_root, ensure_demo


def _tree_hash(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_fast_and_complete():
    shutil.rmtree(demo_root(), ignore_errors=True)
    t = time.process_time()  # CPU time: robust to a busy machine
    ensure_demo()
    assert time.process_time() - t < 10
    first = _tree_hash(demo_root())
    shutil.rmtree(demo_root())
    assert _tree_hash(ensure_demo()) == first
    assert not [p for p in demo_root().parent.iterdir() if p.name.startswith(".demo-")]  # no temp leftovers
    demo = get_dataset("demo")
    assert demo.num_classes == 10 and demo.classnames[0] == "zero" and demo.classnames[9] == "nine"
    assert sum(demo.counts().values()) == 1797
    assert abs(len(demo.train) / 1797 - 0.5) < 0.01 and abs(len(demo.val) / 1797 - 0.2) < 0.01
    assert demo.template == "a photo of the digit {}."
    base, new = subsample(demo, "base"), subsample(demo, "new")
    assert base.classnames == ["zero", "one", "two", "three", "four"]
    assert new.classnames == ["five", "six", "seven", "eight", "nine"]
    fs = fewshot(demo, 4, seed=1)
    assert len(fs.train) == 40 and len(fs.val) == 40
    assert verify_dataset("demo", None).ok


def test_custom_folder_split_written_once_and_reused(tmp_path):
    root = class_folders(tmp_path / "mine", {"red_apple": 10, "pear": 6, "plum": 3})
    first = get_dataset(f"folder:{root}")
    split_file = root / "split_vlprompt.json"
    assert split_file.is_file()
    assert first.classnames == ["pear", "plum", "red apple"]
    assert first.counts() == {"train": 10, "val": 4, "test": 5}  # 5/2/3 + 3/1/2 + 2/1/0
    mtime = split_file.stat().st_mtime_ns
    again = get_dataset("custom", root=root)  # an unchanged folder reuses its split
    assert split_file.stat().st_mtime_ns == mtime
    assert split_hash(again) == split_hash(first)
    write_image(root / "pear" / "late_addition.png")  # a changed listing gets a new split
    grown = get_dataset("custom", root=root)
    assert split_hash(grown) != split_hash(first)
    assert sum(grown.counts().values()) == sum(first.counts().values()) + 1
    assert len(subsample(first, "base").classnames) == 2 and fewshot(first, 2, seed=1).train


def test_custom_csv_and_readonly_fallback(tmp_path, monkeypatch):
    data = tmp_path / "csvdata"
    rows = ["path,label"]
    for c in ("dog", "cat"):
        for i in range(5):
            write_image(data / "imgs" / f"{c}{i}.png")
            rows.append(f"imgs/{c}{i}.png,{c}")
    csv_path = data / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    real_write = custom.write_split

    def no_write_next_to_data(path, *parts, **kw):  # chmod does not stop root: simulate a read-only folder
        if str(path).startswith(str(data)):
            raise PermissionError(13, "read-only", str(path))
        real_write(path, *parts, **kw)

    monkeypatch.setattr(custom, "write_split", no_write_next_to_data)
    first = get_dataset(f"csv:{csv_path}")
    assert first.classnames == ["cat", "dog"]
    assert not (data / "labels.csv.split_vlprompt.json").exists()
    cached = first.extra["split_file"]
    assert "custom" in cached
    second = get_dataset("custom", root=csv_path)
    assert second.extra["split_file"] == cached and split_hash(second) == split_hash(first)


def test_a_folder_whose_mode_grants_no_write_keeps_no_split_even_for_root(tmp_path):
    """Shared data is often dr-xr-xr-x and the process root (containers), which passes every access
    check: the split goes to the cache, not next to the data."""
    root = class_folders(tmp_path / "shared", {"pear": 6, "plum": 6})
    root.chmod(0o555)
    try:
        ds = get_dataset(f"folder:{root}")
        assert not (root / "split_vlprompt.json").exists()
        assert "custom" in ds.extra["split_file"]
    finally:
        root.chmod(0o755)
