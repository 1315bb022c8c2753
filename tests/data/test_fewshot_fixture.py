"""Few-shot picks against a committed fixture that needs no external data (runs on every machine).

``fixtures/fewshot_picks.json`` holds a tiny generated data set (file names and labels only; classes
interleaved, some smaller than K) and, for every (shots, seed), the picks of the reference toolkit's
algorithm as ``fixtures/make_fewshot_fixture.py`` states it independently of vlprompt.  The sampler
must give exactly those items in exactly that order, use its seed, and leave the global RNGs in the
same state whether it sampled or read its cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprompt.data import fewshot, sample_per_class
from vlprompt.data.splits import DatasetSplits, Datum, split_hash
from vlprompt.errors import VlpromptError
from vlprompt.utils import cache_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = json.loads((FIXTURES / "fewshot_picks.json").read_text(encoding="utf-8"))
KEYS = list(FIXTURE["picks"])


def _splits(name: str = "fixture") -> DatasetSplits:
    names = FIXTURE["classnames"]

    def items(rows):
        return [Datum(f"/nowhere/{rel}", label, names[label], rel) for rel, label in rows]

    return DatasetSplits(
        name=name,
        root="/nowhere",
        train=items(FIXTURE["train"]),
        val=items(FIXTURE["val"]),
        test=items(FIXTURE["test"]),
        classnames=list(names),
        template="a photo of a {}.",
    )


def _shots_seed(key: str) -> tuple[int, int]:
    shot, seed = key.split("-")
    return int(shot.removeprefix("shot")), int(seed.removeprefix("seed"))


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_fixture_is_what_the_generator_states() -> None:
    """The committed picks are the independent statement's output (the fixture is not stale)."""
    spec = importlib.util.spec_from_file_location(
        "make_fewshot_fixture", FIXTURES / "make_fewshot_fixture.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.dumps(gen.build()) == (FIXTURES / "fewshot_picks.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("key", KEYS)
def test_picks_and_their_order_match_the_fixture(key) -> None:
    shots, seed = _shots_seed(key)
    want = FIXTURE["picks"][key]
    fs = fewshot(_splits(), shots, seed, use_cache=False)
    assert [d.relpath for d in fs.train] == want["train"]
    assert [d.relpath for d in fs.val] == want["val"]
    assert (fs.shots, fs.seed) == (shots, seed)
    assert [d.relpath for d in fs.test] == [r for r, _ in FIXTURE["test"]]  # test is never sampled
    # classes with fewer than K images keep all of theirs; labels stay attached to their items
    counts = {c: sum(1 for _, lab in FIXTURE["train"] if lab == c) for c in range(5)}
    assert len(fs.train) == sum(min(n, shots) for n in counts.values())
    assert all(d.relpath.split("/")[0] == FIXTURE["classnames"][d.label] for d in fs.train + fs.val)


def test_seed_decides_the_picks_and_the_global_rng_does_not() -> None:
    picks = {}
    for seed in (1, 2, 3):
        random.seed(999 + seed)  # whatever the caller's RNG state, the seed alone decides
        picks[seed] = [d.relpath for d in fewshot(_splits(), 4, seed, use_cache=False).train]
    assert len({tuple(p) for p in picks.values()}) == 3
    assert picks[2] == [d.relpath for d in fewshot(_splits(), 4, 2, use_cache=False).train]


@pytest.mark.parametrize("key", ["shot2-seed1", "shot8-seed3"])
def test_cache_hit_gives_the_same_picks_and_rng_state_as_sampling(key) -> None:
    shots, seed = _shots_seed(key)
    splits = _splits(name=f"fixture-cache-{key}")
    fresh = fewshot(splits, shots, seed)  # samples and writes the cache
    after_sampling = _rng_state()
    random.seed(12345)
    torch.manual_seed(12345)
    np.random.seed(12345)
    hit = fewshot(splits, shots, seed)  # read back from the cache
    after_hit = _rng_state()
    want = FIXTURE["picks"][key]["train"]
    assert [d.relpath for d in hit.train] == [d.relpath for d in fresh.train] == want
    assert [d.relpath for d in hit.val] == FIXTURE["picks"][key]["val"]
    assert after_hit == after_sampling
    # and that state is the seed's: what the reference toolkit leaves after the same draws
    assert after_sampling == _rng_state_after_reference(splits, shots, seed)


def _rng_state_after_reference(splits: DatasetSplits, shots: int, seed: int) -> tuple:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for items, k in ((splits.train, shots), (splits.val, min(shots, 4))):
        groups: dict[int, list] = {}
        for d in items:
            groups.setdefault(d.label, []).append(d)
        for g in groups.values():
            if len(g) >= k:
                random.sample(g, k)
    return _rng_state()


# ------------------------------------------------------------------- errors, warnings and the cache file
@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4"])
def test_bad_shots_are_one_line_errors(bad) -> None:
    with pytest.raises(VlpromptError, match=f"shots must be a positive integer, got {bad!r}; use one of"):
        fewshot(_splits(), bad, seed=1, use_cache=False)


def test_resampling_and_missing_train_are_one_line_errors() -> None:
    once = fewshot(_splits(), 2, seed=1, use_cache=False)
    with pytest.raises(
        VlpromptError, match="fixture is already a 2-shot split; sample from the full data set"
    ):
        fewshot(once, 2, seed=1, use_cache=False)
    with pytest.raises(VlpromptError, match="fixture has no training split .*few-shot needs a training set"):
        fewshot(_splits().with_(train=[]), 2, seed=1, use_cache=False)


def test_short_classes_warn_with_source_and_count(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vlprompt.data.fewshot"):
        fewshot(_splits(), 8, seed=1, use_cache=False)  # train counts 9 3 7 1 12, val 4 2 5 1 3
        sample_per_class(_splits().train, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "fixture train: 3 classes have fewer than 8 images; using all of theirs",
        "fixture val: 3 classes have fewer than 4 images; using all of theirs",
        "few-shot: 2 classes have fewer than 4 images; using all of theirs",
    ]
    caplog.clear()
    splits = _splits(name="fixture-warn")
    for _ in range(2):  # sampled, then a cache hit: the same warnings
        with caplog.at_level(logging.WARNING, logger="vlprompt.data.fewshot"):
            fewshot(splits, 8, seed=1)
        assert [r.getMessage() for r in caplog.records] == [
            "fixture-warn train: 3 classes have fewer than 8 images; using all of theirs",
            "fixture-warn val: 3 classes have fewer than 4 images; using all of theirs",
        ]
        caplog.clear()


@pytest.mark.parametrize(
    "name,folder",
    [
        ("_folder:/data/My PetsX!", "folder_data_My_PetsX"),
        ("!!!", "dataset"),
        ("a" * 70, "a" * 60),
    ],
)
def test_cache_file_is_where_and_what_it_says(name, folder, caplog) -> None:
    splits = _splits(name=name)
    with caplog.at_level(logging.WARNING, logger="vlprompt.data.fewshot"):
        fs = fewshot(splits, 2, seed=3)
    path = cache_dir() / "fewshot" / folder / f"shot2-seed3-{split_hash(splits)[:16]}.json"
    assert path.is_file(), sorted(p.name for p in (cache_dir() / "fewshot").iterdir())
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "dataset": name,
        "shots": 2,
        "seed": 3,
        "split_hash": split_hash(splits),
        "train": FIXTURE["picks"]["shot2-seed3"]["train"],
        "val": FIXTURE["picks"]["shot2-seed3"]["val"],
    }
    assert [d.relpath for d in fs.train] == FIXTURE["picks"]["shot2-seed3"]["train"]
    assert "stale" not in caplog.text


def test_cache_is_authoritative_and_use_cache_false_ignores_it(caplog) -> None:
    """A valid cache file is what a run uses (the picks other tools wrote), stale ones are replaced."""
    splits = _splits(name="fixture-authoritative")
    fewshot(splits, 1, seed=1)
    path = cache_dir() / "fewshot" / "fixture-authoritative" / f"shot1-seed1-{split_hash(splits)[:16]}.json"
    cached = json.loads(path.read_text(encoding="utf-8"))
    other = {
        **cached,
        "train": [r for r, _ in FIXTURE["train"][:3]],
        "val": [r for r, _ in FIXTURE["val"][:2]],
    }
    path.write_text(json.dumps(other), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vlprompt.data.fewshot"):
        hit = fewshot(splits, 1, seed=1)
        assert [d.relpath for d in hit.train] == other["train"] and [d.relpath for d in hit.val] == other[
            "val"
        ]
        assert "stale" not in caplog.text
        fresh = fewshot(splits, 1, seed=1, use_cache=False)  # neither reads nor writes the file
        assert [d.relpath for d in fresh.train] == FIXTURE["picks"]["shot1-seed1"]["train"]
        assert "stale" not in caplog.text
    assert json.loads(path.read_text(encoding="utf-8")) == other
    for broken in ("{not json", json.dumps({**cached, "train": ["gone.jpg"]}), json.dumps({"val": []})):
        path.write_text(broken, encoding="utf-8")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vlprompt.data.fewshot"):
            again = fewshot(splits, 1, seed=1)
        assert [r.getMessage() for r in caplog.records] == [f"ignoring stale few-shot cache {path}"]
        assert [d.relpath for d in again.train] == FIXTURE["picks"]["shot1-seed1"]["train"]
        assert json.loads(path.read_text(encoding="utf-8")) == cached  # rewritten


def test_unsampled_val_stays_whole_through_the_cache(caplog) -> None:
    """Data sets whose val is their test set (ImageNet) set ``extra["fewshot_val"] = False``."""
    splits = _splits(name="fixture-whole-val")
    splits.extra["fewshot_val"] = False
    for _ in range(2):  # sampled, then read from the cache
        with caplog.at_level(logging.WARNING, logger="vlprompt.data.fewshot"):
            fs = fewshot(splits, 2, seed=1)
        assert fs.val is splits.val
        assert [d.relpath for d in fs.train] == FIXTURE["picks"]["shot2-seed1"]["train"]
        assert [r.getMessage() for r in caplog.records] == [
            "fixture-whole-val train: 1 classes have fewer than 2 images; using all of theirs"
        ]  # the same on the hit (no "stale"), and val is never sampled
        caplog.clear()
    path = cache_dir() / "fewshot" / "fixture-whole-val" / f"shot2-seed1-{split_hash(splits)[:16]}.json"
    assert json.loads(path.read_text(encoding="utf-8"))["val"] is None
