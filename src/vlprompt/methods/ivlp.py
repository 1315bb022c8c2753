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

from vlprompt.backbones import Backbone
from vlprompt.methods.base import MethodConfig, PromptMethod, opt, register_method
from vlprompt.methods.common import (
    IndependentDeepPrompts,
)
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_ivlp


@dataclass
class IVLPConfig(MethodConfig):
    n_ctx_text: int = opt(2, "learnable text slots (the first tokens of ctx_init)")
    n_ctx_image: int = opt(2, "learnable image tokens per layer")
    ctx_init: str = opt("a photo of a", 'prompt prefix; "" = n_ctx_text random slots before the class')
    depth_text: int = opt(12, "text layers with their own prompts (1 = shallow)")
    depth_image: int = opt(12, "image layers with their own prompts (0 = no image prompts)")


@register_method
class IVLP(IndependentDeepPrompts, PromptMethod):
    name = "ivlp"
    display_name = "IVLP"
    official_parameters = 30_720
    dassl_trainers = ("IVLP", "IndependentVL")
    bench_batch_size = 4
    official = OfficialLayout(
        "muzairkhattak/multimodal-prompt-learning",
        "VLPromptLearner",
        Signature(
            has=(PL + "ctx",),
            lacks=(PL + "proj.weight",),
            lacks_prefix=(PL + "txt2img_proj.", PL + "ZS_image_encoder."),
        ),
        map_ivlp,
    )
    Config = IVLPConfig
    summary = "IVLP: independent deep prompts in the text and image towers"

    def __init__(self, cfg: IVLPConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        self.init_independent_prompts(
            backbone, n_ctx_text=cfg.n_ctx_text, ctx_words=cfg.ctx_init, depth_text=cfg.depth_text,
            n_ctx_image=cfg.n_ctx_image, depth_image=cfg.depth_image,
        )  # fmt: skip
