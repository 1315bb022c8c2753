"""The prompted transformer: open_clip's text and image tower forwards with per-layer prompt ops.

Written once for every method.  With an empty plan and standard attention these reproduce
open_clip's ``encode_text`` / ``encode_image`` (tested to 1e-5 in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from vlprompt.engine.attention import (
    Attention,
    AttnContext,
    AutoAttention,
    merge_heads,
    qkv_heads,
    standard_attention,
)
from vlprompt.engine.plan import ALL, LayerOps, TowerPlan


def _batched(t: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Prompt tokens ``(k, d)`` or ``(N, k, d)`` as ``(N, k, d)`` in the stream's dtype."""
    t = t.to(dtype)
    if t.dim() == 2:
        return t.unsqueeze(0).expand(n, -1, -1)
    if t.shape[0] != n:
        raise ValueError(f"prompt batch {t.shape[0]} does not match token batch {n}")
    return t


def apply_ops(x: torch.Tensor, op: LayerOps, n_inst: int, layer: int) -> torch.Tensor:
    """Apply one layer's replace / remove / append(+blend) to ``x = [instances; prompts]``."""
    n, length, _ = x.shape
    if op.replace is not None:
        rep = _batched(op.replace, n, x.dtype)
        s, e = op.replace_at, op.replace_at + rep.shape[1]
        if s < 0 or e > n_inst:
            raise ValueError(
                f"layer {layer}: replace slots [{s}, {e}) fall outside the {n_inst} instance tokens"
            )
        x = torch.cat([x[:, :s], rep, x[:, e:]], dim=1)
    present = length - n_inst
    remove = present if op.remove == ALL else op.remove
    if remove < 0 or remove > present:
        raise ValueError(f"layer {layer}: cannot remove {op.remove} prompt tokens, only {present} present")
    removed = x[:, length - remove :] if remove else None
    if remove:
        x = x[:, : length - remove]
    if op.append is not None:
        new = _batched(op.append, n, x.dtype)
        if op.blend is not None:
            if removed is None or removed.shape != new.shape:
                got = 0 if removed is None else removed.shape[1]
                raise ValueError(f"layer {layer}: blend needs as many removed tokens ({got}) as appended")
            b = op.blend.to(x.dtype) if isinstance(op.blend, torch.Tensor) else op.blend
            new = b * removed + (1 - b) * new
        x = torch.cat([x, new], dim=1)
    return x


def _block(
    block: nn.Module, x: torch.Tensor, attn: Attention, ctx: AttnContext, adapter=None
) -> torch.Tensor:
    h = block.ln_1(x)
    x = x + block.ls_1(attn(block.attn, h, ctx))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x if adapter is None else x + adapter(h)  # LayerOps.adapter: a residual side branch


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    plan: TowerPlan | None,
    *,
    n_inst: int,
    causal: bool,
    key_valid: torch.Tensor | None = None,
    checkpoint: bool = False,
    default_attention: Attention | None = None,
) -> torch.Tensor:
    """Run the frozen blocks, applying the plan's per-layer ops and attention modes.

    ``default_attention`` replaces :func:`standard_attention` wherever the plan names no mode
    (e.g. the explicit-softmax reference path of ``vlprompt bench --reference``).
    """
    default_attention = default_attention or standard_attention
    if plan is not None and plan.layers and max(plan.layers) >= len(blocks):
        raise ValueError(f"plan has ops for layer {max(plan.layers)} but the tower has {len(blocks)} layers")
    for i, block in enumerate(blocks):
        op = plan.ops(i) if plan is not None else None
        if op is not None:
            x = apply_ops(x, op, n_inst, i)
        attn = (plan.attention_for(i) if plan is not None else None) or default_attention
        ctx = AttnContext(n_inst=n_inst, causal=causal, key_valid=key_valid, layer=i)
        adapter = op.adapter if op is not None else None
        if checkpoint and torch.is_grad_enabled():
            x = grad_checkpoint(_block, block, x, attn, ctx, adapter, use_reentrant=False)
        else:
            x = _block(block, x, attn, ctx, adapter)
    return x


def encode_text(
    clip: nn.Module,
    embeds: torch.Tensor,
    eot: torch.Tensor,
    plan: TowerPlan | None = None,
    *,
    truncate: bool = True,
    checkpoint: bool = False,
    default_attention: Attention | None = None,
    share_prefix: bool = False,
) -> torch.Tensor:
    """Prompted text tower: ``embeds`` (N, L, d) are layer-0 token embeddings (prompt slots filled,
    positional embedding not yet added); ``eot`` (N,) the end-of-text positions.  Returns (N, e).

    ``truncate`` drops the tokens after the longest end-of-text: exact, because under the causal
    mask no kept token reads them (asserted: deep slots must lie before the cut).

    ``share_prefix`` computes the leading tokens that every sequence has in common (``[SOS]`` + a
    shared context, e.g. CoOp's 16 vectors) once instead of N times: exact, because under the causal
    mask a token's state depends only on the tokens before it.  Used when nothing else reads the
    prefix differently (no appended prompts, standard attention, shared deep prompts).
    """
    n, length, _ = embeds.shape
    dtype = clip.positional_embedding.dtype
    if truncate:
        length = int(eot.max()) + 1
        if plan is not None:
            for op in plan.layers.values():
                if op.replace is not None:
                    length = max(length, op.replace_at + op.replace.shape[-2])
    x = embeds[:, :length].to(dtype) + clip.positional_embedding[:length].to(dtype)
    standard = default_attention is None or default_attention is standard_attention
    if share_prefix and not checkpoint and (standard or isinstance(default_attention, AutoAttention)):
        p = shared_prefix_length(x, plan)
        if p >= 2:
            return _encode_text_prefix(clip, x, eot, plan, p)
    if plan is not None and plan.shallow is not None:
        x = torch.cat([x, _batched(plan.shallow, n, x.dtype)], dim=1)
    appended = plan is not None and (
        plan.shallow is not None or any(o.append is not None for o in plan.layers.values())
    )
    key_valid = None
    if appended:  # prompts read instance tokens up to each sequence's end-of-text only
        key_valid = torch.arange(length, device=x.device).unsqueeze(0) <= eot.to(x.device).unsqueeze(1)
    x = run_blocks(
        clip.transformer.resblocks,
        x,
        plan,
        n_inst=length,
        causal=True,
        key_valid=key_valid,
        checkpoint=checkpoint,
        default_attention=default_attention,
    )
    x = x[torch.arange(n, device=x.device), eot.to(x.device)]
    x = clip.ln_final(x)
    tp = clip.text_projection
    return tp(x) if isinstance(tp, nn.Linear) else x @ tp


def shared_prefix_length(x: torch.Tensor, plan: TowerPlan | None) -> int:
    """Leading positions identical in every sequence, and shared by every deep op (0 = not usable)."""
    n, length, _ = x.shape
    if n < 2:
        return 0
    if plan is not None:
        if plan.shallow is not None or plan.attention is not None:
            return 0
        for op in plan.layers.values():
            if op.append is not None or op.attention is not None or op.remove not in (0, ALL):
                return 0
            if op.adapter is not None:  # the prefix path runs plain blocks
                return 0
            if op.replace is not None and op.replace.dim() == 3 and op.replace.shape[0] != 1:
                return 0  # per-sequence deep prompts
    with torch.no_grad():
        same = (x == x[:1]).all(dim=2).all(dim=0)
        p = int(same.long().cumprod(0).sum())
    p = min(p, length - 1)  # at least one position per sequence stays per-sequence
    if plan is not None:  # a deep slot reaching past the prefix moves the cut before it
        for op in plan.layers.values():
            if op.replace is not None and op.replace_at + op.replace.shape[-2] > p:
                p = min(p, op.replace_at)
    return p


def _replace(x: torch.Tensor, rep: torch.Tensor, at: int) -> torch.Tensor:
    rep = rep.reshape(1, *rep.shape[-2:]).to(x.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :at], rep, x[:, at + rep.shape[1] :]], dim=1)


def _encode_text_prefix(
    clip: nn.Module, x: torch.Tensor, eot: torch.Tensor, plan: TowerPlan | None, p: int
) -> torch.Tensor:
    """Text tower with the shared first ``p`` positions run once (see :func:`encode_text`)."""

    n, length, _ = x.shape
    xp, xs = x[:1, :p], x[:, p:]
    s = length - p
    mask = torch.ones(s, p + s, dtype=torch.bool, device=x.device)
    mask[:, p:] = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    for i, block in enumerate(clip.transformer.resblocks):
        op = plan.ops(i) if plan is not None else None
        if op is not None and op.replace is not None:
            if op.replace_at + op.replace.shape[-2] <= p:
                xp = _replace(xp, op.replace, op.replace_at)
            else:
                xs = _replace(xs, op.replace, op.replace_at - p)
        mha = block.attn
        qp, kp, vp = qkv_heads(mha, block.ln_1(xp))
        qs, ks, vs = qkv_heads(mha, block.ln_1(xs))
        op_ = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        k = torch.cat([kp.expand(n, -1, -1, -1), ks], dim=2)
        v = torch.cat([vp.expand(n, -1, -1, -1), vs], dim=2)
        os_ = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)
        xp = xp + block.ls_1(merge_heads(mha, op_))
        xs = xs + block.ls_1(merge_heads(mha, os_))
        xp = xp + block.ls_2(block.mlp(block.ln_2(xp)))
        xs = xs + block.ls_2(block.mlp(block.ln_2(xs)))
    eot = eot.to(x.device)
    if bool((eot < p).any()):  # cannot happen (p < every sequence's first differing token) -- guard
        full = torch.cat([xp.expand(n, -1, -1), xs], dim=1)
        pooled = full[torch.arange(n, device=x.device), eot]
    else:
        pooled = xs[torch.arange(n, device=x.device), eot - p]
    pooled = clip.ln_final(pooled)
    tp = clip.text_projection
    return tp(pooled) if isinstance(tp, nn.Linear) else pooled @ tp


def encode_image(
    visual: nn.Module,
    images: torch.Tensor,
    plan: TowerPlan | None = None,
    *,
    checkpoint: bool = False,
    default_attention: Attention | None = None,
) -> torch.Tensor:
    """Prompted image tower over ``[CLS; patches; prompts]``.  Returns pooled, projected features (B, e)."""
    if images.dim() != 4:
        raise ValueError(f"images must be a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n_inst = x.shape[1]
    if plan is not None and plan.shallow is not None:
        x = torch.cat([x, _batched(plan.shallow, x.shape[0], x.dtype)], dim=1)
    x = visual.ln_pre(x)
    x = run_blocks(
        visual.transformer.resblocks,
        x,
        plan,
        n_inst=n_inst,
        causal=False,
        checkpoint=checkpoint,
        default_attention=default_attention,
    )
    x = x[:, :n_inst]  # prompts never reach the pooled feature directly
    if getattr(visual, "final_ln_after_pool", False):
        pooled, _ = visual._global_pool(x)
        pooled = visual.ln_post(pooled)
    else:
        pooled, _ = visual._global_pool(visual.ln_post(x))
    return pooled @ visual.proj if visual.proj is not None else pooled
