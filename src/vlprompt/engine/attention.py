"""Attention modes: the seam where a block's self-attention is computed.

An attention mode is a callable ``(mha, x, ctx) -> out``: ``mha`` is the block's frozen
``nn.MultiheadAttention`` (we only read its projection weights), ``x`` the layer-normed tokens
``(N, L, D)`` and ``ctx`` an :class:`AttnContext` saying how many leading tokens are instances,
whether instances attend causally (text tower) and which instance keys prompts may read.
No Python loop over heads or tokens.

Two exact implementations -- fused ``F.scaled_dot_product_attention`` ("sdpa") and the explicit
``softmax(QK^T/sqrt(d)) V`` ("plain") -- differ only in rounding and speed, and which is faster depends
on the device, the dtype and the shape (on a 2-core EPYC, SDPA is 2-3x faster on the image tower's
197 tokens while plain wins on 1000 short text sequences). ``"auto"`` (:class:`AutoAttention`, the
default) runs, per *shape class* (:func:`shape_class`: device type, compute dtype, grad on/off, mask
kind, heads, head width, sequence length, batch rounded up to a power of two), the implementation a
table handed to it names: a pure function of the shape given the table (:func:`select_attention`).
Measuring the table, caching it per machine and recording it in a run is the run layer's job
(:mod:`vlprompt.run.attention`); the engine reads no file, environment variable or clock.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
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

    Same result as :func:`standard_attention` up to rounding (tested); the reference implementations'
    computation (``vlprompt bench --reference``) and ``auto``'s alternative to SDPA.
    """
    q, k, v = qkv_heads(mha, x)
    length = x.shape[1]
    mask = joint_mask(ctx, length, x.device)
    o = masked_scores(q, k, mask).softmax(dim=-1) @ v
    return merge_heads(mha, o)


#: the two exact implementations ``"auto"`` chooses between (same result up to rounding)
IMPLEMENTATIONS: dict[str, Attention] = {"sdpa": standard_attention, "plain": plain_attention}
#: the names ``ModelOptions.attention`` accepts
ATTENTION_MODES = ("auto", *IMPLEMENTATIONS)
#: what ``"auto"`` runs for a shape class its table does not name and nobody measures
DEFAULT_IMPLEMENTATION = "sdpa"

#: ``resolve(key, mha, x, ctx) -> "sdpa" | "plain"``: decides a shape class the table lacks (the run
#: layer's measured, cached probe); called once per class, its answer is kept in the table
Resolve = Callable[[str, nn.MultiheadAttention, torch.Tensor, AttnContext], str]


def _mask_kind(ctx: AttnContext, length: int) -> str:
    if length == ctx.n_inst:
        return "causal" if ctx.causal else "none"
    return "mask" if (ctx.causal or ctx.key_valid is not None) else "none"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention of ``x`` runs in (the autocast dtype where autocast is on)."""
    dev = x.device.type
    with contextlib.suppress(AttributeError, RuntimeError):
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return x.dtype


def needs_grad(mha: nn.MultiheadAttention, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or mha.in_proj_weight.requires_grad)


def shape_class(mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> str:
    """The key ``"auto"`` decides by: device type, compute dtype, grad on/off, mask kind, heads, head
    width, sequence length and the batch rounded up to a power of two (e.g.
    ``cpu|float32|nograd|none|H12xhd64|L197|N8``).  Which machine the table was measured on is the
    table owner's business (the run layer keys its cache by machine)."""
    n, length, d = x.shape
    h = mha.num_heads
    nb = 1 << max(0, int(n - 1).bit_length())
    grad = "grad" if needs_grad(mha, x) else "nograd"
    dtype = str(compute_dtype(x)).replace("torch.", "")
    return f"{x.device.type}|{dtype}|{grad}|{_mask_kind(ctx, length)}|H{h}xhd{d // h}|L{length}|N{nb}"


def select_attention(table: Mapping[str, str], key: str) -> str:
    """The implementation for shape class ``key``: the table's entry, else :data:`DEFAULT_IMPLEMENTATION`.

    A pure function: the same table and shape give the same implementation, so a run's rounding does
    not depend on the machine's load (the table is measured once, then read)."""
    impl = table.get(key, DEFAULT_IMPLEMENTATION)
    return impl if impl in IMPLEMENTATIONS else DEFAULT_IMPLEMENTATION


class AutoAttention:
    """``attention="auto"``: the implementation named for each shape class by a table handed in.

    ``table`` maps :func:`shape_class` keys to ``"sdpa"`` / ``"plain"``; ``resolve`` (optional) decides a
    class the table lacks -- the run layer passes its measured, machine-cached probe -- and its answer
    is added to the table, so each class is decided once per model.  Without ``resolve`` a missing
    class runs :data:`DEFAULT_IMPLEMENTATION`.  The engine itself reads no file, environment or clock.
    Under ``torch.compile`` SDPA is used (a data-independent graph).
    """

    def __init__(self, table: Mapping[str, str] | None = None, resolve: Resolve | None = None):
        self.table: dict[str, str] = dict(table or {})
        self.resolve = resolve

    def choose(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> str:
        compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
        if compiling:
            return "sdpa"
        key = shape_class(mha, x, ctx)
        if key not in self.table and self.resolve is not None:
            self.table[key] = self.resolve(key, mha, x, ctx)
        return select_attention(self.table, key)

    def __call__(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return IMPLEMENTATIONS[self.choose(mha, x, ctx)](mha, x, ctx)


def attention_mode(name: str | Attention, auto: AutoAttention | None = None) -> Attention:
    """The attention callable of a mode name: ``"auto"`` -> ``auto`` (else a table-less
    :class:`AutoAttention`, i.e. SDPA), ``"sdpa"`` / ``"plain"`` -> that implementation."""
    if callable(name):
        return name
    if name == "auto":
        return auto if auto is not None else AutoAttention()
    return IMPLEMENTATIONS[name]


def masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled scores ``QK^T/sqrt(d)`` with ``-inf`` where ``mask`` is False (used for exact gates)."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s
