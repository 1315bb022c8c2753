"""Prompt plans: what a method asks the engine to do to each tower, layer by layer.

A tower's token sequence is always ``[instances; prompts]``: the instance tokens (text tokens, or
CLS + patches) come first and keep their positions; prompt tokens form a tail whose length may
change between layers.  Before block ``l`` the engine applies :class:`LayerOps` in this order:

1. ``replace``: overwrite instance slots ``[replace_at, replace_at + n)`` (CoOp/MaPLe-style deep text
   prompts -- no positional embedding is added at deep layers);
2. ``remove``: drop that many prompt tokens from the tail (``ALL`` drops every prompt token);
3. ``append``: add new prompt tokens at the tail; with ``blend`` set, the new tokens are mixed with
   the tokens just removed: ``blend * removed + (1 - blend) * append`` (DPL's carry, A2);
4. everything else is **carried** into the block unchanged.

A layer may also carry an ``adapter``: a residual side branch of block ``l``, a token-wise callable
``(N, L, d) -> (N, L, d)`` called with the block's normalised input ``h = ln_1(x)`` (``x`` the
sequence entering the block, after the ops above) and added to the block's output::

    x' = x + attn(ln_1(x));  x'' = x' + mlp(ln_2(x')) + adapter(ln_1(x))

(MMA's multi-modal adapters).  Every token of the sequence (instances and prompts) goes through it;
it must be token-wise (no mixing across positions), which keeps text truncation exact.  Layers
without one run the plain block.

``shallow`` prompts are appended to the embedded input before block 0 (for the image tower: after
the positional embedding, before ``ln_pre``, as MaPLe/MPL do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlprompt.engine.attention import Attention

ALL = -1  # LayerOps.remove value meaning "every prompt token present"


@dataclass
class LayerOps:
    """Operations applied before one block (see module docstring for the order)."""

    replace: torch.Tensor | None = None  # (n, d) or (N, n, d)
    replace_at: int = 1
    remove: int = 0
    append: torch.Tensor | None = None  # (n, d) or (N, n, d)
    blend: float | torch.Tensor | None = None
    attention: Attention | None = None  # overrides the plan's attention for this block
    adapter: Callable[[torch.Tensor], torch.Tensor] | None = None  # block(x) + adapter(ln_1(x))


@dataclass
class TowerPlan:
    """Everything a method tells the engine about one tower; the engine knows no method by name."""

    shallow: torch.Tensor | None = None  # (n, d) or (N, n, d), appended before block 0
    layers: dict[int, LayerOps] = field(default_factory=dict)
    attention: Attention | None = None  # default attention for every block (None = standard)

    def ops(self, layer: int) -> LayerOps | None:
        return self.layers.get(layer)

    def attention_for(self, layer: int) -> Attention | None:
        op = self.layers.get(layer)
        return op.attention if op is not None and op.attention is not None else self.attention


def prompt_lengths(n_inst: int, plan: TowerPlan | None, depth: int) -> list[int]:
    """Sequence length entering each block under ``plan`` (the token trace), without running anything."""
    n_prompt = 0 if plan is None or plan.shallow is None else plan.shallow.shape[-2]
    out = []
    for layer in range(depth):
        op = plan.ops(layer) if plan is not None else None
        if op is not None:
            n_prompt -= n_prompt if op.remove == ALL else op.remove
            if op.append is not None:
                n_prompt += op.append.shape[-2]
        out.append(n_inst + n_prompt)
    return out


def slice_plan(plan: TowerPlan | None, start: int, end: int, n: int) -> TowerPlan | None:
    """The part of ``plan`` for sequences ``start:end`` of ``n`` (per-sequence prompt tensors are cut).

    Lets a caller run the text tower on a block of class prompts (chunking, class-sharded DDP)."""
    if plan is None:
        return None

    def cut(t):
        return t[start:end] if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == n else t

    layers = {i: replace(op, replace=cut(op.replace), append=cut(op.append)) for i, op in plan.layers.items()}
    return TowerPlan(shallow=cut(plan.shallow), layers=layers, attention=plan.attention)
