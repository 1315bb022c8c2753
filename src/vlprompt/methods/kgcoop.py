"""KgCoOp: CoOp whose learned class embeddings stay close to frozen CLIP's hand-crafted ones.

Official code: github.com/htyao89/KgCoOp, ``KgCoOp/trainers/kgcoop.py``.  The prompt is CoOp's
``[SOS][V1..V4][CLASS][.][EOT]`` with the 4 vectors initialised from "a photo of a" (the official code
uses that phrase whenever ``CTX_INIT`` is set).  The objective adds the knowledge-guided term

    loss = CE(logits, y) + w * (1 - mean_c cos(t_c, t_c^clip))

where ``t_c`` are the learned (normalised) text features and ``t_c^clip`` frozen CLIP's features of
the data set's hand-crafted prompt (KgCoOp's ``CUSTOM_TEMPLATES``; they equal the data sets' CoOp
templates except DTD), w = 8.0 (the README's base-to-new runs).  The term is exactly zero at
initialisation when the hand-crafted prompt is "a photo of a {}." (ImageNet, Caltech101, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.methods.base import MethodConfig, PromptMethod, opt, register_method
from vlprompt.methods.common import ClassPrompts, HandCraftedContext, init_ctx, knowledge_gap
from vlprompt.methods.official import OfficialLayout, Signature, map_coop
from vlprompt.methods.output import ModelOutput

#: KgCoOp's CUSTOM_TEMPLATES where they differ from the data set's CoOp template (keyed by the latter)
KGCOOP_TEMPLATES = {"{} texture.": "a photo of a {}, a type of texture."}


@dataclass
class KgCoOpConfig(MethodConfig):
    n_ctx: int = opt(4, "number of learnable context vectors (official base-to-new: 4)", minimum=1)
    ctx_init: str = opt("a photo of a", "words initialising the context (n_ctx tokens); '' = N(0, 0.02^2)")
    weight: float = opt(8.0, "w: weight of 1 - mean cosine(learned, hand-crafted text features)", minimum=0)
    frozen_template: str = opt(
        "", "hand-crafted prompt of the frozen text features; '' = KgCoOp's template for the data set"
    )


@register_method
class KgCoOp(HandCraftedContext, PromptMethod):
    name = "kgcoop"
    display_name = "KgCoOp"
    official_parameters = 2_048
    dassl_trainers = ("KgCoOp",)
    dassl_keys = {"N_CTX": "n_ctx", "CTX_INIT": "ctx_init", "W": "weight"}
    official = OfficialLayout(
        "htyao89/KgCoOp", "prompt_learner", Signature(has=("ctx", "bias_vectors")), map_coop
    )
    Config = KgCoOpConfig
    summary = "KgCoOp: CoOp + w * (1 - cos) to frozen CLIP's hand-crafted class embeddings"
    needs = frozenset({"frozen_text"})
    official_templates = KGCOOP_TEMPLATES

    def __init__(self, cfg: KgCoOpConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        self.ctx = nn.Parameter(init_ctx(backbone, cfg.n_ctx, cfg.ctx_init, backbone.text.width).cpu())

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, [("ctx", self.cfg.n_ctx), ("text", "{}.")])

    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(out.logits.float(), labels)
        kg = knowledge_gap(out)
        return ce + self.cfg.weight * kg, {"ce": ce, "kg": kg}
