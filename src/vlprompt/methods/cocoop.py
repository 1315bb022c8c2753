"""CoCoOp: CoOp's context plus an image-conditioned bias from a small meta-net.

For each image feature x (normalised, width e) the meta-net Linear(e→e//16)–ReLU–Linear(e//16→d_txt)
gives a bias π(x) added to every context vector, so the text prompts differ per image: the text
tower runs over all B×C (image, class) prompts in one batched pass (chunked by the model's
``text_chunk``), and the logits of image b use its own C text features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts, ctx_segments, init_ctx
from vlprompt.methods.official import OfficialLayout, Signature, map_cocoop, meta_net_tokens


@dataclass
class CoCoOpConfig(MethodConfig):
    n_ctx: int = opt(4, "learnable context vectors", minimum=1)
    ctx_init: str = opt("a photo of a", 'phrase of exactly n_ctx tokens, or "" for N(0, 0.02^2)')
    meta_ratio: int = opt(16, "meta-net hidden width = embed_dim // meta_ratio", minimum=1)


@register_method
class CoCoOp(PromptMethod):
    name = "cocoop"
    display_name = "CoCoOp"
    official_parameters = 35_360
    dassl_trainers = ("CoCoOp",)
    dassl_keys = {"N_CTX": "n_ctx", "CTX_INIT": "ctx_init"}
    bench_batch_size = 1
    official = OfficialLayout(
        "KaiyangZhou/CoOp",
        "prompt_learner",
        Signature(
            has=("ctx", "meta_net.linear2.weight"), tensors=lambda sd: meta_net_tokens(sd) in (1, None)
        ),
        map_cocoop,
    )
    Config = CoCoOpConfig
    image_conditioned_text = True
    summary = "CoCoOp: CoOp context + per-image bias from a meta-net (text prompts conditioned on the image)"

    def __init__(self, cfg: CoCoOpConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        e, d = backbone.embed_dim, backbone.text.width
        if e // cfg.meta_ratio < 1:
            raise VlpromptError(f"meta_ratio={cfg.meta_ratio} must be between 1 and the embedding width {e}")
        self.ctx = nn.Parameter(init_ctx(backbone, cfg.n_ctx, cfg.ctx_init, d).cpu())
        hidden = e // cfg.meta_ratio
        self.meta_net = nn.Sequential(nn.Linear(e, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d))

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, ctx_segments(self.cfg.n_ctx, "end", "{}."))

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        """Rows ordered image-major: all C classes of image 0, then image 1, ... (B*C sequences)."""
        if image_features is None:
            raise ValueError("cocoop builds its text prompts from image features; pass image_features (B, e)")
        bias = self.meta_net(image_features.to(self.ctx.dtype))  # (B, d)
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, n_ctx, d)
        embeds = self.prompts.fill(ctx, per_image=True)
        return TextInputs(embeds, self.prompts.eot_for(image_features.shape[0]))
