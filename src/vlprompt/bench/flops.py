"""Transformer FLOP counts from the loaded architecture (widths, depths, MLP sizes, sequence lengths).

Used to turn measured times into achieved GFLOP/s.  Conventions (stated so the numbers can be checked):
a multiply-add is 2 FLOPs; attention counts the full ``L x L`` score and value products (causal
masking is not subtracted); layer norms, softmax, GELU and residual adds are ignored (a few percent).
Backward through a *frozen* layer computes input gradients only: a linear layer costs 1x its forward,
an attention product 2x (both operands of ``QK^T`` and ``PV`` need gradients).  Every number is read
from the backbone's modules, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlprompt.engine import TowerPlan, prompt_lengths


@dataclass(frozen=True)
class TowerFlops:
    """FLOPs of one tower call: ``forward`` and the input-gradient ``backward`` of its blocks."""

    forward: float
    backward: float

    def __add__(self, other: TowerFlops) -> TowerFlops:
        return TowerFlops(self.forward + other.forward, self.backward + other.backward)

    @property
    def train(self) -> float:
        return self.forward + self.backward


ZERO = TowerFlops(0.0, 0.0)


def _mlp_hidden(block: nn.Module) -> int:
    fc = getattr(block.mlp, "c_fc", None)
    if isinstance(fc, nn.Linear):
        return fc.out_features
    return next(m.out_features for m in block.mlp.modules() if isinstance(m, nn.Linear))


def block_flops(width: int, mlp_hidden: int, seq: int, n_seq: int = 1) -> TowerFlops:
    """One pre-LN transformer block over ``n_seq`` sequences of ``seq`` tokens."""
    linear = 2.0 * seq * (4 * width * width + 2 * width * mlp_hidden)  # qkv (3d^2) + out (d^2) + MLP
    attn = 2.0 * 2 * seq * seq * width  # QK^T and PV over all heads
    return TowerFlops(n_seq * (linear + attn), n_seq * (linear + 2 * attn))


def blocks_flops(blocks: nn.ModuleList, seq_lens: list[int], n_seq: int) -> TowerFlops:
    """Blocks of a tower, block ``i`` over ``seq_lens[i]`` tokens (prompt plans change lengths)."""
    total = ZERO
    for block, seq in zip(blocks, seq_lens, strict=True):
        width = block.attn.embed_dim
        total = total + block_flops(width, _mlp_hidden(block), seq, n_seq)
    return total


def image_tower_flops(visual: nn.Module, batch: int, plan: TowerPlan | None = None) -> TowerFlops:
    """Patch embedding + blocks + projection of the image tower for ``batch`` images under ``plan``."""
    blocks = visual.transformer.resblocks
    n_inst = int(visual.positional_embedding.shape[0])
    conv = visual.conv1
    patch_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    embed = 2.0 * batch * (n_inst - 1) * patch_in * conv.out_channels
    proj = 0.0 if visual.proj is None else 2.0 * batch * visual.proj.shape[0] * visual.proj.shape[1]
    body = blocks_flops(blocks, prompt_lengths(n_inst, plan, len(blocks)), batch)
    return TowerFlops(body.forward + embed + proj, body.backward + proj)


def text_tower_flops(clip: nn.Module, n_seq: int, length: int, plan: TowerPlan | None = None) -> TowerFlops:
    """Blocks + projection of the text tower for ``n_seq`` sequences of ``length`` instance tokens."""
    blocks = clip.transformer.resblocks
    seq_lens = prompt_lengths(length, plan, len(blocks))
    tp = clip.text_projection
    d_in, d_out = (tp.in_features, tp.out_features) if isinstance(tp, nn.Linear) else tuple(tp.shape)
    proj = 2.0 * n_seq * d_in * d_out
    body = blocks_flops(blocks, seq_lens, n_seq)
    return TowerFlops(body.forward + proj, body.backward + proj)


def text_tower_flops_shared_prefix(clip: nn.Module, n_seq: int, length: int, prefix: int) -> TowerFlops:
    """Text tower with the first ``prefix`` tokens run once for all ``n_seq`` sequences
    (``encode_text(share_prefix=True)``): the prefix attends causally to itself, every suffix of
    ``length - prefix`` tokens to the prefix and to itself."""
    if prefix <= 0:
        return text_tower_flops(clip, n_seq, length)
    s = length - prefix
    total = ZERO
    for block in clip.transformer.resblocks:
        w, h = block.attn.embed_dim, _mlp_hidden(block)
        linear = 2.0 * (prefix + n_seq * s) * (4 * w * w + 2 * w * h)
        attn = 4.0 * w * (prefix * prefix + n_seq * s * (prefix + s))
        total = total + TowerFlops(linear + attn, linear + 2 * attn)
    tp = clip.text_projection
    d_in, d_out = (tp.in_features, tp.out_features) if isinstance(tp, nn.Linear) else tuple(tp.shape)
    proj = 2.0 * n_seq * d_in * d_out
    return TowerFlops(total.forward + proj, total.backward + proj)


def matmul_flops(m: int, k: int, n: int) -> float:
    return 2.0 * m * k * n
