"""Decoupled attention (DPL) **[reconstructed from the paper's abstract]**: an attention mode.

For one head and tokens ``Z = [X; P]`` (instances X, prompts P) the scores split into four blocks
``S_ab = Q_a K_b^T / sqrt(d)``, and standard softmax attention is *exactly*::

    O_x = (1 - l_x) softmax(S_xx) V_x + l_x softmax(S_xp) V_p      # I->I and I->P
    O_p = (1 - l_p) softmax(S_px) V_x + l_p softmax(S_pp) V_p      # P->I and P->P
    l_a = sigmoid(lse(S_a,other) - lse(S_a,own))                   # per query row

(``lse`` = log-sum-exp over the allowed keys; masks follow :func:`engine.attention.joint_mask`:
causal I->I in the text tower, P->I limited to ``ctx.key_valid``).  DPL's paper says it decouples
attention into these four sub-processes and "strengthens" them; its method section is not
available offline, so the strengthening below is our reconstruction, every piece a switch:

- ``mode="exact"``: the data-dependent gates above (equals :func:`standard_attention`, tested);
- ``mode="gated"`` (A1): instance rows use a learnable gate ``alpha = sigmoid(a)`` (per layer or per
  head) instead of ``l_x``, so the I->I path is exactly frozen CLIP's attention over instances and
  ``alpha -> 0`` (or ``gate_closed``) gives frozen CLIP exactly;
- ``drop_pp`` (A3): prompt rows attend only to instances (``l_p = 0``); otherwise prompt rows are
  standard softmax over ``[X; P]`` (the exact ``l_p``).

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
) -> torch.Tensor:
    """Decoupled multi-head attention over ``x = [instances; prompts]`` (N, L, D) -> (N, L, D).

    ``alpha`` ``None`` means the exact data-dependent gate for instance rows (mode "exact"); a tensor
    of shape ``(1,)`` or ``(heads,)`` is A1's learnable gate.  ``gate_closed`` drops I->P entirely
    (instance rows = frozen CLIP attention over instances).  ``drop_pp`` is A3.
    """
    n_inst = ctx.n_inst
    q, k, v = qkv_heads(mha, x)
    if x.shape[1] == n_inst:  # no prompts: nothing to decouple
        return merge_heads(mha, F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal))
    qx, qp = q[:, :, :n_inst], q[:, :, n_inst:]
    kx, kp = k[:, :, :n_inst], k[:, :, n_inst:]
    vx, vp = v[:, :, :n_inst], v[:, :, n_inst:]
    pmask = _prompt_key_mask(ctx)

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

    # prompt rows: P->I (only valid instance keys) and P->P
    if drop_pp:
        o_p = F.scaled_dot_product_attention(qp, kx, vx, attn_mask=pmask)
    elif alpha is None:
        o_p = _exact_rows(qp, kp, vp, kx, vx, own_mask=None, other_mask=pmask)
    else:  # standard softmax over [X; P] == the exact gate l_p
        mask = None
        if pmask is not None:
            n_p = qp.shape[2]
            own = torch.ones(pmask.shape[0], 1, n_p, n_p, dtype=torch.bool, device=x.device)
            mask = torch.cat([pmask.expand(-1, 1, n_p, -1), own], dim=-1)
        o_p = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask)
    return merge_heads(mha, torch.cat([o_x, o_p], dim=2))


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
    initialised so that ``alpha == alpha_init``.
    """

    def __init__(
        self,
        heads: int,
        *,
        mode: str = "gated",
        gate: str = "layer",
        alpha_init: float = 0.05,
        gate_closed: bool = False,
        drop_pp: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown decoupled attention mode '{mode}'; use one of {', '.join(MODES)}")
        if gate not in GATES:
            raise ValueError(f"unknown gate '{gate}'; use one of {', '.join(GATES)}")
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must lie strictly between 0 and 1, got {alpha_init}")
        self.mode, self.gate_kind, self.gate_closed, self.drop_pp = mode, gate, gate_closed, drop_pp
        if mode == "gated":
            logit = math.log(alpha_init / (1.0 - alpha_init))
            self.a = nn.Parameter(torch.full((heads if gate == "head" else 1,), logit))
        else:
            self.register_parameter("a", None)

    @property
    def alpha(self) -> torch.Tensor | None:
        """The current gate ``sigmoid(a)`` (None in mode "exact"; zeros when the gate is closed)."""
        if self.a is None:
            return None
        return torch.zeros_like(self.a) if self.gate_closed else torch.sigmoid(self.a)

    def forward(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        alpha = None if self.a is None else torch.sigmoid(self.a.float())
        return decoupled_attention(
            mha, x, ctx, alpha=alpha, gate_closed=self.gate_closed, drop_pp=self.drop_pp
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, gate={self.gate_kind}, gate_closed={self.gate_closed}, drop_pp={self.drop_pp}"
        )
