"""Decoupled attention (DPL) **[reconstructed from the paper's abstract]**: an attention mode.

For one head and tokens ``Z = [X; P]`` (instances X, prompts P) the scores split into four blocks
``S_ab = Q_a K_b^T / sqrt(d)``, and standard softmax attention is *exactly*::

    O_x = (1 - l_x) softmax(S_xx) V_x + l_x softmax(S_xp) V_p      # I->I and I->P
    O_p = (1 - l_p) softmax(S_px) V_x + l_p softmax(S_pp) V_p      # P->I and P->P
    l_a = sigmoid(lse(S_a,other) - lse(S_a,own))                   # per query row

(``lse`` = log-sum-exp over the allowed keys; masks follow :func:`engine.attention.joint_mask`:
causal I->I in the text tower, P->I limited to ``ctx.key_valid``).  DPL's paper says it decouples
attention into these four sub-processes and "strengthens" them; no public source describes more,
so the strengthening below is our reconstruction, every piece a switch:

- ``mode="exact"``: the data-dependent gates above (equals :func:`standard_attention`, tested);
- ``mode="gated"`` (A1): instance rows use a learnable gate ``alpha = sigmoid(a)`` (per layer or per
  head) instead of ``l_x``.  The I->I term is frozen CLIP's attention over the instances in both modes
  (standard attention weights it by ``1 - l_x``); the gate only replaces that weight, and
  ``alpha -> 0`` (or ``gate_closed``) gives frozen CLIP exactly;
- ``drop_pp`` (A3): prompt rows attend only to instances (``l_p = 0``); otherwise prompt rows are
  standard softmax over ``[X; P]`` (the exact ``l_p``);
- ``prompts_first`` (our reading of "prompt-first" updating): the prompt rows are computed first and the
  instance rows read the *updated* prompts ``P + Attn_p`` (keys and values re-projected) in the same
  layer, so P->I reaches the instances without waiting for the next layer's carry;
- ``alpha_init="auto"``: the gate is set, on the module's first forward, to the mean exact share
  ``l_x`` of that batch (see :func:`instance_prompt_share`).

A2 (carry prompt outputs into the next layer) is a plan operation, ``LayerOps(blend=beta)``.
Instance and prompt rows are computed with ``F.scaled_dot_product_attention`` (no loops over heads
or tokens); the exact mode builds explicit score blocks because it needs their log-sum-exps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.engine.attention import AttnContext, masked_scores, merge_heads, qkv_heads

MODES = ("gated", "exact")
GATES = ("layer", "head")
AUTO = "auto"  # alpha_init value: measure the exact share on the first batch


def instance_prompt_share(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Exact share ``l_x`` of instance rows' standard attention that goes to the prompts, per row.

    ``q``, ``k``: ``(N, H, L, hd)`` over ``[instances; prompts]``.  Returns ``(N, H, n_inst)``:
    ``sigmoid(lse(S_xp) - lse(S_xx))`` with the causal I->I mask of the text tower.  This is what
    standard attention gives each instance row, whatever mode the layer actually runs.
    """
    n_inst = ctx.n_inst
    qx, kx, kp = q[:, :, :n_inst], k[:, :, :n_inst], k[:, :, n_inst:]
    s_xx = masked_scores(qx, kx, _causal(ctx, n_inst, q.device))
    s_xp = masked_scores(qx, kp, None)
    return torch.sigmoid(torch.logsumexp(s_xp, dim=-1) - torch.logsumexp(s_xx, dim=-1))


def mean_share(lam: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Per-head mean of :func:`instance_prompt_share` over valid instance rows and the batch -> (H,).

    In the text tower only the rows up to each sequence's end-of-text count (``ctx.key_valid``).
    """
    if ctx.key_valid is None:
        return lam.mean(dim=(0, 2))
    w = ctx.key_valid[:, None, :].to(lam.dtype)
    return (lam * w).sum(dim=(0, 2)) / w.sum(dim=(0, 2)).clamp_min(1)


def _prompt_key_mask(ctx: AttnContext) -> torch.Tensor | None:
    """``(N, 1, 1, n_inst)`` bool mask of the instance keys prompts may read, or None (all)."""
    return None if ctx.key_valid is None else ctx.key_valid[:, None, None, :]


def _gated_mix(o_own: torch.Tensor, o_other: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (1 - gate) * o_own + gate * o_other


def decoupled_attention(
    mha: nn.MultiheadAttention,
    x: torch.Tensor,
    ctx: AttnContext,
    *,
    alpha: torch.Tensor | None = None,
    gate_closed: bool = False,
    drop_pp: bool = False,
    prompts_first: bool = False,
) -> torch.Tensor:
    """Decoupled multi-head attention over ``x = [instances; prompts]`` (N, L, D) -> (N, L, D).

    ``alpha`` ``None`` means the exact data-dependent gate for instance rows (mode "exact"); a tensor
    of shape ``(1,)`` or ``(heads,)`` is A1's learnable gate.  ``gate_closed`` drops I->P entirely
    (instance rows = frozen CLIP attention over instances).  ``drop_pp`` is A3.  ``prompts_first``:
    instance rows read the prompts as updated by this layer's prompt rows (``x_p + out_p``).
    """
    n_inst = ctx.n_inst
    q, k, v = qkv_heads(mha, x)
    if x.shape[1] == n_inst:  # no prompts: nothing to decouple
        return merge_heads(mha, F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal))
    qx, qp = q[:, :, :n_inst], q[:, :, n_inst:]
    kx, kp = k[:, :, :n_inst], k[:, :, n_inst:]
    vx, vp = v[:, :, :n_inst], v[:, :, n_inst:]
    pmask = _prompt_key_mask(ctx)
    o_p = _prompt_rows(q, k, v, qp, kp, vp, kx, vx, pmask, alpha is None, drop_pp, x.device)
    if prompts_first:  # instances read this layer's updated prompts: re-project P + Attn_p
        updated = x[:, n_inst:] + merge_heads(mha, o_p)
        _, kp, vp = qkv_heads(mha, updated)

    # instance rows: I->I (causal in the text tower) and I->P
    if alpha is None and not gate_closed:
        o_x = _exact_rows(qx, kx, vx, kp, vp, own_mask=_causal(ctx, n_inst, x.device), other_mask=None)
    else:
        o_xx = F.scaled_dot_product_attention(qx, kx, vx, is_causal=ctx.causal)
        if gate_closed:
            o_x = o_xx
        else:
            o_xp = F.scaled_dot_product_attention(qx, kp, vp)
            gate = alpha.to(o_xx.dtype).view(1, -1, 1, 1)
            o_x = _gated_mix(o_xx, o_xp, gate)
    return merge_heads(mha, torch.cat([o_x, o_p], dim=2))


def _prompt_rows(q, k, v, qp, kp, vp, kx, vx, pmask, exact: bool, drop_pp: bool, device) -> torch.Tensor:
    """Prompt rows: P->I (only valid instance keys) and P->P (A3 drops P->P)."""
    if drop_pp:
        return F.scaled_dot_product_attention(qp, kx, vx, attn_mask=pmask)
    if exact:
        return _exact_rows(qp, kp, vp, kx, vx, own_mask=None, other_mask=pmask)
    mask = None  # standard softmax over [X; P] == the exact gate l_p
    if pmask is not None:
        n_p = qp.shape[2]
        own = torch.ones(pmask.shape[0], 1, n_p, n_p, dtype=torch.bool, device=device)
        mask = torch.cat([pmask.expand(-1, 1, n_p, -1), own], dim=-1)
    return F.scaled_dot_product_attention(qp, k, v, attn_mask=mask)


def _causal(ctx: AttnContext, n: int, device: torch.device) -> torch.Tensor | None:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril() if ctx.causal else None


def _exact_rows(
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    k_other: torch.Tensor,
    v_other: torch.Tensor,
    *,
    own_mask: torch.Tensor | None,
    other_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``(1 - l) softmax(S_own) V_own + l softmax(S_other) V_other`` with the exact row gate ``l``."""
    s_own = masked_scores(q, k_own, own_mask)
    s_other = masked_scores(q, k_other, other_mask)
    lse_own = torch.logsumexp(s_own, dim=-1, keepdim=True)
    lse_other = torch.logsumexp(s_other, dim=-1, keepdim=True)
    lam = torch.sigmoid(lse_other - lse_own)
    o_own = torch.exp(s_own - lse_own) @ v_own
    o_other = torch.exp(s_other - lse_other) @ v_other
    return _gated_mix(o_own, o_other, lam)


class DecoupledAttention(nn.Module):
    """One layer's decoupled attention mode; owns that layer's gate logit ``a`` (mode "gated").

    Instances of this module are built and owned by a method (so ``a`` is one of its parameters)
    and passed to the engine as ``LayerOps.attention``; calling it is ``(mha, x, ctx) -> out``.
    ``alpha = sigmoid(a)``, ``a`` of shape ``(1,)`` (gate="layer") or ``(heads,)`` (gate="head"),
    initialised so that ``alpha == alpha_init``.  With ``alpha_init="auto"`` the first forward that
    sees prompts sets ``alpha`` to that batch's mean exact share (per head for gate="head"; averaged
    over ranks under torch.distributed) and records that in the persistent buffer ``measured``, so a
    saved and reloaded gate is never re-measured.
    """

    def __init__(
        self,
        heads: int,
        *,
        mode: str = "gated",
        gate: str = "layer",
        alpha_init: float | str = 0.05,
        gate_closed: bool = False,
        drop_pp: bool = False,
        prompts_first: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown decoupled attention mode '{mode}'; use one of {', '.join(MODES)}")
        if gate not in GATES:
            raise ValueError(f"unknown gate '{gate}'; use one of {', '.join(GATES)}")
        auto = alpha_init == AUTO
        if auto and mode != "gated":
            raise ValueError("alpha_init='auto' needs mode='gated' (mode 'exact' has no gate)")
        if not auto and not (isinstance(alpha_init, (int, float)) and 0.0 < alpha_init < 1.0):
            raise ValueError(f"alpha_init must lie strictly between 0 and 1 or be 'auto', got {alpha_init!r}")
        self.mode, self.gate_kind, self.gate_closed, self.drop_pp = mode, gate, gate_closed, drop_pp
        self.prompts_first = prompts_first
        if mode == "gated":
            start = 0.5 if auto else float(alpha_init)
            logit = math.log(start / (1.0 - start))
            self.a = nn.Parameter(torch.full((heads if gate == "head" else 1,), logit))
        else:
            self.register_parameter("a", None)
        if auto:
            self.register_buffer("measured", torch.zeros((), dtype=torch.bool))
        else:
            self.measured = None

    @property
    def alpha(self) -> torch.Tensor | None:
        """The current gate ``sigmoid(a)`` (None in mode "exact"; zeros when the gate is closed)."""
        if self.a is None:
            return None
        return torch.zeros_like(self.a) if self.gate_closed else torch.sigmoid(self.a)

    @torch.no_grad()
    def _measure(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> None:
        q, k, _ = qkv_heads(mha, x)
        share = mean_share(instance_prompt_share(q.float(), k.float(), ctx), ctx)  # (H,)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(share)
            share /= torch.distributed.get_world_size()
        share = share if self.gate_kind == "head" else share.mean().view(1)
        share = share.clamp(1e-6, 1 - 1e-6)
        self.a.copy_(torch.log(share / (1 - share)).to(self.a))
        self.measured.fill_(True)

    def forward(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.measured is not None and not bool(self.measured) and x.shape[1] > ctx.n_inst:
            self._measure(mha, x, ctx)
        alpha = None if self.a is None else torch.sigmoid(self.a.float())
        return decoupled_attention(
            mha,
            x,
            ctx,
            alpha=alpha,
            gate_closed=self.gate_closed,
            drop_pp=self.drop_pp,
            prompts_first=self.prompts_first,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, gate={self.gate_kind}, gate_closed={self.gate_closed}, "
            f"drop_pp={self.drop_pp}, prompts_first={self.prompts_first}"
        )
