"""``LayerOps.adapter``: a residual side branch ``block(x) + adapter(ln_1(x))`` on chosen blocks."""

from __future__ import annotations

import pytest
import torch

import vlprompt
from vlprompt.engine import LayerOps, TowerPlan, encode_image, encode_text


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return vlprompt.load_backbone("vlp-tiny")


def _texts(backbone):
    toks = backbone.tokenize(["a photo of a dog.", "a photo of a very small grey cat.", "hi"])
    return backbone.clip.token_embedding(toks), toks.argmax(-1)


def _zero(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(h)


def test_zero_adapter_is_exactly_no_adapter(backbone):
    clip = backbone.clip
    embeds, eot = _texts(backbone)
    torch.manual_seed(1)
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for layers in ({0: LayerOps(adapter=_zero)}, {i: LayerOps(adapter=_zero) for i in range(1, 3)}):
            plan = TowerPlan(layers=layers)
            assert torch.equal(encode_text(clip, embeds, eot, plan), encode_text(clip, embeds, eot))
            assert torch.equal(encode_image(clip.visual, img, plan), encode_image(clip.visual, img))


def test_adapter_adds_its_output_to_the_block_output(backbone):
    """By hand: run the blocks one by one and add ``f(ln_1(x))`` after the chosen block."""
    clip = backbone.clip
    torch.manual_seed(2)
    img = torch.randn(2, 3, 224, 224)
    w = torch.randn(clip.visual.transformer.width, clip.visual.transformer.width) * 0.1
    layer = 1

    def f(h):
        return torch.tanh(h @ w)

    visual = clip.visual
    with torch.no_grad():
        out = encode_image(visual, img, TowerPlan(layers={layer: LayerOps(adapter=f)}))
        x = visual.conv1(img)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        for i, block in enumerate(visual.transformer.resblocks):
            y = block(x)
            x = y + f(block.ln_1(x)) if i == layer else y
        ref = visual.ln_post(x[:, 0]) @ visual.proj
        plain = encode_image(visual, img)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out - plain).abs().max().item() > 1e-3  # the adapter does change the features


def test_adapter_text_is_exact_under_truncation_and_checkpointing(backbone):
    clip = backbone.clip
    embeds, eot = _texts(backbone)
    lin = torch.nn.Linear(clip.transformer.width, clip.transformer.width)
    plan = TowerPlan(layers={1: LayerOps(adapter=lin)})
    full = encode_text(clip, embeds, eot, plan, truncate=False)
    cut = encode_text(clip, embeds, eot, plan, truncate=True, share_prefix=True)
    assert (full - cut).abs().max().item() <= 1e-5
    (g1,) = torch.autograd.grad(full.square().sum(), lin.weight)
    ck = encode_text(clip, embeds, eot, plan, truncate=False, checkpoint=True)
    (g2,) = torch.autograd.grad(ck.square().sum(), lin.weight)
    assert torch.equal(ck, full) and torch.allclose(g1, g2, atol=1e-6)
    assert g1.abs().sum() > 0
