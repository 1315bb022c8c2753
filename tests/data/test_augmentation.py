"""Training augmentation is the recipe's (CoOp/Dassl): RandomResizedCrop(scale 0.08..1, ratio 3/4..4/3)
+ horizontal flip at p = 0.5; evaluation is deterministic Resize + CenterCrop.

The crops are *measured*, not read off the transform's attributes: the source image encodes each
pixel's own coordinates (red = x, green = y), so the first and last output pixels of a transformed
image name the crop box in source pixels and whether it was flipped.  Nearest interpolation keeps
the decoded coordinates exact (the crop parameters do not depend on the interpolation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlprompt.data import CLIP_MEAN, CLIP_STD, Datum, build_transform

W, H = 256, 192  # source size: red/green hold x/y exactly (uint8)
SIZE = 224
DRAWS = 300


def _coordinate_image() -> Image.Image:
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 77)], axis=-1).astype(np.uint8))


def _pixels(t: torch.Tensor) -> np.ndarray:
    """Undo ToTensor + Normalize: (3, S, S) -> uint8-valued (S, S, 3)."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return torch.round((t * std + mean) * 255).permute(1, 2, 0).numpy().astype(int)


def _crop(t: torch.Tensor) -> tuple[int, int, int, int, bool]:
    """``(x0, y0, w, h, flipped)`` of the crop that produced ``t``, in source pixels."""
    p = _pixels(t)
    left, right = p[0, 0, 0], p[0, -1, 0]
    flipped = bool(left > right)
    x0, x1 = min(left, right), max(left, right)
    y0, y1 = p[0, 0, 1], p[-1, 0, 1]
    assert (p[..., 2] == 77).all()  # the decoding itself is exact
    return int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1), flipped


@pytest.fixture(scope="module")
def crops() -> list[tuple[int, int, int, int, bool]]:
    img = _coordinate_image()
    tf = build_transform(train=True, size=SIZE, interpolation="nearest")
    torch.manual_seed(0)
    return [_crop(tf(img)) for _ in range(DRAWS)]


def test_flips_happen_about_half_the_time(crops) -> None:
    rate = sum(c[4] for c in crops) / len(crops)
    assert 0.4 <= rate <= 0.6, rate  # p = 0.5; 300 draws: sd 0.029


def test_crop_scale_and_ratio_within_the_recipe_ranges(crops) -> None:
    area = np.array([w * h / (W * H) for _, _, w, h, _ in crops])
    ratio = np.array([w / h for _, _, w, h, _ in crops])
    assert all(0 <= x0 and x0 + w <= W and 0 <= y0 and y0 + h <= H for x0, y0, w, h, _ in crops)
    # torchvision rounds w and h to whole pixels: allow one pixel either way
    assert area.min() >= 0.08 * (1 - 2 / H) and area.max() <= 1.0
    assert ratio.min() >= 0.75 * (1 - 2 / H) and ratio.max() <= (4 / 3) * (1 + 2 / H)
    # and the whole range is used (uniform in area, log-uniform in ratio)
    assert area.min() < 0.12 and area.max() > 0.9, (area.min(), area.max())
    assert ratio.min() < 0.8 and ratio.max() > 1.25, (ratio.min(), ratio.max())
    assert len({(x0, y0) for x0, y0, *_ in crops}) > 0.9 * len(crops)  # positions vary too


def test_different_seeds_give_different_crops_same_seed_the_same() -> None:
    img = _coordinate_image()
    tf = build_transform(train=True, size=SIZE, interpolation="nearest")

    def draw(seed: int) -> tuple:
        torch.manual_seed(seed)
        return tuple(_crop(tf(img)) for _ in range(4))

    assert draw(1) == draw(1)
    assert len({draw(s) for s in range(5)}) == 5


def test_default_train_transform_is_random_and_full_size() -> None:
    """The transform the trainer builds (backbone's size, bicubic) augments too, not only the test setup."""
    img = _coordinate_image()
    tf = build_transform(train=True)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(6)]
    assert all(o.shape == (3, 224, 224) for o in outs)
    assert len({o.sum().item() for o in outs}) == 6


def test_evaluation_is_deterministic_resize_and_centre_crop() -> None:
    img = _coordinate_image()
    tf = build_transform(train=False, size=SIZE, interpolation="nearest")
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(1)
    b = tf(img)
    assert torch.equal(a, b)
    # shorter side (192) -> 224: the whole height, the centred 192 of 256 columns, never flipped
    assert _crop(a) == (32, 0, 192, 192, False)


def test_trainer_wraps_training_items_with_the_train_transform(tmp_path) -> None:
    """``fit`` on Datum items augments the training split and not the evaluation split."""
    from vlprompt.backbones import load_backbone
    from vlprompt.methods import create_model
    from vlprompt.train.trainer import _as_dataset

    path = tmp_path / "coords.png"
    _coordinate_image().save(path)
    items = [Datum(str(path), 0, "a", path.name)]
    bb = load_backbone("vlp-tiny")
    bb.clip.visual.image_mean, bb.clip.visual.image_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not CLIP's
    model = create_model("zeroshot", bb, ["a", "b"])
    train_ds = _as_dataset(items, model, train=True)
    eval_ds = _as_dataset(items, model, train=False)
    torch.manual_seed(0)
    train_draws = {train_ds[0][0].sum().item() for _ in range(5)}
    eval_draws = {eval_ds[0][0].sum().item() for _ in range(5)}
    assert len(train_draws) == 5 and len(eval_draws) == 1
    # the backbone's own statistics, not the defaults
    assert torch.equal(eval_ds[0][0], build_transform(False, **bb.preprocess_cfg)(_coordinate_image()))
