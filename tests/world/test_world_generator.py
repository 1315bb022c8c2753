"""The generated world: deterministic images and captions, shapes that differ, the compact token table."""

from __future__ import annotations

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer

from vlprompt.data import get_dataset, world
from vlprompt.data.worldsets import WORLD_SETS


def test_pairs_are_deterministic_and_random_access() -> None:
    a_img, a_cap = world.sample_pair(7, 123)
    b_img, b_cap = world.sample_pair(7, 123)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, _ = world.sample_pair(7, 124)
    d_img, _ = world.sample_pair(8, 123)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)
    imgs, caps = world.sample_batch(7, 122, 3)
    assert imgs.shape == (3, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and imgs.dtype == np.uint8
    assert np.array_equal(imgs[1], a_img) and caps[1] == a_cap


def test_every_shape_has_its_own_mask() -> None:
    masks = {s: world.shape_mask(s, 32, 32, 20, 64) for s in world.SHAPES}
    for s, m in masks.items():
        assert 150 < m.sum() < 64 * 64 / 2, s  # drawn, and smaller than the canvas
    shapes = list(masks)
    for i, s in enumerate(shapes):
        for t in shapes[i + 1 :]:
            assert (masks[s] ^ masks[t]).sum() > 40, (s, t)  # no two shapes draw the same pixels


def test_object_colour_is_painted() -> None:
    rng = np.random.default_rng(0)
    scene = world.Scene("black", (world.WorldObject("square", "red", "large", "plain", 0.5, 0.5, 0.3),))
    img = world.render(scene, rng).astype(int)
    centre = img[12:20, 12:20].reshape(-1, 3).mean(0)
    assert centre[0] > 180 and centre[1] < 80 and centre[2] < 80  # red, not the black background
    assert img[:3, :3].mean() < 50


def test_captions_name_the_main_objects_shape() -> None:
    for i in range(200):
        rng = np.random.default_rng([3, i])
        scene = world.sample_scene(rng)
        cap = world.caption(scene, rng)
        if cap.startswith("a picture of ") and " shapes on a " in cap:
            continue  # the one template that only counts the objects
        words = cap.replace(".", " ").replace(":", " ").split()
        assert scene.objects[0].shape in words, cap
    assert len(world.TEMPLATES_ONE) + len(world.TEMPLATES_MANY) >= 20


def test_compact_token_table_covers_every_caption_and_class_name() -> None:
    from vlprompt.backbones.pretrain import world_token_ids

    tok = SimpleTokenizer(context_length=24)
    ids = set(world_token_ids(tok))
    assert len(ids) < 200  # of 49,408: the checkpoint stores only these rows
    for i in range(500):
        _, cap = world.sample_pair(11, i)
        assert set(tok.encode(cap)) <= ids, cap
        assert len(tok.encode(cap)) + 2 <= 24, cap  # fits the context without truncation
    for ws in WORLD_SETS.values():
        for name in ws.classnames:
            assert set(tok.encode(ws.template.format(name))) <= ids, name


@pytest.mark.parametrize("name", sorted(WORLD_SETS))
def test_world_data_sets_split_and_mix_attributes(name: str) -> None:
    ws = WORLD_SETS[name]
    splits = get_dataset(name)
    n = len(ws.classnames)
    assert n >= 32
    assert (len(splits.train), len(splits.val), len(splits.test)) == tuple(c * n for c in ws.counts)
    assert splits.classnames == list(ws.classnames)
    base = ws.values[: (n + 1) // 2]
    for values in zip(*base):
        assert len(set(values)) >= 4  # the base half mixes the attributes; new = unseen combinations
    again = get_dataset(name)  # cached, identical
    assert [d.relpath for d in again.test] == [d.relpath for d in splits.test]
