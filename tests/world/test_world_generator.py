"""The generated world: deterministic images and captions, visible attributes, domains, the data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from open_clip.tokenizer import SimpleTokenizer

from vlprompt.data import get_dataset, list_datasets
from vlprompt.world import scene as world
from vlprompt.world.pretrain import world_token_ids
from vlprompt.world.sets import BASE2NEW_SETS, DG_SOURCE, DG_TARGETS, WORLD_SETS, class_scene

SRC = Path(__file__).resolve().parents[2] / "src" / "vlprompt"


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
    masks = {s: world.shape_mask(s, 48, 48, 30, 96) for s in world.SHAPES}
    for s, m in masks.items():
        assert 400 < m.sum() < 96 * 96 / 2, s  # drawn, and smaller than the canvas
    shapes = list(masks)
    for i, s in enumerate(shapes):
        for t in shapes[i + 1 :]:
            assert (masks[s] ^ masks[t]).sum() > 300, (s, t)  # no two shapes are near-identical


def test_object_colour_and_texture_are_painted() -> None:
    obj = world.WorldObject("square", "red", "large", "plain", 0.5, 0.5, 0.32)
    img = world.render(world.Scene("black", (obj,)), np.random.default_rng(0)).astype(int)
    centre = img[18:30, 18:30].reshape(-1, 3).mean(0)
    assert centre[0] > 180 and centre[1] < 80 and centre[2] < 80  # red, not the black background
    assert img[:3, :3].mean() < 50
    striped = world.render(
        world.Scene("black", (world.WorldObject("square", "red", "large", "striped", 0.5, 0.5, 0.32),)),
        np.random.default_rng(0),
    ).astype(int)
    assert striped[14:34, 14:34, 0].std() > 40 > img[14:34, 14:34, 0].std()  # two tones vs one


def test_captions_only_name_what_the_image_shows() -> None:
    for i in range(300):
        rng = np.random.default_rng([3, i])
        scene = world.sample_scene(rng)
        cap = world.caption(scene, rng)
        words = set(cap.replace(".", " ").replace(":", " ").split())
        shown = {w for o in scene.objects for w in (o.shape, o.colour, o.texture, o.size)}
        for vocab in (world.SHAPES, world.COLOURS, world.TEXTURES, world.NAMED_SIZES):
            assert words & set(vocab) <= shown, cap
        if words & set(world.BACKGROUNDS) - {"noisy"}:
            assert scene.background in words, cap
    assert len(world.TEMPLATES_ONE) + len(world.TEMPLATES_MANY) >= 20


def test_compact_token_table_covers_captions_class_names_and_init_words() -> None:
    tok = SimpleTokenizer(context_length=24)
    ids = set(world_token_ids(tok))
    assert len(ids) < 200  # of 49,408: the checkpoint stores only these rows
    seen: set[int] = set()
    for i in range(600):
        _, cap = world.sample_pair(11, i)
        enc = tok.encode(cap)
        assert set(enc) <= ids, cap
        assert len(enc) + 2 <= 24, cap  # fits the context without truncation
        seen |= set(enc)
    for ws in WORLD_SETS.values():
        for name in ws.classnames:
            assert set(tok.encode(ws.template.format(name))) <= ids, name
    # every word a preset initialises a prompt from occurs in the pretraining text
    inits = {"a photo of a", "X"}
    for f in (SRC / "methods" / "presets").glob("*.yaml"):
        raw = yaml.safe_load(f.read_text())
        for section in [raw, *((raw.get("protocols") or {}).values())]:
            init = ((section or {}).get("options") or {}).get("ctx_init")
            if init and init != "template":
                inits.add(init)
    for init in inits:
        assert set(tok.encode(init)) <= seen, init


def test_domains_render_the_same_scene() -> None:
    src = WORLD_SETS[DG_SOURCE]
    assert len(DG_TARGETS) >= 3 and len(world.DOMAINS) >= 4
    for name in DG_TARGETS:
        ws = WORLD_SETS[name]
        assert ws.test_only and ws.classnames == src.classnames
        for label, k in ((0, 0), (3, 30), (7, 47)):
            assert class_scene(ws, label, k)[0] == class_scene(src, label, k)[0]
    scene, _ = class_scene(src, 2, 40)
    imgs = [world.render(scene, np.random.default_rng(0), domain=d) for d in world.DOMAINS]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean() > 8  # styles differ


def test_world_sets_are_listed_and_generated_without_root() -> None:
    names = list_datasets()
    assert len(BASE2NEW_SETS) >= 8 and set(BASE2NEW_SETS) | set(DG_TARGETS) <= set(names)
    src = get_dataset(DG_SOURCE)
    for name in DG_TARGETS:
        dg = get_dataset(name)
        assert [(d.relpath, d.label) for d in dg.test] == [(d.relpath, d.label) for d in src.test]


@pytest.mark.parametrize("name", BASE2NEW_SETS)
def test_world_data_sets_size_and_mixed_halves(name: str) -> None:
    ws = WORLD_SETS[name]
    splits = get_dataset(name)
    n = len(ws.classnames)
    assert n >= 4
    assert (len(splits.train), len(splits.val), len(splits.test)) == tuple(c * n for c in ws.counts)
    assert ws.counts[0] >= 16  # 16-shot few-shot fits
    assert splits.classnames == list(ws.classnames)
    half = (n + 1) // 2
    for part in (ws.values[:half], ws.values[half:]):
        for axis, values in zip(ws.attributes, zip(*part)):
            # each half mixes the values: >= 2 of them (one-attribute sets: disjoint halves of the values)
            assert len(set(values)) >= 2, (axis, part)
    if len(ws.attributes) > 1:
        base, new = set(ws.values[:half]), set(ws.values[half:])
        assert not base & new and all(set(v) <= {x for b in base for x in b} for v in new)
    again = get_dataset(name)  # cached, identical
    assert [d.relpath for d in again.test] == [d.relpath for d in splits.test]


def test_data_and_backbones_never_import_the_world() -> None:
    for layer in ("data", "backbones"):
        for f in (SRC / layer).rglob("*.py"):
            text = f.read_text()
            assert "import vlprompt.world" not in text and "from vlprompt.world" not in text, f
            assert "from vlprompt import world" not in text, f  # world sits above them


def test_families_share_all_but_one_attribute() -> None:
    """Hard negatives: a family's 8 scenes differ in exactly one attribute, through all its values."""
    kinds = []
    for fam in range(40):
        _, _, labels = world.sample_batch(3, fam * world.FAMILY, world.FAMILY, labels=True)
        names = list(world.LABELLED)
        varying = [n for i, n in enumerate(names) if len(set(labels[:, i])) > 1]
        if len(varying) == 1 and varying[0] != "background":
            kind = varying[0]
            n_values = len(world.LABELLED[kind])
            assert len(set(labels[:, names.index(kind)])) == min(n_values, world.FAMILY), (fam, labels)
            kinds.append(kind)
    assert 0.6 <= len(kinds) / 40 <= 0.9  # FAMILY_SHARE of the stream (0.75), the rest free scenes
    assert {"shape", "texture"} <= set(kinds)


def test_labels_are_the_first_objects_attributes() -> None:
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, 2, background="gray", shape="star", colour="red", texture="dotted")
    labels = world.scene_labels(scene)
    assert labels[:3] == [world.SHAPES.index("star"), list(world.COLOURS).index("red"), 2]
    assert labels[4] == world.BACKGROUNDS.index("gray")
    _, caps, lab = world.sample_batch(5, 0, 4, labels=True)
    assert lab.shape == (4, len(world.LABELLED)) and lab.dtype == np.int64


def test_most_scenes_frame_their_object_near_the_middle() -> None:
    rng = np.random.default_rng(1)
    near = [world.position_of(world.sample_scene(rng, 1).objects[0]) == "middle" for _ in range(400)]
    # the iconic share, plus the few free placements that land in the middle by chance
    assert world.ICONIC <= np.mean(near) <= world.ICONIC + 0.15
    placed = world.sample_scene(rng, 1, position="left").objects[0]
    assert world.position_of(placed) == "left"  # a fixed position is never moved to the middle
