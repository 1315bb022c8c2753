"""VPT-deep: learnable image tokens at every prompted layer, fixed hand-crafted text.

``n_ctx`` tokens are appended after the positional embedding (before ``ln_pre``); at layers
1..depth-1 the previous prompt outputs are dropped and fresh learnable tokens appended (VPT-deep;
``depth=1`` is VPT-shallow).  The text side is the fixed prompt ``text`` (default
``"a photo of a {}."``; ``""`` uses the data set's template), computed once and cached at evaluation.

Initialisation (the paper states none): the default ``normal`` is N(0, 0.02²), what the MaPLe
repository's VPT baseline (the source of this recipe) does for every layer's prompts; ``uniform`` is
the VPT paper's xavier-style U(-v, v) with v = sqrt(6 / (3·patch² + width)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import ALL, LayerOps, TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts, normal_prompts, uniform_prompts, validate_depth
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_vpt


@dataclass
class VPTConfig(MethodConfig):
    n_ctx: int = opt(8, "image prompt tokens per layer", minimum=1)
    depth: int = opt(12, "image layers with their own prompts (1 = VPT-shallow)")
    init: str = opt(
        "normal",
        "normal (N(0, 0.02^2), MaPLe-repo VPT baseline) | uniform (VPT paper)",
        choices=("normal", "uniform"),
    )
    text: str = opt("a photo of a {}.", 'fixed text prompt; "" = the data set\'s template')


@register_method
class VPT(PromptMethod):
    name = "vpt"
    display_name = "VPT-deep"
    official_parameters = 73_728
    dassl_trainers = ("VPT",)
    dassl_keys = {"N_CTX_VISION": "n_ctx", "PROMPT_DEPTH_VISION": "depth", "CTX_INIT": "text"}
    bench_batch_size = 4
    official = OfficialLayout(
        "muzairkhattak/multimodal-prompt-learning",
        "prompt_learner",
        Signature(has=("image_encoder.VPT",), lacks=(PL + "ctx",), lacks_prefix=("VPT_image_trans.",)),
        map_vpt,
    )
    Config = VPTConfig
    summary = "VPT-deep: learnable image tokens replaced at every prompted layer; fixed text prompt"

    def __init__(self, cfg: VPTConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        validate_depth(cfg.depth, backbone.image.layers, "image")
        if cfg.text and "{}" not in cfg.text:
            raise VlpromptError(f"text '{cfg.text}' has no '{{}}' placeholder for the class name")
        width = backbone.image.width
        if cfg.init == "uniform":
            patch = backbone.clip.visual.conv1.kernel_size[0]
            layers = [uniform_prompts(cfg.n_ctx, width, patch).data for _ in range(cfg.depth)]
            self.image_prompts = nn.Parameter(torch.stack(layers))
        else:  # "normal" (the option's choices are checked when the config is built)
            self.image_prompts = normal_prompts(cfg.depth, cfg.n_ctx, width)

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, [("text", self.cfg.text or template)])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        return TextInputs(self.prompts.embeds, self.prompts.eot)

    def image_plan(self) -> TowerPlan:
        p = self.image_prompts
        return TowerPlan(
            shallow=p[0], layers={i: LayerOps(remove=ALL, append=p[i]) for i in range(1, p.shape[0])}
        )
