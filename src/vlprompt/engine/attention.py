"""Attention modes: the seam where a block's self-attention is computed.

An attention mode is a callable ``(mha, x, ctx) -> out``: ``mha`` is the block's frozen
``nn.MultiheadAttention`` (we only read its projection weights), ``x`` the layer-normed tokens
``(N, L, D)`` and ``ctx`` an :class:`AttnContext` saying how many leading tokens are instances,
whether instances attend causally (text tower) and which instance keys prompts may read.
Everything uses ``F.scaled_dot_product_attention``; no Python loop over heads or tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttnContext:
    n_inst: int  # x[:, :n_inst] are instance tokens, x[:, n_inst:] prompt tokens
    causal: bool = False  # instance->instance attention is causal (text tower)
    key_valid: torch.Tensor | None = None  # (N, n_inst) bool: instance keys prompts may read
    layer: int = 0


class Attention(Protocol):
    def __call__(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...


def qkv_heads(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x`` with the block's frozen in-projection into per-head ``(N, H, L, hd)`` q, k, v."""
    n, length, d = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    qkv = qkv.view(n, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(mha: nn.MultiheadAttention, o: torch.Tensor) -> torch.Tensor:
    """``(N, H, L, hd)`` -> ``(N, L, D)`` through the block's frozen out-projection."""
    n, h, length, hd = o.shape
    o = o.transpose(1, 2).reshape(n, length, h * hd)
    return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)


def joint_mask(ctx: AttnContext, length: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = may attend) over ``[instances; prompts]``, or None when no mask is needed.

    Instances attend to instances causally in the text tower and to every prompt; prompts attend
    to every prompt and to the valid instance keys (``key_valid``: in the text tower the tokens up
    to each sequence's end-of-text, so padding never leaks into prompts).
    """
    n_inst = ctx.n_inst
    if not ctx.causal and ctx.key_valid is None:
        return None
    m = torch.ones(length, length, dtype=torch.bool, device=device)
    if ctx.causal:
        m[:n_inst, :n_inst] = torch.ones(n_inst, n_inst, dtype=torch.bool, device=device).tril()
    if ctx.key_valid is None or length == n_inst:
        return m
    m = m.unsqueeze(0).repeat(ctx.key_valid.shape[0], 1, 1)
    m[:, n_inst:, :n_inst] = ctx.key_valid.unsqueeze(1)
    return m.unsqueeze(1)  # (N, 1, L, L)


def standard_attention(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Frozen CLIP multi-head attention over the whole sequence (instances and prompts jointly)."""
    q, k, v = qkv_heads(mha, x)
    length = x.shape[1]
    if length == ctx.n_inst:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_mask(ctx, length, x.device))
    return merge_heads(mha, o)


def plain_attention(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Explicit ``softmax(QK^T/sqrt(d) + mask) V`` -- the reference implementations' computation.

    Same result as :func:`standard_attention` (tested); used by ``vlprompt bench --reference`` to
    measure what SDPA buys, never as a default.
    """
    q, k, v = qkv_heads(mha, x)
    length = x.shape[1]
    mask = joint_mask(ctx, length, x.device)
    o = masked_scores(q, k, mask).softmax(dim=-1) @ v
    return merge_heads(mha, o)


ATTENTION_MODES = {"sdpa": standard_attention, "plain": plain_attention}


def masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled scores ``QK^T/sqrt(d)`` with ``-inf`` where ``mask`` is False (used for exact gates)."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s
