"""Zero-shot CLIP: the data set's hand-crafted template, nothing learned."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprompt.backbones import Backbone
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts


@dataclass
class ZeroShotConfig(MethodConfig):
    text: str = opt("", "a fixed template overriding the data set's (\"\" = use the data set's)")


@register_method
class ZeroShot(PromptMethod):
    name = "zeroshot"
    display_name = "zero-shot CLIP"
    official_parameters = 0
    dassl_trainers = ("ZeroshotCLIP", "ZeroshotCLIP2")
    paper_name = "CLIP"
    Config = ZeroShotConfig
    summary = "zero-shot CLIP with the data set's hand-crafted template (no learning)"

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, [("text", self.cfg.text or template)])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        return TextInputs(self.prompts.embeds, self.prompts.eot)
