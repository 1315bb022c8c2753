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

from vlprompt.backbones import Backbone
from vlprompt.methods.base import MethodConfig, PromptMethod, opt, register_method
from vlprompt.methods.common import CoupledDeepPrompts
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_maple


@dataclass
class MaPLeConfig(MethodConfig):
    n_ctx: int = opt(2, "learnable slots: the first n_ctx tokens of ctx_init")
    ctx_init: str = opt("a photo of a", 'prompt prefix; "" = n_ctx random slots before the class')
    depth: int = opt(9, "prompt depth J on both towers (1 = shallow only)", minimum=1)
    tie_init: bool = opt(True, "per-layer projections start as copies of one Linear (official code)")


@register_method
class MaPLe(CoupledDeepPrompts, PromptMethod):
    name = "maple"
    display_name = "MaPLe"
    official_parameters = 3_555_072
    dassl_trainers = ("MaPLe",)
    dassl_keys = {"N_CTX": "n_ctx", "CTX_INIT": "ctx_init", "PROMPT_DEPTH": "depth"}
    bench_batch_size = 4
    official = OfficialLayout(
        "muzairkhattak/multimodal-prompt-learning",
        "MultiModalPromptLearner",
        Signature(
            has=(PL + "ctx", PL + "proj.weight"), lacks_prefix=(PL + "txt2img_proj.", "adapter_image.")
        ),
        map_maple,
    )
    Config = MaPLeConfig
    summary = "MaPLe: deep text prompts with per-layer text->image projections as the image prompts"

    def __init__(self, cfg: MaPLeConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        self.init_coupled_prompts(
            backbone, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, depth=cfg.depth, tie_init=cfg.tie_init
        )
