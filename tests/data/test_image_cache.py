"""The shared preprocessed-image cache: exact equality with the decoding path (evaluation batches, metrics,
training augmentation), hits, damaged/stale entries rebuilt, the size cap, concurrent builders, settings."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from vlprompt.backbones import load_backbone
from vlprompt.data import build_loader, build_transform, get_dataset
from vlprompt.data import image_cache as IC
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.train.evaluate import evaluate

PRE = {
    "size": 32,
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
}


@pytest.fixture()
def items():
    return get_dataset("demo").test[:20]


def _uncached(items, pre=PRE, bs=8):
    return build_loader(items, build_transform(False, **pre), bs, shuffle=False)


def test_eval_batches_and_metrics_equal_the_decoding_path(tmp_path, items):
    bb = load_backbone("vlp-tiny")
    pre = bb.preprocess_cfg
    cache = IC.ImageCache(tmp_path / "c", max_bytes=10**9)
    first = IC.cached_eval_loader(items, pre, 8, dataset="demo", cache=cache)
    again = IC.cached_eval_loader(items, pre, 8, dataset="demo", cache=cache)
    assert (cache.builds, cache.hits) == (1, 1)
    ref = list(_uncached(items, pre))
    for loader in (first, again):
        got = list(loader)
        assert len(got) == len(ref) == 3
        for (x, y), (rx, ry) in zip(got, ref):
            assert x.dtype == rx.dtype and torch.equal(x, rx) and torch.equal(y, ry)  # bit-identical
    model = create_model("coop", bb, get_dataset("demo").classnames, n_ctx=4)
    with torch.no_grad():
        assert torch.equal(model(next(iter(again))[0]), model(ref[0][0]))
    with_cache = evaluate(model, again, confusion=True)
    without = evaluate(model, _uncached(items, pre), confusion=True)
    assert with_cache == without and with_cache["n"] == 20
    # the file holds exactly the cropped uint8 pixels: 20 images x 224 x 224 x 3 bytes
    assert cache.size_bytes() == 20 * 224 * 224 * 3


def test_training_augmentation_unchanged_with_decoded_cache(tmp_path):
    items = get_dataset("demo").train[:12]
    tf = build_transform(True, size=24)
    cache = IC.ImageCache(tmp_path, max_bytes=10**9)
    ds = IC.cached_train_dataset(items, tf, dataset="demo", cache=cache)
    assert ds is not None and len(ds) == 12
    for _ in range(2):  # twice: same crops and flips as the decoding loader with the same seeds
        torch.manual_seed(123)
        got = [(x.clone(), y) for x, y in build_loader(ds, None, 4, shuffle=True, seed=7)]
        torch.manual_seed(123)
        ref = [(x.clone(), y) for x, y in build_loader(items, tf, 4, shuffle=True, seed=7)]
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(got, ref))
    assert (cache.builds, cache.hits) == (1, 0)
    assert IC.cached_train_dataset(items, tf, dataset="demo", cache=cache) is not None and cache.hits == 1


def test_damaged_and_stale_entries_are_rebuilt(tmp_path, items, caplog):
    cache = IC.ImageCache(tmp_path, max_bytes=10**9)
    entry = IC.cached_eval_entry(items, "demo", size=32, cache=cache)
    ref = [x for x, _ in IC.CachedImageDataset(entry)]
    # flip one byte: the checksum catches it (a fresh process: forget what was verified)
    raw = bytearray(entry.data.read_bytes())
    raw[100] ^= 0xFF
    entry.data.write_bytes(bytes(raw))
    IC._VERIFIED.clear()
    caplog.set_level("WARNING")
    again = IC.cached_eval_entry(items, "demo", size=32, cache=cache)
    assert "checksum mismatch" in caplog.text and cache.builds == 2
    assert all(torch.equal(a, b) for a, b in zip(ref, (x for x, _ in IC.CachedImageDataset(again))))
    # truncated pixel file
    with open(again.data, "r+b") as f:
        f.truncate(1000)
    IC.cached_eval_entry(items, "demo", size=32, cache=cache)
    assert "pixel file has 1000 bytes" in caplog.text and cache.builds == 3
    # a damaged header
    (tmp_path / f"{again.key}.json").write_text("{not json")
    IC.cached_eval_entry(items, "demo", size=32, cache=cache)
    assert cache.builds == 4
    # a replaced image file (new mtime) is a different entry: rebuilt, never stale pixels
    p = items[0].impath
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        fresh = IC.cached_eval_entry(items, "demo", size=32, cache=cache)
        assert fresh.key != again.key and cache.builds == 5
    finally:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    # other transforms and splits are other keys
    assert IC.cached_eval_entry(items, "demo", size=24, cache=cache).key != fresh.key
    assert IC.cached_eval_entry(items, "demo", split="val", size=32, cache=cache).key != fresh.key
    head = json.loads((tmp_path / f"{fresh.key}.json").read_text())
    assert head["ident"]["dataset"] == "demo" and head["ident"]["size"] == 32 and len(head["labels"]) == 20


def test_size_cap_evicts_least_recently_used_and_refuses_oversized(tmp_path, items):
    one = 10 * 32 * 32 * 3
    cache = IC.ImageCache(tmp_path, max_bytes=2 * one)
    a = IC.cached_eval_entry(items[:10], "demo", split="a", size=32, cache=cache)
    time.sleep(0.02)
    b = IC.cached_eval_entry(items[10:], "demo", split="b", size=32, cache=cache)
    time.sleep(0.02)
    IC.cached_eval_entry(items[:10], "demo", split="a", size=32, cache=cache)  # a used again: b is older
    time.sleep(0.02)
    c = IC.cached_eval_entry(items[5:15], "demo", split="c", size=32, cache=cache)
    assert cache.size_bytes() == 2 * one
    assert a.data.is_file() and c.data.is_file() and not b.data.exists()
    # 20 images need 2 * one bytes; with a cap below that nothing is cached and the caller decodes
    small = IC.ImageCache(tmp_path / "small", max_bytes=one)
    assert IC.cached_eval_loader(items, PRE, 8, dataset="demo", cache=small) is None
    assert small.size_bytes() == 0


def test_concurrent_builders_decode_once(tmp_path, items):
    calls = []

    def slow_decode(d):
        calls.append(d.relpath)
        time.sleep(0.01)
        return np.zeros((4, 4, 3), dtype=np.uint8)

    caches = [IC.ImageCache(tmp_path, max_bytes=10**9) for _ in range(2)]
    threads = [threading.Thread(target=c.get, args=(items, {"dataset": "x"}, slow_decode)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == len(items)  # one builder; the other waited on the lock and read its entry
    assert sorted((c.builds, c.hits) for c in caches) == [(0, 1), (1, 0)]


def test_location_and_cap_settings(monkeypatch, tmp_path, items):
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", "off")
    assert IC.ImageCache.default() is None
    assert IC.cached_eval_loader(items, PRE, 8, dataset="demo") is None
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", str(tmp_path / "here"))
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE_GB", "0.5")
    c = IC.ImageCache.default()
    assert c.root == tmp_path / "here" and c.max_bytes == 5 * 10**8
    monkeypatch.delenv("VLPROMPT_IMAGE_CACHE")
    assert IC.default_dir().name == "images"
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE_GB", "lots")
    with pytest.raises(VlpromptError, match="VLPROMPT_IMAGE_CACHE_GB='lots' is not a number"):
        IC.ImageCache.default()


def test_run_layer_evaluates_through_the_cache(monkeypatch, tmp_path):
    from vlprompt.run.train import eval_loader as _eval_loader

    splits = get_dataset("demo")
    bb = load_backbone("vlp-tiny")
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", str(tmp_path))
    loader = _eval_loader(splits, bb, 16, 0)
    assert isinstance(loader, IC.DeviceNormalizeLoader) and loader.norm_device == bb.device
    monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", "off")
    plain = _eval_loader(splits, bb, 16, 0)
    assert not isinstance(plain, IC.DeviceNormalizeLoader)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(loader, plain))


def test_a_run_trained_and_evaluated_through_the_cache_equals_one_without(monkeypatch, tmp_path, capsys):
    """`vlprompt train` (few-shot training images decoded once, test pixels cached) == the decoding path."""
    from safetensors.torch import load_file

    from vlprompt.cli.main import main

    monkeypatch.delenv("VLPROMPT_ATTENTION", raising=False)  # the default, auto, is recorded in env.json

    def train(out, cache):
        monkeypatch.setenv("VLPROMPT_IMAGE_CACHE", cache)
        argv = [
            "train",
            "--method",
            "coop",
            "--dataset",
            "demo",
            "--shots",
            "2",
            "--model",
            "vlp-tiny",
            "--epochs",
            "2",
            "--set",
            "train.batch_size=4",
            "--out",
            str(out),
            "--no-progress",
        ]
        assert main(argv) == 0
        capsys.readouterr()
        metrics = json.loads((out / "metrics.json").read_text())["evaluations"]
        for e in metrics:  # measured time and speed (run/cost.py) are not results
            e.pop("cost", None)
        attention = json.loads((out / "env.json").read_text())["attention"]  # what attention="auto" chose
        assert attention["mode"] == "auto" and attention["choices"]
        return load_file(out / "prompt.safetensors"), metrics

    cached_prompt, cached_metrics = train(tmp_path / "a", str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2  # the training images and the test pixels
    plain_prompt, plain_metrics = train(tmp_path / "b", "off")
    assert cached_prompt.keys() == plain_prompt.keys()
    assert all(torch.equal(cached_prompt[k], plain_prompt[k]) for k in plain_prompt)
    assert cached_metrics == plain_metrics and cached_metrics[0]["n"] > 0
