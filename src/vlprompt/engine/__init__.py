"""The prompted-transformer engine: one forward for every method, driven by prompt plans."""

from vlprompt.engine.attention import (
    ATTENTION_MODES,
    IMPLEMENTATIONS,
    Attention,
    AttnContext,
    AutoAttention,
    attention_mode,
    joint_mask,
    masked_scores,
    merge_heads,
    plain_attention,
    qkv_heads,
    select_attention,
    shape_class,
    standard_attention,
)
from vlprompt.engine.plan import ALL, LayerOps, TowerPlan, prompt_lengths, slice_plan
from vlprompt.engine.towers import apply_ops, encode_image, encode_text, run_blocks, shared_prefix_length

__all__ = [
    "ALL",
    "ATTENTION_MODES",
    "Attention",
    "AttnContext",
    "AutoAttention",
    "IMPLEMENTATIONS",
    "LayerOps",
    "TowerPlan",
    "apply_ops",
    "attention_mode",
    "encode_image",
    "encode_text",
    "joint_mask",
    "masked_scores",
    "merge_heads",
    "plain_attention",
    "prompt_lengths",
    "qkv_heads",
    "run_blocks",
    "select_attention",
    "shape_class",
    "shared_prefix_length",
    "slice_plan",
    "standard_attention",
]
