"""CoPrompt: MaPLe's prompts + residual feature adapters, kept consistent with frozen CLIP.

Official code: github.com/ShuvenduRoy/CoPrompt, ``trainers/coprompt.py`` (``CustomCLIP``,
``Adapter``, ``gpt_clip_classifier``) and ``configs/trainers/coprompt.yaml``; Roy & Etemad, ICLR 2024.

* Prompts: MaPLe's (``common.CoupledDeepPrompts``): 2 text slots from "a photo of a", deep text
  prompts at layers 1..8 and image prompts projected from them (depth 9).
* Adapters on the encoders' output features: ``A(x) = ReLU(W2 ReLU(W1 x))`` (Linear e->e/4 and
  e/4->e, no bias); image ``0.1 A(v) + 0.9 v``, text ``0.2 A(t) + 0.8 t``, then L2-normalised; the
  logits are ``scale * v t^T`` of the adapted features (training and test alike).
* Two views of each training image, both under Dassl's RandAugment(2, 10) after a resize to 224x224
  (``K_TRANSFORMS: 2``, ``TRANSFORMS: [randaugment, normalize]``): view 0 goes through the prompted
  model, view 1 through frozen CLIP.
* Class descriptions (``--descriptions FILE``, the repository's ``gpt_file/<dataset>_prompt.json``):
  every sentence encoded by frozen CLIP's text tower (no template), normalised, once.
* Per step: ``r`` = ``random.randint(0, K-1)`` (Python's RNG, as the official code) picks sentence
  ``r`` of every class, and

      loss = CE(logits, y) + W * [(1 - mean_c cos(t_c, d_{c,r})) + (1 - mean_b cos(v_b, v^clip_b))]

  with ``t`` the learned text features, ``d`` the description features, ``v`` the learned image
  features of view 0 and ``v^clip`` frozen CLIP's of view 1; ``W = 1`` (the config file's value; the
  trainer's built-in default, 8, is overridden by it).  ``distill: mse`` uses the two MSEs instead.

Ours, where the official code is silent or cannot run: classes with fewer sentences than the most
use sentence ``r mod count`` (the official code stacks the sentences and needs equal counts); built
from Python without descriptions, the data set's hand-crafted prompt's frozen features stand in for
them (with a warning; the CLI and the run layer refuse CoPrompt without ``--descriptions``); the
adapters' width follows the backbone (the official code fixes 512, ViT-B/16's).  The official code
rounds prompts to fp16 in the towers (``.half()``); we compute in the run's precision.
ViT-B/16 at the defaults: 3,817,216 trainable parameters (MaPLe's 3,555,072 + 262,144).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.data import randaugment_transform
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, opt, register_method
from vlprompt.methods.common import CoupledDeepPrompts
from vlprompt.methods.official import PL, OfficialLayout, Signature, map_coprompt
from vlprompt.methods.output import ModelOutput

log = logging.getLogger(__name__)


@dataclass
class CoPromptConfig(MethodConfig):
    n_ctx: int = opt(2, "learnable slots: the first n_ctx tokens of ctx_init")
    ctx_init: str = opt("a photo of a", 'prompt prefix; "" = n_ctx random slots before the class')
    depth: int = opt(9, "prompt depth J on both towers (1 = shallow only)", minimum=1)
    tie_init: bool = opt(True, "per-layer projections start as copies of one Linear (official code)")
    adapter_reduction: int = opt(4, "adapter hidden width = embed_dim / adapter_reduction", minimum=1)
    image_adapter_ratio: float = opt(
        0.1, "image features = r * adapter(v) + (1 - r) * v", minimum=0, maximum=1
    )
    text_adapter_ratio: float = opt(0.2, "text features = r * adapter(t) + (1 - r) * t", minimum=0, maximum=1)
    consistency_weight: float = opt(
        1.0, "W: weight of the two consistency terms (official TRAINER.W)", minimum=0
    )
    distill: str = opt("cosine", "consistency measure: cosine (official) | mse", choices=("cosine", "mse"))
    randaugment_n: int = opt(2, "RandAugment operations per view (Dassl INPUT.RANDAUGMENT_N)", minimum=0)
    randaugment_m: int = opt(
        10, "RandAugment magnitude of 30 (Dassl INPUT.RANDAUGMENT_M)", minimum=0, maximum=30
    )


def _adapter(width: int, reduction: int) -> nn.Sequential:
    hidden = width // reduction
    if hidden < 1:
        raise VlpromptError(
            f"adapter_reduction={reduction} leaves no hidden unit at embed width {width}; lower it"
        )
    return nn.Sequential(
        nn.Linear(width, hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, width, bias=False),
        nn.ReLU(inplace=True),
    )


@register_method
class CoPrompt(CoupledDeepPrompts, PromptMethod):
    name = "coprompt"
    display_name = "CoPrompt"
    official_parameters = 3_817_216
    bench_batch_size = 4
    official = OfficialLayout(
        "ShuvenduRoy/CoPrompt",
        "MultiModalPromptLearner",
        Signature(
            has=(PL + "ctx", PL + "proj.weight", "adapter_image.fc.0.weight", "adapter_text.fc.0.weight")
        ),
        map_coprompt,
    )
    Config = CoPromptConfig
    summary = (
        "CoPrompt: MaPLe prompts + feature adapters, kept consistent with frozen CLIP on a second view "
        "and on class descriptions"
    )
    needs = frozenset({"frozen_image", "frozen_text", "descriptions"})
    views = 2
    frozen_image_view = 1

    def __init__(self, cfg: CoPromptConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        self.init_coupled_prompts(
            backbone, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, depth=cfg.depth, tie_init=cfg.tie_init
        )
        e = backbone.embed_dim
        self.adapter_image = _adapter(e, cfg.adapter_reduction)
        self.adapter_text = _adapter(e, cfg.adapter_reduction)
        self._warned = False

    # --- adapters (the contract's post-encoder hooks) ------------------------------------------
    def adapt_image_features(self, features: torch.Tensor) -> torch.Tensor:
        r = self.cfg.image_adapter_ratio
        return r * self.adapter_image(features) + (1 - r) * features

    def adapt_text_features(self, features: torch.Tensor) -> torch.Tensor:
        r = self.cfg.text_adapter_ratio
        return r * self.adapter_text(features) + (1 - r) * features

    # --- two views under Dassl's RandAugment -------------------------------------------------
    def view_transform(self, view: int, preprocess_cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
        return randaugment_transform(**preprocess_cfg, n=self.cfg.randaugment_n, m=self.cfg.randaugment_m)

    # --- objective ----------------------------------------------------------------------------
    def description_pick(self, most: int) -> int:
        """The sentence index of this step: ``random.randint(0, most - 1)`` (Python's RNG, as official)."""
        return random.randint(0, most - 1)

    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        ce = F.cross_entropy(out.logits.float(), labels)
        desc = out.description_features
        if desc is not None:
            ref_text = desc.pick(self.description_pick(desc.most))
        else:
            if out.frozen_text_features is None:
                raise VlpromptError(
                    "CoPrompt reads class descriptions; set them with "
                    "model.set_descriptions(read_descriptions(FILE))"
                )
            if not self._warned:
                log.warning(
                    "CoPrompt without class descriptions: the hand-crafted prompt's frozen features stand in"
                )
                self._warned = True
            ref_text = out.frozen_text_features
        txt, img = out.text_features.float(), out.image_features.float()
        ref_text, ref_img = ref_text.float(), out.frozen_image_features.float()
        if c.distill == "cosine":
            text = 1.0 - F.cosine_similarity(txt, ref_text, dim=1, eps=1e-7).mean()
            image = 1.0 - F.cosine_similarity(img, ref_img, dim=1, eps=1e-7).mean()
        else:
            text, image = F.mse_loss(txt, ref_text), F.mse_loss(img, ref_img)
        loss = ce + c.consistency_weight * (text + image)
        return loss, {"ce": ce, "text_consistency": text, "image_consistency": image}
