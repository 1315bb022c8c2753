"""Pre-processing shapes/normalisation, deterministic loaders and the exact test-tensor cache."""

from __future__ import annotations

import torch
from PIL import Image

from vlprompt.data import (
    CLIP_MEAN,
    CLIP_STD,
    Datum,
    ImageDataset,
    build_loader,
    build_transform,
    cached_eval_dataset,
    get_dataset,
)


def test_test_transform_shape_and_normalisation():
    img = Image.new("RGB", (300, 200), (255, 0, 128))
    x = build_transform(train=False)(img)
    assert x.shape == (3, 224, 224)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x[:, 100, 100], torch.tensor(expected), atol=1e-5)
    y = build_transform(train=False, size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")(img)
    assert y.shape == (3, 32, 32) and torch.allclose(y[0, 0, 0], torch.tensor(1.0))


def test_train_transform_random_but_seeded():
    img = Image.effect_noise((64, 48), 50).convert("RGB")
    t = build_transform(train=True)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    assert a.shape == (3, 224, 224) and torch.equal(a, t(img))
    torch.manual_seed(1)
    assert not torch.equal(a, t(img))  # random: another seed gives another crop/flip


def test_greyscale_and_palette_converted_to_rgb_and_loader_deterministic(tmp_path):
    items = []
    for mode in ("L", "P", "RGBA"):
        path = tmp_path / f"{mode}.png"
        Image.new(mode, (20, 10)).save(path)
        items.append(Datum(str(path), 0, "x", path.name))
    assert all(x.shape == (3, 32, 32) for x, _ in ImageDataset(items, build_transform(False, size=32)))
    demo = get_dataset("demo")
    items = demo.train[:40]

    def order(seed):
        loader = build_loader(items, build_transform(False, size=8), batch_size=10, shuffle=True, seed=seed)
        return torch.cat([y for _, y in loader]).tolist(), [x.sum().item() for x, _ in loader]

    assert order(3) == order(3)
    assert order(3) != order(4)
    loader = build_loader(
        items, build_transform(False, size=8), batch_size=16, shuffle=False, seed=0, drop_last=True
    )
    assert len(loader) == 2


def test_cached_eval_tensors_are_exact():
    items = get_dataset("demo").test[:12]
    ref = ImageDataset(items, build_transform(train=False, size=48))
    for _ in range(2):  # built, then read from disk
        cached = cached_eval_dataset(items, "demo/test/all", size=48)
        assert len(cached) == len(items)
        for i in range(len(items)):
            x, y = cached[i]
            rx, ry = ref[i]
            assert y == ry and torch.equal(x, rx)


def _flips(tf, n: int = 64) -> int:
    """How many of ``n`` training views of a left-red / right-blue image come out mirrored."""
    img = Image.new("RGB", (48, 48), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 24, 48))
    torch.manual_seed(0)
    views = [tf(img) for _ in range(n)]
    return sum(int(v[0, :, 0].mean() < v[0, :, -1].mean()) for v in views)


def test_a_data_set_can_forbid_the_training_flip(monkeypatch):
    from dataclasses import replace

    from vlprompt.data import SPECS, get_spec, training_preprocess

    cfg = {"size": 48, "scale": (0.5, 1.0)}
    assert 16 <= _flips(build_transform(True, **cfg)) <= 48  # flipped about half of the time
    assert _flips(build_transform(True, **cfg, flip=False)) == 0
    # specs say so; every other data set (built-in, folder:/csv:, unknown) keeps the preprocessing as is
    for name in ("caltech101", "folder:/somewhere", "csv:x.csv", "no-such-set", None):
        assert training_preprocess(cfg, name) is cfg
    monkeypatch.setitem(SPECS, "caltech101", replace(get_spec("caltech101"), flip=False))
    assert training_preprocess(cfg, "Caltech101") == {**cfg, "flip": False}
    assert _flips(build_transform(True, **training_preprocess(cfg, "caltech101"))) == 0
