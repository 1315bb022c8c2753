"""TCP: textual-based class-aware prompt tuning (Yao, Zhang and Xu, CVPR 2024).

Official code: github.com/htyao89/Textual-based_Class-aware_prompt_tuning, ``trainers/tcp.py`` and
``trainers/clip_text/model.py``.  Three parts:

* CoOp's prompt ``[SOS][V1..V4] <text>[EOT]``, the 4 context vectors N(0, 0.02²) (the official
  ``CTX_INIT: False``); ``<text>`` is TCP's own per-data-set prompt after the context (its
  ``CUSTOM_TEMPLATES``: "{}, a type of pet.", "{} texture.", "{}." ...).
* Class-aware tokens (the paper's Textual Knowledge Embedding): frozen CLIP's normalised text
  features ``t^clip`` (C, e) of the data set's hand-crafted prompt (its ``CUSTOM_TEMPLATES_ori``)
  pass through a small map Linear(e→e/4)–QuickGELU–Linear(e/4→4·d), giving 4 tokens per class that
  *replace* the tokens after [SOS] at the input of text block 9 of 12 (the official ``layers=[8]``,
  ``weights=[1.0]``; 0-based block 8).  New classes get their tokens from their own frozen features.
* ``loss = CE(logits, y) + 8.0 · (1 − mean_c cos(t_c, t_c^clip))`` (KgCoOp's term, the same ``t^clip``).

ViT-B/16 with the defaults: 2,048 context + 65,664 + 264,192 map = 331,904 trainable parameters.

Ours where the official code is silent or hard-codes ViT-B/16: the token width and count come from the
backbone and the options (the official reshapes to 512); the official class-token mixing weight is
fixed at 1.0 (pure replacement), so it is no option; StanfordCars' official prompt "{}, a type of
car" (no period) cannot be told from the other "a photo of a {}." data sets by their template: it
gets "{}." unless ``options.prompt_text="{}, a type of car"`` is passed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import LayerOps, TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import (
    ClassPrompts,
    init_ctx,
    knowledge_gap,
    official_template,
    validate_depth,
)
from vlprompt.methods.official import OfficialLayout, Signature, map_tcp, meta_net_tokens
from vlprompt.methods.output import ModelOutput

#: TCP's ``CUSTOM_TEMPLATES_ori`` (frozen reference) where they differ from the data set's CoOp template
TCP_FROZEN_TEMPLATES = {
    "a photo of a {}, a type of aircraft.": "a photo of an aircraft {}.",
    "{} texture.": "a photo of a {}, a type of texture.",
    "a photo of {}, a type of food.": "a photo of a {}, a type of food.",
}

#: TCP's ``CUSTOM_TEMPLATES`` (the text after the 4 context vectors) where the rule "the CoOp template
#: without its leading 'a photo of a'" does not give it
TCP_PROMPT_TEXT = {
    "a centered satellite photo of {}.": "{}.",
    "a photo of {}, a type of food.": "{}, a type of food.",
}

_LEAD = "a photo of a "


def tcp_prompt_text(template: str, override: str = "") -> str:
    """The text after the context for the data set whose CoOp template is ``template``."""
    if override:
        return official_template({}, template, override)
    if template in TCP_PROMPT_TEXT:
        return TCP_PROMPT_TEXT[template]
    return template[len(_LEAD) :] if template.startswith(_LEAD) else template


@dataclass
class TCPConfig(MethodConfig):
    n_ctx: int = opt(4, "learnable context vectors after [SOS] (official base-to-new: 4)", minimum=1)
    ctx_init: str = opt("", 'phrase of exactly n_ctx tokens initialising the context; "" = N(0, 0.02^2)')
    class_tokens: int = opt(4, "class-aware tokens per class, replacing the tokens after [SOS]", minimum=1)
    class_depth: int = opt(
        9,
        "text block (1-based) at whose input the class-aware tokens are written (official: 9 of 12)",
        minimum=1,
    )
    reduction: int = opt(4, "hidden width of the class-token map = embed_dim // reduction", minimum=1)
    weight: float = opt(8.0, "w: weight of 1 - mean cosine(learned, hand-crafted text features)", minimum=0)
    prompt_text: str = opt(
        "", "prompt text after the context ('{}' = class); '' = TCP's text for the data set"
    )
    frozen_template: str = opt(
        "", "hand-crafted prompt of the frozen text features; '' = TCP's template for the data set"
    )


@register_method
class TCP(PromptMethod):
    name = "tcp"
    display_name = "TCP"
    paper_name = "TCP"
    official_parameters = 331_904
    dassl_trainers = ("TCP",)
    dassl_keys = {
        "N_CTX": "n_ctx",
        "CTX_INIT": "ctx_init",
    }  # its COOP.W is overwritten in the official code: no effect, not mapped
    bench_batch_size = 32
    official = OfficialLayout(
        "htyao89/Textual-based_Class-aware_prompt_tuning",
        "prompt_learner",
        Signature(has=("ctx", "meta_net.linear1.weight", "meta_net.linear2.weight"), lacks=("bias_vectors",),
                  tensors=lambda sd: (meta_net_tokens(sd) or 0) > 1),
        map_tcp,
    )  # fmt: skip
    Config = TCPConfig
    class_conditioned_text = True
    needs = frozenset({"frozen_text"})
    summary = "TCP: CoOp context + class-aware tokens mapped from frozen class text features + KgCoOp term"

    def __init__(self, cfg: TCPConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        e, d = backbone.embed_dim, backbone.text.width
        validate_depth(cfg.class_depth, backbone.text.layers, "text")
        if e // cfg.reduction < 1:
            raise VlpromptError(f"reduction={cfg.reduction} must be between 1 and the embedding width {e}")
        self.ctx = nn.Parameter(init_ctx(backbone, cfg.n_ctx, cfg.ctx_init, d).cpu())
        hidden = e // cfg.reduction
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(e, hidden)),
                    ("relu", QuickGELU()),  # the official module name; the activation is QuickGELU
                    ("linear2", nn.Linear(hidden, cfg.class_tokens * d)),
                ]
            )
        )
        self.register_buffer("class_features", None, persistent=False)

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        text = tcp_prompt_text(template, self.cfg.prompt_text)
        self.prompts = ClassPrompts(backbone, classnames, [("ctx", self.cfg.n_ctx), ("text", text)])
        self.class_features = None  # the model hands the new classes' frozen features next

    def frozen_templates(self, template: str) -> list[str]:
        return [official_template(TCP_FROZEN_TEMPLATES, template, self.cfg.frozen_template)]

    def condition_on_classes(self, frozen_text_features: torch.Tensor) -> None:
        self.class_features = frozen_text_features.detach().float()

    def class_aware_tokens(self) -> torch.Tensor:
        """The class-aware tokens (C, class_tokens, d) of the current classes."""
        if self.class_features is None:
            raise VlpromptError(
                "tcp builds its class tokens from frozen CLIP's class text features; use it through "
                "PromptModel (create_model), which provides them"
            )
        w = self.meta_net.linear1.weight
        out = self.meta_net(self.class_features.to(w.device, w.dtype))
        return out.view(out.shape[0], self.cfg.class_tokens, -1)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        plan = TowerPlan(
            layers={self.cfg.class_depth - 1: LayerOps(replace=self.class_aware_tokens(), replace_at=1)}
        )
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot, plan)

    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(out.logits.float(), labels)
        kg = knowledge_gap(out)
        return ce + self.cfg.weight * kg, {"ce": ce, "kg": kg}
