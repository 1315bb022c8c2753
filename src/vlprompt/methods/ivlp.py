"""IVLP: independent deep prompts in both towers.

Text: the prompt is ``"<ctx_init> {class}."``; its first ``n_ctx_text`` tokens are learnable slots
initialised from those tokens' embeddings (our choice, following the MaPLe/IVLP code: with the
default ``"a photo of a"`` and 2 slots, "a photo" learns and "of a" stays frozen text).  At layers
1..depth_text-1 the same slots are *replaced* by fresh N(0, 0.02²) vectors.

Image: ``n_ctx_image`` N(0, 0.02²) tokens appended after the positional embedding (before
``ln_pre``); at layers 1..depth_image-1 all previous prompt outputs are dropped and new learnable
tokens appended.  ``depth_image=0`` turns image prompting off.  Text and image prompts are
independent (no coupling), which is what separates IVLP from MaPLe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import (
    ClassPrompts,
    deep_image_plan,
    deep_text_plan,
    normal_prompts,
    prefix_ctx,
    validate_depth,
)


@dataclass
class IVLPConfig(MethodConfig):
    n_ctx_text: int = opt(2, "learnable text slots (the first tokens of ctx_init)")
    n_ctx_image: int = opt(2, "learnable image tokens per layer")
    ctx_init: str = opt("a photo of a", 'prompt prefix; "" = n_ctx_text random slots before the class')
    depth_text: int = opt(12, "text layers with their own prompts (1 = shallow)")
    depth_image: int = opt(12, "image layers with their own prompts (0 = no image prompts)")


@register_method
class IVLP(PromptMethod):
    name = "ivlp"
    Config = IVLPConfig
    summary = "IVLP: independent deep prompts in the text and image towers"

    def __init__(self, cfg: IVLPConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        validate_depth(cfg.depth_text, backbone.text.layers, "text")
        if cfg.depth_image:
            validate_depth(cfg.depth_image, backbone.image.layers, "image")
            if cfg.n_ctx_image < 1:
                raise VlpromptError(
                    f"n_ctx_image={cfg.n_ctx_image} must be at least 1 (or set depth_image=0)"
                )
        elif cfg.depth_image < 0:
            raise VlpromptError(f"depth_image={cfg.depth_image} must be 0 (off) or a layer count")
        d_txt, d_img = backbone.text.width, backbone.image.width
        ctx, self._segments = prefix_ctx(backbone, cfg.n_ctx_text, cfg.ctx_init, d_txt)
        self.ctx = nn.Parameter(ctx)
        self.text_deep = nn.ParameterList(
            [normal_prompts(cfg.n_ctx_text, d_txt) for _ in range(cfg.depth_text - 1)]
        )
        n_img = cfg.depth_image
        self.image_prompts = normal_prompts(n_img, cfg.n_ctx_image, d_img) if n_img else None

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, self._segments)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        at = int(self.prompts.slots[0, 0])
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot, deep_text_plan(self.text_deep, at))

    def image_plan(self) -> TowerPlan | None:
        return deep_image_plan(self.image_prompts)
