"""What the bench times: a model of each method with its official options and a variant's execution
options, and its FLOPs."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from vlprompt.bench.config import VARIANT_OPTIONS
from vlprompt.bench.flops import (
    TowerFlops,
    image_tower_flops,
    text_tower_flops,
    text_tower_flops_shared_prefix,
)
from vlprompt.engine import AutoAttention, shared_prefix_length
from vlprompt.methods import get_method
from vlprompt.methods.model import ModelOptions, create_model
from vlprompt.run.attention import MeasuredTable, measured_attention
from vlprompt.train.config import load_preset

log = logging.getLogger(__name__)


def class_names(n: int) -> list[str]:
    """``n`` unique, realistic class names (ImageNet's as CLIP writes them; numbered beyond 1000).

    Real names matter: their token lengths set where the text tower can be truncated.
    """

    names: list[str] = []
    seen: set[str] = set()
    for name in IMAGENET_CLASSNAMES[:n]:
        if name in seen:  # ImageNet has two "crane"s and two "maillot"s
            name = f"{name} (2)"
        seen.add(name)
        names.append(name)
    names += [f"object {i}" for i in range(len(names), n)]
    return names


def method_recipe(method: str) -> tuple[dict[str, Any], int]:
    """(official options, official batch size): the preset's, else the registry entry's bench batch size."""
    cls = get_method(method)
    preset = load_preset(method)
    batch = (cls.preset().get("train") or {}).get("batch_size") or cls.bench_batch_size or 4
    return dict(preset.get("options") or {}), int(batch)


#: one measured attention table per device for this process's benches (``attention="auto"``)
_ATTENTION: dict[str, tuple[AutoAttention, MeasuredTable]] = {}


def measured(device: torch.device | str) -> tuple[AutoAttention, MeasuredTable]:
    """The bench's ``attention="auto"`` for ``device``: the machine's measured table (probed on a miss)."""
    key = str(torch.device(device))
    if key not in _ATTENTION:
        _ATTENTION[key] = measured_attention(device)
    return _ATTENTION[key]


def reset_measured() -> None:
    """Forget the tables of earlier benches in this process (the next bench reads the machine's file)."""
    _ATTENTION.clear()


def build_model(method: str, backbone: Any, n_classes: int, variant: str, **extra: Any):
    """A PromptModel of ``method`` with its official options and the variant's execution options."""
    opts, _ = method_recipe(method)
    max_depth = min(backbone.text.layers, backbone.image.layers)
    for k, v in list(opts.items()):  # official depths / block indices on a smaller backbone (--quick): clamp
        blockish = "depth" in k or k.endswith(("_start", "_end"))
        if blockish and isinstance(v, int) and not isinstance(v, bool) and v > max_depth:
            log.debug("%s: %s=%d clamped to the backbone's %d layers", method, k, v, max_depth)
            opts[k] = max_depth
    if "teacher_width" in opts:  # the stand-in teacher below has the student backbone's width
        opts["teacher_width"] = int(backbone.embed_dim)
    execution = ModelOptions(**{**VARIANT_OPTIONS[variant], **extra})
    # ImageNet's longest names do not fit a small context (vlp-world: 24 tokens): short names there
    names = (
        class_names(n_classes) if backbone.context_length >= 77 else [f"object {i}" for i in range(n_classes)]
    )
    model = create_model(method, backbone, names, model=execution, **opts)
    if model.method.needs_teacher:
        # our stand-in: zero-shot CLIP of the same backbone as the frozen teacher (the method's real
        # teacher is a prompted ViT-L/14); numerics and the student's timing, not the teacher's
        model.set_teacher(create_model("zeroshot", backbone, names))
    model.set_auto_attention(measured(backbone.device)[0])
    return model


def _cacheable(model: Any) -> bool:
    return bool(model.method.takes_cached_image_features)


def _text_length(model: Any, inputs: Any) -> int:
    """Instance tokens the text tower runs (truncated as :func:`engine.encode_text` does, or full)."""
    if not model.options.truncate_text:
        return int(inputs.embeds.shape[1])
    length = int(inputs.eot.max()) + 1
    if inputs.plan is not None:
        for op in inputs.plan.layers.values():
            if op.replace is not None:
                length = max(length, op.replace_at + op.replace.shape[-2])
    return length


def shared_prefix(model: Any, inputs: Any) -> int:
    """Leading text tokens computed once for all class prompts under the model's options (0 = none)."""

    opts = model.options
    if not opts.share_prefix or opts.checkpoint_text or opts.attention not in ("sdpa", "auto"):
        return 0
    length = _text_length(model, inputs)
    pos = model.backbone.clip.positional_embedding[:length]
    if inputs.embeds.shape[0] > max(1, int(opts.text_chunk)):
        return 0  # chunks share their own prefixes; counted without sharing (conservative)
    with torch.no_grad():
        p = shared_prefix_length(inputs.embeds[:, :length] + pos, inputs.plan)
    return p if p >= 2 else 0


def step_flops(
    model: Any, batch: int, train: bool, image_side: bool, text_calls: int = 1
) -> dict[str, float]:
    """FLOPs of one training step / one evaluation batch of ``model`` (see :mod:`vlprompt.bench.flops`)."""
    backbone = model.backbone
    img = TowerFlops(0.0, 0.0)
    if image_side:
        img = image_tower_flops(backbone.clip.visual, batch, model.method.image_plan())
        if not (train and model.method.prompts_image):
            img = TowerFlops(img.forward, 0.0)
    with torch.no_grad():
        feats = None
        if model.method.image_conditioned_text:
            feats = F.normalize(torch.randn(batch, backbone.embed_dim, device=backbone.device), dim=-1)
        inputs = model.method.text_inputs(feats)
    n_seq, length = int(inputs.embeds.shape[0]), _text_length(model, inputs)
    prefix = shared_prefix(model, inputs)
    if prefix:
        txt = text_tower_flops_shared_prefix(backbone.clip, n_seq, length, prefix)
    else:
        txt = text_tower_flops(backbone.clip, n_seq, length, inputs.plan)
    if not train:
        txt = TowerFlops(txt.forward, 0.0)
    total = img.train + text_calls * txt.train
    return {"image_gflop": img.train / 1e9, "text_gflop": text_calls * txt.train / 1e9, "gflop": total / 1e9}


def frozen_grads_allocated(model: Any) -> int:
    """Number of frozen CLIP tensors holding a ``.grad`` (must stay 0)."""
    return sum(p.grad is not None for p in model.backbone.parameters())
