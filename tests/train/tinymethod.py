"""A minimal learnable method for trainer tests (CoOp-like: n shared context vectors, text tower only).

Registered only while a test module uses it (``registered()``), so other tests' method lists never see it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.methods import registered as _registered
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs
from vlprompt.methods.common import ClassPrompts, ctx_segments


@dataclass
class TinyCtxConfig(MethodConfig):
    n_ctx: int = 2


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


@contextlib.contextmanager
def registered():
    """Make ``tinyctx`` a known method for the duration of the block."""
    with _registered(TinyCtx):
        yield
