"""PromptSRC: IVLP prompts regularised towards frozen CLIP, aggregated over epochs.

Official code: github.com/muzairkhattak/PromptSRC, ``trainers/promptsrc.py`` and
``configs/trainers/PromptSRC/*.yaml``.  Prompts are IVLP's: 4 text slots initialised from
"a photo of a" plus fresh N(0, 0.02^2) slots replacing them at text layers 1..8, and 4 image tokens
appended at layers 0..8 (depth 9 on both towers).  The objective per step:

    loss = CE + 25 * L1(t, t^clip) + 10 * L1(v, v^clip) + KL(p_zs || p)

* ``t`` learned normalised text features, ``t^clip`` frozen CLIP's ensemble over the 60 ImageNet
  templates (unnormalised features averaged, then normalised), L1 = mean absolute difference;
* ``v`` the prompted image features, ``v^clip`` frozen CLIP's of the same (augmented) images;
* KL: ``sum p_zs (log p_zs - log p) / (B * C)`` (``F.kl_div(..., reduction="sum") / logits.numel()``
  of the official code) with ``p_zs`` from the zero-shot logits ``scale * v^clip @ t^clip.T``.

Gaussian prompt aggregation (GPA): after epoch ``e`` of ``E`` the prompts are added to a running
sum with weight ``N(e; mean, std) / sum_k N(k; mean, std)`` (k = 1..E); after the last epoch the
aggregate replaces the prompts and is what gets evaluated and saved.  The running sum is hook state,
checkpointed every epoch, so a resumed run aggregates exactly as an uninterrupted one.  Ours: only
the learnable prompts are aggregated (the official code sums the whole model's state dict, whose
frozen entries the normalised weights leave unchanged up to float round-off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, opt, register_method
from vlprompt.methods.common import (
    IMAGENET_TEMPLATES,
    IndependentDeepPrompts,
)
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_ivlp
from vlprompt.methods.output import ModelOutput

_GPA_PREFIX = "gpa."


@dataclass
class PromptSRCConfig(MethodConfig):
    n_ctx_text: int = opt(4, "learnable text slots (the first tokens of ctx_init)")
    n_ctx_image: int = opt(4, "learnable image tokens per layer")
    ctx_init: str = opt(
        "a photo of a", "prompt prefix (used when n_ctx_text <= 4, as official); '' = random slots"
    )
    depth_text: int = opt(9, "text layers with their own prompts (1 = shallow)")
    depth_image: int = opt(9, "image layers with their own prompts (0 = no image prompts)")
    text_loss_weight: float = opt(25.0, "weight of L1(learned text features, frozen ensemble features)")
    image_loss_weight: float = opt(10.0, "weight of L1(prompted image features, frozen image features)")
    kl_weight: float = opt(1.0, "weight of KL(zero-shot || prompted) over the logits (official: 1)")
    gpa_mean: float = opt(15.0, "mean (in epochs, 1-based) of the Gaussian prompt aggregation weights")
    gpa_std: float = opt(1.0, "std (in epochs) of the Gaussian prompt aggregation weights", above=0)
    gpa: bool = opt(True, "aggregate the prompts over epochs (false: keep the last epoch's)")
    frozen_templates_set: str = opt(
        "imagenet",
        "frozen text reference: 'imagenet' (60-template ensemble, official) or 'dataset'",
        choices=("imagenet", "dataset"),
    )


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """The normalised Gaussian weight of each epoch 1..epochs (they sum to 1)."""
    if std <= 0:
        raise VlpromptError(f"gpa_std={std} must be > 0")
    g = [
        math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        for e in range(1, epochs + 1)
    ]
    total = sum(g)
    if not total > 0:
        raise VlpromptError(
            f"Gaussian aggregation weights vanish for {epochs} epochs with mean {mean}, std {std}; "
            "set options.gpa_mean inside the epochs or raise options.gpa_std"
        )
    return [x / total for x in g]


@register_method
class PromptSRC(IndependentDeepPrompts, PromptMethod):
    name = "promptsrc"
    display_name = "PromptSRC"
    official_parameters = 46_080
    dassl_trainers = ("PromptSRC",)
    dassl_keys = {
        **IndependentDeepPrompts.dassl_keys,  # IVLP's prompt keys
        "TEXT_LOSS_WEIGHT": "text_loss_weight",
        "IMAGE_LOSS_WEIGHT": "image_loss_weight",
        "GPA_MEAN": "gpa_mean",
        "GPA_STD": "gpa_std",
    }
    official = OfficialLayout(
        "muzairkhattak/PromptSRC",
        "VLPromptLearner",
        Signature(has=(PL + "ctx",), has_prefix=(PL + "ZS_image_encoder.",)),
        map_ivlp,
    )
    Config = PromptSRCConfig
    summary = "PromptSRC: IVLP prompts + L1/KL self-regulation to frozen CLIP + Gaussian prompt aggregation"
    needs = frozenset({"zero_shot_logits"})

    def __init__(self, cfg: PromptSRCConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        gpa_weights(1, cfg.gpa_mean, cfg.gpa_std)  # validates std early
        # official: the words initialise the context only when n_ctx_text <= 4, else N(0, 0.02^2)
        self.init_independent_prompts(
            backbone, n_ctx_text=cfg.n_ctx_text, ctx_words=cfg.ctx_init if cfg.n_ctx_text <= 4 else "",
            depth_text=cfg.depth_text, n_ctx_image=cfg.n_ctx_image, depth_image=cfg.depth_image,
        )  # fmt: skip
        self._gpa: dict[str, torch.Tensor] | None = None

    # --- objective -------------------------------------------------------------------------
    def frozen_templates(self, template: str) -> list[str]:
        return list(IMAGENET_TEMPLATES) if self.cfg.frozen_templates_set == "imagenet" else [template]

    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        logits = out.logits.float()
        ce = F.cross_entropy(logits, labels)
        l1_text = F.l1_loss(out.text_features.float(), out.frozen_text_features.float())
        l1_image = F.l1_loss(out.image_features.float(), out.frozen_image_features.float())
        kl = (
            F.kl_div(
                F.log_softmax(logits, dim=1),
                F.log_softmax(out.zero_shot_logits.float(), dim=1),
                reduction="sum",
                log_target=True,
            )
            / logits.numel()
        )
        loss = ce + c.text_loss_weight * l1_text + c.image_loss_weight * l1_image + c.kl_weight * kl
        return loss, {"ce": ce, "l1_text": l1_text, "l1_image": l1_image, "kl": kl}

    # --- Gaussian prompt aggregation ---------------------------------------------------------
    def _learned(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        if not self.cfg.gpa:
            return
        w = gpa_weights(epochs, self.cfg.gpa_mean, self.cfg.gpa_std)[epoch - 1]
        with torch.no_grad():
            cur = {n: p.detach() * w for n, p in self._learned().items()}
            if self._gpa is None or epoch == 1:  # a new run starts a new aggregate
                self._gpa = {n: t.clone() for n, t in cur.items()}
            else:
                self._gpa = {n: cur[n] + self._gpa[n] for n in cur}
            if epoch == epochs:  # the aggregate becomes the prompt that is evaluated and saved
                for n, p in self._learned().items():
                    p.copy_(self._gpa[n])

    def hook_state_dict(self) -> dict[str, Any]:
        return (
            {} if self._gpa is None else {_GPA_PREFIX + n: t.detach().clone() for n, t in self._gpa.items()}
        )

    def load_hook_state_dict(self, state: dict[str, Any]) -> None:
        learned = self._learned()
        gpa = {k[len(_GPA_PREFIX) :]: v for k, v in state.items() if k.startswith(_GPA_PREFIX)}
        if set(state) - {_GPA_PREFIX + n for n in gpa} or (gpa and set(gpa) != set(learned)):
            raise VlpromptError(
                "checkpoint's prompt-aggregation state does not fit this PromptSRC model; "
                "resume with the run's own config"
            )
        self._gpa = {n: v.to(learned[n].device, learned[n].dtype) for n, v in gpa.items()} or None
