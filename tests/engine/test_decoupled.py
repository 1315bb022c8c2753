"""Decoupled attention (DPL, reconstructed): the four-sub-process identity and every switch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlprompt.engine import (
    ALL,
    AttnContext,
    LayerOps,
    TowerPlan,
    encode_image,
    encode_text,
    standard_attention,
)
from vlprompt.engine.decoupled import DecoupledAttention, decoupled_attention

D, HEADS, N_INST, N_P, N = 64, 4, 10, 4, 3


@pytest.fixture(scope="module")
def mha() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(D, HEADS, batch_first=True)
    with torch.no_grad():  # larger in-projection -> peaked, non-uniform attention
        m.in_proj_weight.mul_(3.0)
        m.in_proj_bias.normal_(0, 0.5)
        m.out_proj.bias.normal_(0, 0.1)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(N, N_INST + N_P, D, generator=torch.Generator().manual_seed(1))


def _image_ctx() -> AttnContext:
    return AttnContext(n_inst=N_INST)


def _text_ctx() -> AttnContext:
    eot = torch.tensor([3, 9, 6])  # different end-of-text positions per sequence
    return AttnContext(n_inst=N_INST, causal=True, key_valid=torch.arange(N_INST)[None] <= eot[:, None])


def _reference(mha, x, ctx, alpha=None, drop_pp=False):
    """Naive per-row attention written independently of the module (explicit softmax per block)."""
    h, hd = HEADS, D // HEADS
    qkv = x @ mha.in_proj_weight.t() + mha.in_proj_bias
    q, k, v = (t.view(x.shape[0], -1, h, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    n_inst = ctx.n_inst
    allow = torch.ones(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.bool)
    if ctx.causal:
        allow[..., :n_inst, :n_inst] = torch.ones(n_inst, n_inst).tril().bool()
    if ctx.key_valid is not None:
        allow[..., n_inst:, :n_inst] = ctx.key_valid[:, None, None, :]
    if drop_pp:
        allow[..., n_inst:, n_inst:] = False
    s = s.masked_fill(~allow, float("-inf"))
    if alpha is None:
        o = s.softmax(-1) @ v
    else:  # instance rows: (1 - a) softmax(S_xx) V_x + a softmax(S_xp) V_p
        sx = s[..., :n_inst, :]
        o_xx = sx[..., :n_inst].softmax(-1) @ v[..., :n_inst, :]
        o_xp = sx[..., n_inst:].softmax(-1) @ v[..., n_inst:, :]
        a = alpha.view(1, -1, 1, 1)
        o_x = (1 - a) * o_xx + a * o_xp
        o_p = s[..., n_inst:, :].softmax(-1) @ v
        o = torch.cat([o_x, o_p], dim=2)
    o = o.transpose(1, 2).reshape(x.shape[0], -1, D)
    return o @ mha.out_proj.weight.t() + mha.out_proj.bias


@pytest.mark.parametrize("ctx_fn", [_image_ctx, _text_ctx], ids=["image", "text"])
def test_exact_mode_equals_standard_attention(mha, x, ctx_fn):
    ctx = ctx_fn()
    std = standard_attention(mha, x, ctx)
    exact = DecoupledAttention(HEADS, mode="exact")(mha, x, ctx)
    assert exact.shape == std.shape
    assert (exact - std).abs().max() <= 1e-5
    # the identity is not vacuous: prompts change the instance outputs noticeably
    alone = standard_attention(mha, x[:, :N_INST], AttnContext(n_inst=N_INST, causal=ctx.causal))
    assert (std[:, :N_INST] - alone).abs().max() > 1e-2


def test_text_prompts_never_read_padding(mha, x):
    ctx = _text_ctx()
    y = x.clone()
    y[0, 4:N_INST] += 5.0  # tokens after sequence 0's end-of-text (eot=3)
    for mode in ("exact", "gated"):
        att = DecoupledAttention(HEADS, mode=mode)
        a, b = att(mha, x, ctx), att(mha, y, ctx)
        assert (a[0, N_INST:] - b[0, N_INST:]).abs().max() <= 1e-6
        assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)  # causal: earlier tokens unaffected too
        assert (a[1:] - b[1:]).abs().max() == 0


@pytest.mark.parametrize("ctx_fn", [_image_ctx, _text_ctx], ids=["image", "text"])
@pytest.mark.parametrize("gate", ["layer", "head"])
def test_gated_mode_matches_naive_formula(mha, x, ctx_fn, gate):
    ctx = ctx_fn()
    att = DecoupledAttention(HEADS, mode="gated", gate=gate, alpha_init=0.3)
    with torch.no_grad():
        att.a.add_(torch.linspace(-1, 1, att.a.numel()))  # per-head gates differ
    assert att.a.shape == ((HEADS,) if gate == "head" else (1,))
    out = att(mha, x, ctx)
    ref = _reference(mha, x, ctx, alpha=torch.sigmoid(att.a.detach()))
    assert (out - ref).abs().max() <= 1e-5
    assert (out - standard_attention(mha, x, ctx))[:, :N_INST].abs().max() > 1e-3


def test_alpha_init_and_validation():
    att = DecoupledAttention(HEADS, alpha_init=0.05)
    assert torch.allclose(att.alpha, torch.tensor([0.05]))
    assert DecoupledAttention(HEADS, mode="exact").a is None
    cases = [
        ({"mode": "bogus"}, r"mode 'bogus'.*gated, exact"),
        ({"gate": "token"}, r"gate 'token'.*layer, head"),
        ({"alpha_init": 0.0}, r"alpha_init must lie strictly between 0 and 1 or be .auto., got 0.0"),
        ({"alpha_init": 1.0}, r"alpha_init must lie strictly between 0 and 1 or be .auto., got 1.0"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            DecoupledAttention(HEADS, **kwargs)


@pytest.mark.parametrize("ctx_fn", [_image_ctx, _text_ctx], ids=["image", "text"])
def test_closed_gate_is_frozen_attention_over_instances(mha, x, ctx_fn):
    ctx = ctx_fn()
    frozen = standard_attention(mha, x[:, :N_INST], AttnContext(n_inst=N_INST, causal=ctx.causal))
    closed = DecoupledAttention(HEADS, gate_closed=True)
    assert torch.equal(closed.alpha, torch.zeros(1))
    assert torch.equal(closed(mha, x, ctx)[:, :N_INST], frozen)
    limit = DecoupledAttention(HEADS)
    with torch.no_grad():
        limit.a.fill_(float("-inf"))  # alpha -> 0 through the parameter itself
    assert (limit(mha, x, ctx)[:, :N_INST] - frozen).abs().max() <= 1e-6


@pytest.mark.parametrize("ctx_fn", [_image_ctx, _text_ctx], ids=["image", "text"])
def test_drop_pp_changes_prompt_rows_only(mha, x, ctx_fn):
    ctx = ctx_fn()
    for mode in ("gated", "exact"):
        keep = DecoupledAttention(HEADS, mode=mode)(mha, x, ctx)
        drop = DecoupledAttention(HEADS, mode=mode, drop_pp=True)(mha, x, ctx)
        assert torch.equal(keep[:, :N_INST], drop[:, :N_INST])
        assert (keep[:, N_INST:] - drop[:, N_INST:]).abs().max() > 1e-3
        ref = _reference(mha, x, ctx, drop_pp=True)  # prompts attend only to (valid) instances
        assert (drop[:, N_INST:] - ref[:, N_INST:]).abs().max() <= 1e-5


@pytest.mark.parametrize("ctx_fn", [_image_ctx, _text_ctx], ids=["image", "text"])
def test_exact_and_gated_differ_only_in_instance_rows(mha, x, ctx_fn):
    ctx = ctx_fn()
    exact = decoupled_attention(mha, x, ctx, alpha=None)
    gated = decoupled_attention(mha, x, ctx, alpha=torch.tensor([0.05]))
    assert (exact[:, N_INST:] - gated[:, N_INST:]).abs().max() <= 1e-5
    assert (exact[:, :N_INST] - gated[:, :N_INST]).abs().max() > 1e-3


def test_no_prompts_falls_back_to_plain_attention(mha, x):
    for ctx in (_image_ctx(), AttnContext(n_inst=N_INST, causal=True)):
        out = DecoupledAttention(HEADS)(mha, x[:, :N_INST], ctx)
        assert (out - standard_attention(mha, x[:, :N_INST], ctx)).abs().max() <= 1e-6


def test_gate_receives_gradient(mha, x):
    att = DecoupledAttention(HEADS, gate="head")
    att(mha, x, _text_ctx()).square().sum().backward()
    assert att.a.grad is not None and (att.a.grad != 0).all()


# ---------------------------------------------------------------- whole towers (vlp-tiny)
def _plan(n: int, width: int, layers: int, attention) -> TowerPlan:
    g = torch.Generator().manual_seed(3)
    deep = {i: LayerOps(remove=ALL, append=torch.randn(4, width, generator=g)) for i in range(1, layers - 1)}
    return TowerPlan(shallow=torch.randn(n, width, generator=g), layers=deep, attention=attention)


def test_exact_mode_equals_standard_in_both_towers(tiny):
    clip = tiny.clip
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    width_i, layers_i = tiny.image.width, tiny.image.layers
    exact_i = DecoupledAttention(tiny.image.heads, mode="exact")
    a = encode_image(clip.visual, images, _plan(4, width_i, layers_i, exact_i))
    b = encode_image(clip.visual, images, _plan(4, width_i, layers_i, None))
    assert (a - b).abs().max() <= 1e-5
    ids = tiny.tokenize(["a photo of a cat.", "a photo of a very small brown dog."])
    eot = ids.argmax(-1)
    embeds = tiny.token_embed(ids).float()
    width_t, layers_t = tiny.text.width, tiny.text.layers
    exact_t = DecoupledAttention(tiny.text.heads, mode="exact")
    a = encode_text(clip, embeds, eot, _plan(4, width_t, layers_t, exact_t))
    b = encode_text(clip, embeds, eot, _plan(4, width_t, layers_t, None))
    assert (a - b).abs().max() <= 1e-5
    gated = encode_text(clip, embeds, eot, _plan(4, width_t, layers_t, DecoupledAttention(tiny.text.heads)))
    assert (gated - b).abs().max() > 1e-4
