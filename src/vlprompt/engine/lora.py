"""Low-rank deltas on the frozen attention projections (LoRA): an attention mode a plan can name.

A method declares, per block, low-rank factors ``A`` (r, d) and ``B`` (d, r) for any of the query, key,
value and output projections; the block then computes ``W' = W + s · B A`` for each such projection
(``s`` the method's scale).  The base weights stay frozen and untouched: the delta is formed on the fly,
so gradients reach only ``A`` and ``B``.  With input dropout active (training, ``p > 0``) the delta is
applied unmerged, ``x Wᵀ + s · drop(x) Aᵀ Bᵀ`` with an independent mask per projection (LoRA's recipe);
otherwise it is merged into the weight, which is the same function and one matmul per projection.
The attention itself is SDPA under the engine's masks (:func:`joint_mask`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.engine.attention import AttnContext, joint_mask, standard_attention

PROJECTIONS = ("q", "k", "v", "o")


class LowRankAttention:
    """Attention with low-rank deltas ``{layer: {proj: (A, B)}}`` (proj in q, k, v, o); blocks without
    deltas run :func:`standard_attention`."""

    def __init__(
        self,
        deltas: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
        scale: float,
        dropout: float = 0.0,
        training: bool = False,
    ):
        bad = {p for d in deltas.values() for p in d} - set(PROJECTIONS)
        if bad:
            raise ValueError(f"unknown projection(s) {sorted(bad)}; use {PROJECTIONS}")
        self.deltas = deltas
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.training = bool(training)

    def _project(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ab) -> torch.Tensor:
        if ab is None:
            return F.linear(x, w, b)
        a, bm = ab[0].to(x.dtype), ab[1].to(x.dtype)
        if self.training and self.dropout > 0:
            delta = F.linear(F.linear(F.dropout(x, self.dropout, training=True), a), bm)
            return F.linear(x, w, b) + delta * self.scale
        return F.linear(x, w + (bm @ a) * self.scale, b)

    def __call__(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        layer = self.deltas.get(ctx.layer)
        if not layer:
            return standard_attention(mha, x, ctx)
        n, length, d = x.shape
        h = mha.num_heads
        w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
        heads = []
        for i, name in enumerate(("q", "k", "v")):
            b = None if b_in is None else b_in[i * d : (i + 1) * d]
            t = self._project(x, w_in[i * d : (i + 1) * d], b, layer.get(name))
            heads.append(t.view(n, length, h, d // h).transpose(1, 2))
        q, k, v = heads
        if length == ctx.n_inst:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=joint_mask(ctx, length, x.device))
        o = o.transpose(1, 2).reshape(n, length, d)
        return self._project(o, mha.out_proj.weight, mha.out_proj.bias, layer.get("o"))
