"""ImageNet listing: default sorted (machine-independent); ``listing="os"`` lists class folders' images
exactly as the reference toolkit does (sorted class folders, images in os.listdir order)."""

from __future__ import annotations

import os

import pytest

from vlprompt.data import fewshot, get_dataset, split_hash
from vlprompt.errors import VlpromptError

WNIDS = [f"n{i:08d}" for i in range(1000)]
NAMES = ["zz.JPEG", "aa.JPEG", "mm.JPEG", "bb.JPEG", ".hidden.JPEG", "notes.txt"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "imagenet").mkdir()
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))
    for part in ("train", "val"):
        for i, w in enumerate(WNIDS):
            d = root / "imagenet" / "images" / part / w
            d.mkdir(parents=True)
            for name in NAMES if i < 5 else NAMES[:2]:  # written in a non-sorted order
                (d / name).write_bytes(b"")
    return root


def _reference_order(split_dir):
    """What CoOp's ImageNet reader lists: sorted class folders, then os.listdir minus hidden files."""
    folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir())
    out = []
    for folder in folders:
        for imname in [f for f in os.listdir(os.path.join(split_dir, folder)) if not f.startswith(".")]:
            out.append(f"{folder}/{imname}")
    return out


def test_os_listing_matches_the_reference_reader(root):
    ds = get_dataset("imagenet", root, listing="os")
    ref = [p for p in _reference_order(root / "imagenet" / "images" / "train") if p.endswith(".JPEG")]
    assert [d.relpath for d in ds.train] == ref
    assert [d.label for d in ds.train[:4]] == [0] * 4 and ds.classnames[0] == f"class {WNIDS[0]}"


def test_default_listing_is_sorted_and_unchanged(root):
    ds = get_dataset("imagenet", root)
    first = [d.relpath for d in ds.train if d.label == 0]
    assert first == [f"{WNIDS[0]}/{n}" for n in ("aa.JPEG", "bb.JPEG", "mm.JPEG", "zz.JPEG")]
    assert len(ds.train) == 5 * 4 + 995 * 2 and ds.test is ds.val


def test_listings_never_share_cached_picks(root):
    a, b = get_dataset("imagenet", root), get_dataset("imagenet", root, listing="os")
    assert sorted(d.relpath for d in a.train) == sorted(d.relpath for d in b.train)  # same items
    if [d.relpath for d in a.train] != [d.relpath for d in b.train]:  # order differs on this filesystem
        assert split_hash(a) != split_hash(b)  # the few-shot cache key, so picks are never mixed up
    k1 = fewshot(b, 1, 1, use_cache=False)
    assert len(k1.train) == 1000


def test_unknown_listing_is_one_line_error(root):
    with pytest.raises(VlpromptError, match="unknown listing 'random'; use one of sorted, os"):
        get_dataset("imagenet", root, listing="random")
