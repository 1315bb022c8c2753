"""CoOp: learnable context vectors in the text prompt, frozen image tower.

Prompt ``[SOS][V1..VM][CLASS][.][EOT]`` (class token at the end, front or middle).  The context is
shared by all classes, or class-specific (``csc``: one ``(M, d)`` context per class; such a prompt
is tied to the training classes and cannot be used for other class names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts, ctx_segments, init_ctx
from vlprompt.methods.official import OfficialLayout, Signature, map_coop


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = opt(16, "number of learnable context vectors M", minimum=1)
    ctx_init: str = opt("", '"" = N(0, 0.02^2); else a phrase of exactly n_ctx tokens, e.g. "a photo of a"')
    csc: bool = opt(False, "class-specific context (C, M, d) instead of one shared (M, d)")
    class_token_position: str = opt("end", "end | middle | front")


@register_method
class CoOp(PromptMethod):
    name = "coop"
    display_name = "CoOp"
    official_parameters = 8_192
    dassl_trainers = ("CoOp",)
    dassl_keys = {
        "N_CTX": "n_ctx",
        "CTX_INIT": "ctx_init",
        "CSC": "csc",
        "CLASS_TOKEN_POSITION": "class_token_position",
    }
    bench_batch_size = 32
    official = OfficialLayout(
        "KaiyangZhou/CoOp",
        "prompt_learner",
        Signature(has=("ctx",), lacks=("meta_net.linear1.weight", "bias_vectors"), frozen_words=False),
        map_coop,
    )
    Config = CoOpConfig
    summary = "CoOp: M learnable text context vectors (shared or class-specific), frozen image tower"

    def __init__(self, cfg: CoOpConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        ctx_segments(cfg.n_ctx, cfg.class_token_position)  # validates the position name early
        self.width = backbone.text.width
        init = init_ctx(backbone, cfg.n_ctx, cfg.ctx_init, self.width).cpu()
        if cfg.csc:
            # the (C, M, d) parameter needs the class count: built on the first prepare_text
            self.register_buffer("_ctx_init", init, persistent=False)
            self.ctx: nn.Parameter | None = None
            self._csc_classes: list[str] | None = None
        else:
            self.ctx = nn.Parameter(init)

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        if self.cfg.csc:
            if self.ctx is None:
                c = len(classnames)
                # ours: every class starts from the phrase (official CoOp ignores csc when ctx_init
                # is set and learns one shared context instead)
                if self.cfg.ctx_init:
                    start = self._ctx_init.unsqueeze(0).repeat(c, 1, 1)
                else:
                    start = torch.randn(c, self.cfg.n_ctx, self.width) * 0.02
                self.ctx = nn.Parameter(start.to(self._ctx_init.device))
                self._csc_classes = list(classnames)
            elif list(classnames) != self._csc_classes:
                raise VlpromptError(
                    "CoOp with csc=true learns one context per training class and cannot be applied to "
                    "other class names; use the training classes or train with csc=false"
                )
        segments = ctx_segments(self.cfg.n_ctx, self.cfg.class_token_position, "{}.")
        self.prompts = ClassPrompts(backbone, classnames, segments)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot)
