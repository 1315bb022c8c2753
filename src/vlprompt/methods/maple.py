"""MaPLe: multi-modal prompts, image prompts projected from the text prompts.

Text: ``"a photo of a {class}."`` whose first ``n_ctx`` tokens ("a photo") are learnable, initialised
from their embeddings; "of a" stays frozen.  Deep text prompts T_1..T_{J-1} (N(0, 0.02²)) replace
those slots at layers 1..J-1.  Image: no free parameters -- layer 0's prompts are ``proj(ctx)``
(appended before ``ln_pre``), layer l's are ``proj_l(T_l)`` with a separate Linear(d_txt→d_img) per
layer, replacing the previous layer's image prompts.  The official code builds the J-1 per-layer
projections as deep copies of one Linear (identical start); ``tie_init=False`` initialises them
independently.  ViT-B/16 at the defaults: 3,555,072 trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import ALL, LayerOps, TowerPlan
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts, linear_stack, normal_prompts, prefix_ctx, validate_depth
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_maple


@dataclass
class MaPLeConfig(MethodConfig):
    n_ctx: int = opt(2, "learnable slots: the first n_ctx tokens of ctx_init")
    ctx_init: str = opt("a photo of a", 'prompt prefix; "" = n_ctx random slots before the class')
    depth: int = opt(9, "prompt depth J on both towers (1 = shallow only)", minimum=1)
    tie_init: bool = opt(True, "per-layer projections start as copies of one Linear (official code)")


@register_method
class MaPLe(PromptMethod):
    name = "maple"
    display_name = "MaPLe"
    official_parameters = 3_555_072
    bench_batch_size = 4
    official = OfficialLayout(
        "muzairkhattak/multimodal-prompt-learning",
        "MultiModalPromptLearner",
        Signature(has=(PL + "ctx", PL + "proj.weight"), lacks_prefix=(PL + "txt2img_proj.",)),
        map_maple,
    )
    Config = MaPLeConfig
    summary = "MaPLe: deep text prompts with per-layer text->image projections as the image prompts"

    def __init__(self, cfg: MaPLeConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        validate_depth(cfg.depth, backbone.text.layers, "text")
        validate_depth(cfg.depth, backbone.image.layers, "image")
        d_txt, d_img = backbone.text.width, backbone.image.width
        ctx, self._segments = prefix_ctx(backbone, cfg.n_ctx, cfg.ctx_init, d_txt)
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(d_txt, d_img)
        self.compound_prompts_text = nn.ParameterList(
            [normal_prompts(cfg.n_ctx, d_txt) for _ in range(cfg.depth - 1)]
        )
        self.compound_prompt_projections = (
            linear_stack(cfg.depth - 1, d_txt, d_img, tie_init=cfg.tie_init)
            if cfg.depth > 1
            else nn.ModuleList()
        )

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, self._segments)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        at = int(self.prompts.slots[0, 0])
        layers = {i + 1: LayerOps(replace=t, replace_at=at) for i, t in enumerate(self.compound_prompts_text)}
        return TextInputs(
            self.prompts.fill(self.ctx), self.prompts.eot, TowerPlan(layers=layers) if layers else None
        )

    def image_plan(self) -> TowerPlan:
        layers = {
            i + 1: LayerOps(remove=ALL, append=f(t))
            for i, (f, t) in enumerate(zip(self.compound_prompt_projections, self.compound_prompts_text))
        }
        return TowerPlan(shallow=self.proj(self.ctx), layers=layers)
