"""The built-in ``demo`` data set: scikit-learn's 1,797 handwritten digits as small RGB PNGs.

It ships with scikit-learn (no download), so every protocol can be exercised end to end on any machine.
Generation is deterministic (same bytes every time) and atomic: files are written to a temporary
folder that is renamed into place, so a crash or a concurrent run never sees half a data set.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.data.registry import DIGIT_NAMES
from vlprompt.data.splits import Datum, write_split
from vlprompt.errors import VlpromptError
from vlprompt.utils import cache_dir

log = logging.getLogger(__name__)

DEMO_SIZE = 32
DEMO_SPLIT_SEED = 0
DEMO_FRACTIONS = (0.5, 0.2)  # train, val; test gets the rest


def demo_root() -> Path:
    """Where the demo set lives: ``cache_dir()/demo`` (images/ and split_demo.json)."""
    return cache_dir() / "demo"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()``'s arrays, read straight from scikit-learn's bundled CSV.

    Importing sklearn costs seconds; its package data does not need it (same values as ``load_digits``).
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise VlpromptError("the demo data set needs scikit-learn; run `pip install scikit-learn`")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        from sklearn.datasets import load_digits  # optional: only without the packaged csv

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _write(dest: Path) -> None:
    images, targets = _load_digits()
    rng = np.random.RandomState(DEMO_SPLIT_SEED)
    which = np.empty(len(targets), dtype=np.int64)  # 0 train, 1 val, 2 test; stratified per class
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_tr = round(len(idx) * DEMO_FRACTIONS[0])
        n_va = round(len(idx) * DEMO_FRACTIONS[1])
        which[idx[:n_tr]] = 0
        which[idx[n_tr : n_tr + n_va]] = 1
        which[idx[n_tr + n_va :]] = 2
    img_dir = dest / "images"
    for name in DIGIT_NAMES:
        (img_dir / name).mkdir(parents=True)
    splits: list[list[Datum]] = [[], [], []]
    for i, (arr, y) in enumerate(zip(images, targets)):
        y = int(y)
        pix = np.clip(arr * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        im = Image.fromarray(pix, mode="L").resize((DEMO_SIZE, DEMO_SIZE), Image.BILINEAR).convert("RGB")
        rel = f"{DIGIT_NAMES[y]}/{i:04d}.png"
        im.save(img_dir / rel, format="PNG", compress_level=1)
        splits[int(which[i])].append(Datum(str(img_dir / rel), y, DIGIT_NAMES[y], rel))
    write_split(dest / "split_demo.json", *splits)


def ensure_demo() -> Path:
    """Generate the demo set on first use (about a second) and return its folder."""
    root = demo_root()
    if (root / "split_demo.json").is_file():
        return root
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=parent))
    except OSError as e:
        raise VlpromptError(
            f"cannot write the demo data set under {parent} ({e}); set VLPROMPT_HOME to a writable folder"
        ) from None
    try:
        _write(tmp)
        if root.exists() and not (root / "split_demo.json").is_file():
            shutil.rmtree(root, ignore_errors=True)  # leftovers of an older, interrupted layout
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "split_demo.json").is_file():  # not just a concurrent writer winning
                raise
        log.info("generated the demo data set in %s", root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
