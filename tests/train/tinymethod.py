"""A minimal learnable method for trainer tests (CoOp-like: n shared context vectors, text tower only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, register_method
from vlprompt.methods.common import ClassPrompts, ctx_segments


@dataclass
class TinyCtxConfig(MethodConfig):
    n_ctx: int = 2


@register_method
class TinyCtx(PromptMethod):
    name = "tinyctx"
    Config = TinyCtxConfig
    summary = "test-only: shared learnable context"

    def __init__(self, cfg: TinyCtxConfig, backbone):
        super().__init__(cfg, backbone)
        self.ctx = nn.Parameter(torch.randn(cfg.n_ctx, backbone.text.width) * 0.02)

    def prepare_text(self, backbone, classnames, template):
        self.prompts = ClassPrompts(backbone, classnames, ctx_segments(self.cfg.n_ctx, "end"))

    def text_inputs(self, image_features=None):
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot)
