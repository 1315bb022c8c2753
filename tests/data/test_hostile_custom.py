"""Hostile custom data sets and images (issue 26, item 5): refused or warned in one line naming the
offending rows, never a silently different data set; no machine path in shared run files; image memory
bounded before decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.data import get_dataset
from vlprompt.errors import VlpromptError

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]


def folder(root: Path, classes=("cat", "dog", "owl"), n: int = 6) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (32, 32), tuple(v + 5 * i for v in COLOURS[c])).save(root / name / f"{i}.png")
    return root


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("path,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def refused(name: str, match: str, **kw) -> str:
    with pytest.raises(VlpromptError, match=match) as e:
        get_dataset(name, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ names and links
def test_non_utf8_file_and_class_folder_names(tmp_path):
    root = folder(tmp_path / "d")
    bad_file = os.path.join(os.fsencode(root / "cat"), b"x\xfe.png")
    Image.new("RGB", (8, 8)).save(os.fsdecode(bad_file))
    msg = refused(f"folder:{root}", "is not valid UTF-8")
    assert "cat/x\\xfe.png" in msg
    os.remove(bad_file)
    os.makedirs(os.path.join(os.fsencode(root), b"\xffowl"))
    assert "\\xffowl" in refused(f"folder:{root}", "is not valid UTF-8")


def test_non_utf8_names_through_the_cli(tmp_path, capsys):
    from vlprompt.cli.main import main

    root = folder(tmp_path / "d")
    Image.new("RGB", (8, 8)).save(os.fsdecode(os.path.join(os.fsencode(root / "dog"), b"\xe9t\xe9.png")))
    argv = ["train", "--method", "zeroshot", "--dataset", f"folder:{root}", "--model", "vlp-tiny"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err and "is not valid UTF-8" in err[-1]


def test_class_folder_linked_to_another_class(tmp_path):
    root = folder(tmp_path / "d")
    os.symlink(root / "cat", root / "kitten")
    msg = refused(f"folder:{root}", "hold the same images")
    assert "'cat'" in msg and "'kitten'" in msg


def test_image_file_linked_into_two_classes(tmp_path):
    root = folder(tmp_path / "d")
    os.symlink(root / "cat" / "0.png", root / "dog" / "extra.png")
    assert "are the same image file" in refused(f"folder:{root}", "same image")


# ------------------------------------------------------------------ CSV rows
@pytest.mark.parametrize("spelling", ["./cat/0.png", "cat//0.png", "cat/./0.png", "ABS"])
def test_csv_same_image_under_another_spelling(tmp_path, spelling):
    root = folder(tmp_path / "d")
    other = str(root / "cat" / "0.png") if spelling == "ABS" else spelling
    rows = [f"cat/{i}.png,cat" for i in range(6)] + [f"dog/{i}.png,dog" for i in range(6)] + [f"{other},cat"]
    msg = refused(f"csv:{write_csv(root / 'l.csv', rows)}", "name the same image")
    assert "rows 1 and 13" in msg and "cat/0.png" in msg


def test_csv_same_image_with_two_labels(tmp_path):
    root = folder(tmp_path / "d")
    rows = [f"cat/{i}.png,cat" for i in range(6)] + [f"dog/{i}.png,dog" for i in range(6)] + ["cat/3.png,dog"]
    assert "rows 4 and 13" in refused(f"csv:{write_csv(root / 'l.csv', rows)}", "same image")


@pytest.mark.parametrize("outside", ["../../etc/x.png", "/etc/x.png", "cat/../../x.png"])
def test_csv_rows_outside_the_data_root(tmp_path, outside):
    root = folder(tmp_path / "d")
    rows = (
        [f"cat/{i}.png,cat" for i in range(6)] + [f"{outside},dog"] + [f"dog/{i}.png,dog" for i in range(6)]
    )
    msg = refused(f"csv:{write_csv(root / 'l.csv', rows)}", "lies outside the data folder")
    assert "row 7" in msg and outside in msg


def test_csv_absolute_path_inside_the_root_is_the_relative_one(tmp_path):
    root = folder(tmp_path / "d")
    rows = [f"{root}/cat/{i}.png,cat" for i in range(6)] + [f"dog/{i}.png,dog" for i in range(6)]
    splits = get_dataset(f"csv:{write_csv(root / 'l.csv', rows)}")
    assert all(not os.path.isabs(d.relpath) for d in splits.train + splits.val + splits.test)


# ------------------------------------------------------------------ degenerate splits
def test_skip_bad_that_empties_a_class_is_refused(tmp_path):
    root = folder(tmp_path / "d")
    for p in (root / "owl").iterdir():
        p.write_bytes(b"not a png at all")
    msg = refused(f"folder:{root}", "dropped every training image of class 'owl'", skip_bad=True)
    assert "fix those images or remove the class" in msg


def test_three_images_per_class_has_no_test_split(tmp_path):
    root = folder(tmp_path / "d", n=3)
    msg = refused(f"folder:{root}", "has no test images")
    assert str(tmp_path) not in msg and "largest has 3" in msg


# ------------------------------------------------------------------ memory
def _header_only_png(path: Path, w: int, h: int, colour_type: int = 6) -> Path:
    """A PNG that declares a ``w`` x ``h`` canvas in a few dozen bytes (no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_image_over_the_byte_budget_is_refused_before_allocation(tmp_path):
    """13000 x 13000 RGBA is under the pixel limit but needs ~1.3 GB: refused from its header, and the
    process never grows by anything near that (measured as peak RSS in a fresh interpreter)."""
    png = _header_only_png(tmp_path / "big.png", 13000, 13000)
    code = (
        "import resource, sys\n"
        "from vlprompt.data.images import load_rgb\n"
        "from vlprompt.errors import VlpromptError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_rgb(sys.argv[1])\nexcept VlpromptError as e:\n    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, str(png)], capture_output=True, text=True, env=env)
    msg, grown_mb = out.stdout.strip().splitlines()
    assert "MB to decode, over the" in msg and "big.png" in msg, out
    assert int(grown_mb) < 100, grown_mb


def test_byte_budget_follows_the_pixel_limit(tmp_path):
    from vlprompt.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb, set_max_image_pixels

    rgba, grey = tmp_path / "a.png", tmp_path / "g.png"
    Image.new("RGBA", (30, 30)).save(rgba)  # 900 px: under a 1000-px limit, 900 * 8 bytes over 4000
    Image.new("L", (20, 20)).save(grey)  # 400 px * 5 bytes = 2000: within
    try:
        set_max_image_pixels(1000)
        with pytest.raises(VlpromptError, match="over the 0 MB budget"):
            load_rgb(str(rgba))
        assert load_rgb(str(grey)).size == (20, 20)
        set_max_image_pixels(0)  # no limit
        assert load_rgb(str(rgba)).size == (30, 30)
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)


# ------------------------------------------------------------------ privacy
def test_builtin_data_identity_is_unchanged():
    """Built-in data sets keep their identity keys (so every existing fingerprint stays valid)."""
    import dataclasses

    from vlprompt.run.identity import data_identity
    from vlprompt.train.config import DataConfig

    d = DataConfig(dataset="caltech101", shots=4, seed=2)
    want = {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if not f.metadata.get("execution")}
    assert data_identity(d, "abc", ["a", "b"]) == {**want, "split_hash": "abc"}


def test_custom_identity_names_the_set_without_its_path_and_follows_its_data(tmp_path):
    from vlprompt.run.identity import data_identity
    from vlprompt.train.config import DataConfig

    a = data_identity(DataConfig(dataset=f"folder:{tmp_path}/x/pets"), "h", ["cat", "dog"])
    b = data_identity(DataConfig(dataset=f"folder:{tmp_path}/y/pets/"), "h", ["cat", "dog"])
    c = data_identity(DataConfig(dataset=f"folder:{tmp_path}/y/pets/"), "h", ["cat", "wolf"])
    assert a == b and a["dataset"] == "folder:pets" and str(tmp_path) not in json.dumps(a)
    assert c != b  # other class names: another data set


def test_no_absolute_data_path_in_shared_run_files(tmp_path, tinyctx):
    from vlprompt.cli.main import main
    from vlprompt.protocols.grid import dataset_slug

    root = folder(tmp_path / "private" / "pets", n=8)
    out, exp = tmp_path / "run", tmp_path / "exp"
    argv = ["--method", "tinyctx", "--dataset", f"folder:{root}", "--model", "vlp-tiny", "--no-progress"]
    argv += ["--shots", "2"]
    assert main(["train", *argv, "--epochs", "1", "--set", "train.batch_size=4", "--out", str(out)]) == 0
    assert main(["export", str(out), str(exp)]) == 0
    secret = str(tmp_path / "private")
    shared = ["manifest.json", "prompt.safetensors", "metrics.json", "fingerprint.json", "split.json"]
    for name in shared:
        assert secret.encode() not in (out / name).read_bytes(), name
    for f in exp.iterdir():
        assert secret.encode() not in f.read_bytes(), f.name
    assert json.loads((out / "manifest.json").read_text())["dataset"] == "folder:pets"
    slug = dataset_slug(f"folder:{root}")
    assert "private" not in slug and slug.startswith("folder_pets_")
    assert dataset_slug(f"folder:{tmp_path}/other/pets") != slug
