"""Per-layer figures of what appended prompts do in one tower (diagnostics, no training).

:class:`TowerProbe` wraps every layer's attention of a plan with a recorder and hooks the blocks'
``ln_1`` (whose input is the residual stream entering the block, after the plan's ops).  For each
layer where prompts are present it records:

- ``share``: the exact share ``l_x`` that *standard* attention gives the prompts, averaged over the
  instance rows (text: rows up to each sequence's end-of-text), the batch and the heads; and
  ``share_pooled``, the same for the pooled row only (image: CLS; text: end-of-text);
- ``alpha``: the gate the layer actually uses, when its attention mode has one (DPL's gated mode);
- ``carried_ratio``: where the layer's new prompts are blended with the previous outputs
  (``blend * removed + (1 - blend) * new``), the mean over prompt tokens of
  ``|blend * removed| / |(1 - blend) * new|`` -- how much of the prompt entering the block is carry;
- ``prompt_norm_ratio``: mean prompt-token norm / mean instance-token norm of the residual stream.

The probe knows no method: it reads only the plan (ops, blend) and the attention modes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vlprompt.engine.attention import Attention, AttnContext, qkv_heads, standard_attention
from vlprompt.engine.decoupled import instance_prompt_share, mean_share
from vlprompt.engine.plan import LayerOps, TowerPlan


class _Recorder:
    def __init__(self, probe: TowerProbe, layer: int, inner: Attention):
        self.probe, self.layer, self.inner = probe, layer, inner

    def __call__(self, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        out = self.inner(mha, x, ctx)  # first: a gate with alpha_init="auto" measures itself here
        if x.shape[1] > ctx.n_inst:
            self.probe._record(self.layer, mha, x, ctx, self.inner)
        return out


class TowerProbe:
    """Context manager: ``with TowerProbe(blocks, plan) as probe: encode_*(..., probe.plan)``; then
    ``probe.rows()`` gives one dict per layer (``None`` figures where a layer has no prompts)."""

    def __init__(self, blocks: nn.ModuleList, plan: TowerPlan | None, pooled: str = "first"):
        self.blocks, self.source, self.pooled = blocks, plan, pooled
        self.records: dict[int, dict[str, Any]] = {}
        self._resid: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []
        layers: dict[int, LayerOps] = {}
        for i in range(len(blocks)):
            op = plan.ops(i) if plan is not None else None
            inner = (plan.attention_for(i) if plan is not None else None) or standard_attention
            layers[i] = replace(op if op is not None else LayerOps(), attention=_Recorder(self, i, inner))
        shallow = plan.shallow if plan is not None else None
        self.plan = TowerPlan(shallow=shallow, layers=layers)

    def __enter__(self) -> TowerProbe:
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.ln_1.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._resid[layer] = args[0].detach()

        return hook

    @torch.no_grad()
    def _record(
        self, layer: int, mha: nn.MultiheadAttention, x: torch.Tensor, ctx: AttnContext, inner
    ) -> None:
        n_inst = ctx.n_inst
        q, k, _ = qkv_heads(mha, x)
        lam = instance_prompt_share(q.float(), k.float(), ctx)  # (N, H, n_inst)
        if self.pooled == "eot" and ctx.key_valid is not None:
            eot = ctx.key_valid.long().sum(dim=1) - 1
            pooled = lam[torch.arange(lam.shape[0], device=lam.device), :, eot]
        else:
            pooled = lam[:, :, 0]
        rec: dict[str, Any] = {
            "layer": layer,
            "n_prompts": int(x.shape[1] - n_inst),
            "share": float(mean_share(lam, ctx).mean()),
            "share_pooled": float(pooled.mean()),
            "alpha": None,
            "carried_ratio": None,
            "prompt_norm_ratio": None,
        }
        alpha = getattr(inner, "alpha", None)
        if isinstance(alpha, torch.Tensor):
            rec["alpha"] = float(alpha.float().mean())
        resid = self._resid.get(layer)
        if resid is not None and resid.shape[1] == x.shape[1]:
            p, inst = resid[:, n_inst:].float(), resid[:, :n_inst].float()
            rec["prompt_norm_ratio"] = float(p.norm(dim=-1).mean() / inst.norm(dim=-1).mean())
            op = self.source.ops(layer) if self.source is not None else None
            if op is not None and op.blend is not None and op.append is not None:
                b = op.blend
                b = float(b.detach().float().mean()) if isinstance(b, torch.Tensor) else float(b)
                fresh = (1 - b) * op.append.detach().float().to(p.device)
                fresh = fresh.unsqueeze(0) if fresh.dim() == 2 else fresh
                carried = p[:, -fresh.shape[1] :] - fresh  # the appended tail = blend*removed + fresh
                ratio = carried.norm(dim=-1) / fresh.norm(dim=-1).clamp_min(1e-12)
                rec["carried_ratio"] = float(ratio.mean())
        self.records[layer] = rec

    def rows(self) -> list[dict[str, Any]]:
        empty = {
            "n_prompts": 0,
            "share": None,
            "share_pooled": None,
            "alpha": None,
            "carried_ratio": None,
            "prompt_norm_ratio": None,
        }
        return [self.records.get(i, {"layer": i, **empty}) for i in range(len(self.blocks))]
