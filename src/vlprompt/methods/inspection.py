"""``inspect_prompts``: per-layer figures of what a model's prompts do on a few images.

Runs both towers once (no gradient) under :class:`vlprompt.engine.probe.TowerProbe` and compares the
prompted features with frozen CLIP's.  Per layer and tower (see the probe for the definitions):
prompt count, exact instance->prompt share ``lambda`` (all instance rows, and the pooled row), the
gate ``alpha`` where the layer has one, the carried-term ratio where prompts are blended (DPL's A2),
and prompt/instance norm ratio.  Methods whose prompts sit in instance slots (CoOp-style text
context) have no appended prompts: their text rows show 0 prompts and only the feature cosine.

This is where docs/dpl.md's measured figures come from (``vlprompt inspect``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlprompt.engine import encode_image, encode_text
from vlprompt.engine.probe import TowerProbe
from vlprompt.methods.common import ClassPrompts
from vlprompt.methods.model import PromptModel


@torch.no_grad()
def inspect_prompts(model: PromptModel, images: torch.Tensor) -> dict[str, Any]:
    """Figures for ``model`` on ``images`` (a preprocessed ``(B, 3, H, W)`` batch).

    Returns ``{"method", "reconstructed", "note", "images", "image": {...}, "text": {...}}``; each tower
    holds ``layers`` (one dict per block) and ``cosine_to_frozen`` (mean cosine between prompted and
    frozen-CLIP features; 1.0 when the tower is not prompted).  Gates with ``alpha_init="auto"`` that
    have not been measured yet are measured on these images (as the first training batch would).
    """
    was = model.training
    model.eval()
    try:
        return _inspect(model, images.to(model.backbone.device))
    finally:
        model.train(was)


def _inspect(model: PromptModel, images: torch.Tensor) -> dict[str, Any]:
    bb, method = model.backbone, model.method
    visual, clip = bb.clip.visual, bb.clip
    out: dict[str, Any] = {
        "method": method.name,
        "reconstructed": bool(type(method).reconstruction_note),
        "note": type(method).reconstruction_note,
        "images": int(images.shape[0]),
        "classes": len(model.classnames),
    }
    plan = method.image_plan()
    frozen_img = F.normalize(encode_image(visual, images).float(), dim=-1)
    with TowerProbe(visual.transformer.resblocks, plan, pooled="first") as probe:
        img = F.normalize(encode_image(visual, images, probe.plan).float(), dim=-1)
    out["image"] = {
        "prompted": plan is not None,
        "cosine_to_frozen": float((img * frozen_img).sum(-1).mean()),
        "layers": probe.rows(),
    }
    inputs = method.text_inputs(img if method.image_conditioned_text else None)
    ref = _frozen_text(model)
    with TowerProbe(clip.transformer.resblocks, inputs.plan, pooled="eot") as probe:
        txt = F.normalize(encode_text(clip, inputs.embeds, inputs.eot, probe.plan).float(), dim=-1)
    if method.image_conditioned_text:  # (B*C, e) image-major -> compare each image's C rows
        txt = txt.view(images.shape[0], -1, txt.shape[-1])
        cos = float((txt * ref.unsqueeze(0)).sum(-1).mean())
    else:
        cos = float((txt * ref).sum(-1).mean())
    out["text"] = {"cosine_to_frozen": cos, "layers": probe.rows()}
    return out


def _frozen_text(model: PromptModel) -> torch.Tensor:
    """Zero-shot CLIP text features of the model's classes under its template, normalised (C, e)."""
    bb = model.backbone
    prompts = ClassPrompts(bb, model.classnames, [("text", model.template)]).to(bb.device)
    return F.normalize(encode_text(bb.clip, prompts.embeds, prompts.eot).float(), dim=-1)
