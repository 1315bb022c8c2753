"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the few-shot training images beside zero-shot CLIP.

Official code: github.com/gaopengcuhk/Tip-Adapter, ``main.py`` + ``utils.py`` (Zhang et al., ECCV 2022).
The cache is *built from the training set*, not trained: keys ``K`` (N·K shots, e) are frozen CLIP's image
features of the training images, averaged over ``augment_epoch`` augmented passes **before** normalising
(the official ``build_cache_model``), values ``V`` (N·K, C) their one-hot labels.  For a normalised test
feature ``f``

    logits = logit_scale · f Wᵀ + alpha · exp(-beta (1 - f Kᵀ)) V

with ``W`` frozen CLIP's normalised text features of the data set's template (the official code writes
the literal 100 for ``logit_scale``: pretrained CLIP's value).  Tip-Adapter has no trainable parameter;
Tip-Adapter-F makes the keys a parameter (the official ``adapter.weight``, initialised to ``K``) trained by
cross-entropy on the logits above.  The values stay fixed one-hot labels of the training classes: on
a class set inside them the cache's columns are taken by class name; on classes it was not built on (the
new classes of base-to-new, another data set) the cache has nothing to say and the model is zero-shot
CLIP, as DePT's head (the rule is ours: the paper evaluates the few-shot protocol only).  Before the
build the cache is empty and adds nothing: the model is zero-shot CLIP.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts


@dataclass
class TipAdapterConfig(MethodConfig):
    alpha: float = opt(1.0, "residual ratio alpha: weight of the cache logits (official init_alpha)")
    beta: float = opt(1.0, "sharpness beta of exp(-beta (1 - affinity)) (official init_beta)")
    augment_epoch: int = opt(10, "augmented passes over the training set whose key features are averaged")
    text: str = opt("", 'template of the zero-shot classifier ("" = the data set\'s)')


def cache_logits(
    image_features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """``alpha · exp(-beta (1 - f Kᵀ)) V`` (the official ``((-1) * (beta - beta * affinity)).exp()``)."""
    affinity = image_features @ keys.t()
    return alpha * ((-1) * (beta - beta * affinity)).exp() @ values


class _Cache(PromptMethod):
    """Shared by both variants: zero-shot text side, the cache built from the training set, the head."""

    Config = TipAdapterConfig
    keys_trainable = False
    static_text = True  # zero-shot CLIP's classifier: encoded once per class set, in training too

    def __init__(self, cfg: TipAdapterConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        if cfg.augment_epoch < 1:
            raise VlpromptError(f"augment_epoch={cfg.augment_epoch} must be at least 1")
        if cfg.beta < 0:
            raise VlpromptError(f"beta={cfg.beta} must be >= 0")
        # empty until built; Tip-F's keys become a parameter then (nothing to train before)
        self.register_buffer("cache_keys", torch.zeros(0, backbone.embed_dim))
        self.register_buffer("cache_values", torch.zeros(0, 0))
        self._cache_classes: list[str] = []  # the classes the cache is (or will be) built on
        self._cols: torch.Tensor | None = None  # cache columns of the current classes (None: unused)

    # --- text side: frozen CLIP's classifier ------------------------------------------------------
    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, [("text", self.cfg.text or template)])
        if not self._cache_classes:  # the first classes: those of training, the cache's columns
            self._cache_classes = list(classnames)
        index = {c: i for i, c in enumerate(self._cache_classes)}
        in_cache = all(c in index for c in classnames)
        self._cols = torch.tensor([index[c] for c in classnames], dtype=torch.long) if in_cache else None

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        return TextInputs(self.prompts.embeds, self.prompts.eot)

    # --- the cache --------------------------------------------------------------------------------
    def build(self, model: Any, loader: Iterable[Any]) -> None:
        passes, labels = [], None
        for _ in range(self.cfg.augment_epoch):
            feats, ys = [], []
            for images, y in loader:
                if images.dim() == 2:  # cached frozen features (already normalised)
                    f = images.to(model.backbone.device).float()
                else:
                    f = model.encode_image(images, normalize=False)
                feats.append(f.float())
                ys.append(torch.as_tensor(y).cpu())
            y_all = torch.cat(ys)
            if labels is None:
                labels = y_all
            elif not torch.equal(labels, y_all):
                raise VlpromptError(
                    f"method '{self.name}' builds its cache from the training set in a fixed order, but two "
                    "passes gave different labels; pass an unshuffled training set"
                )
            passes.append(torch.cat(feats))
        keys = F.normalize(torch.stack(passes).mean(0), dim=-1)  # mean over passes, then normalise
        n_classes = len(model.classnames)
        if labels is None or labels.numel() == 0 or int(labels.max()) >= n_classes or int(labels.min()) < 0:
            raise VlpromptError(
                f"method '{self.name}' needs training labels in 0..{n_classes - 1}; check the training set"
            )
        values = F.one_hot(labels.long(), n_classes).float()
        self._cache_classes = list(model.classnames)
        self._cols = torch.arange(n_classes)
        self._set_cache(keys.detach().float(), values.to(keys.device))

    def _set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keys_trainable:
            self.cache_keys = nn.Parameter(keys.clone())
        else:
            self.cache_keys = keys.clone()
        self.cache_values = values.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the cache's size (training images N·K, classes C) is known only once built: take the saved one
        k, v = state_dict.get(prefix + "cache_keys"), state_dict.get(prefix + "cache_values")
        if (
            k is not None
            and v is not None
            and (k.shape != self.cache_keys.shape or v.shape != self.cache_values.shape)
        ):
            dev = self.cache_keys.device
            self._set_cache(torch.zeros(k.shape, device=dev), torch.zeros(v.shape, device=dev))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def output_head(
        self, logits: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        # not built yet, or classes it was not built on: the cache adds nothing (zero-shot CLIP)
        if self.cache_keys.shape[0] == 0 or self._cols is None:
            return logits
        if self.cache_values.shape[1] != len(self._cache_classes):
            raise VlpromptError(
                f"method '{self.name}': the saved cache has {self.cache_values.shape[1]} classes but the "
                f"model was built on {len(self._cache_classes)}; load the prompt with its training classes "
                "first (load_run does), then switch classes"
            )
        values = self.cache_values[:, self._cols.to(self.cache_values.device)]
        cfg = self.cfg
        return logits + cache_logits(image_features, self.cache_keys, values, cfg.alpha, cfg.beta)


@register_method
class TipAdapter(_Cache):
    name = "tip-adapter"
    display_name = "Tip-Adapter"
    summary = "Tip-Adapter: zero-shot CLIP + a cache of few-shot image features and labels (training-free)"
    trainable_note = "training-free: a cache of shots x classes image features is built, none trained"


@register_method
class TipAdapterF(_Cache):
    name = "tip-adapter-f"
    display_name = "Tip-Adapter-F"
    summary = "Tip-Adapter-F: Tip-Adapter whose cache keys are fine-tuned by cross-entropy"
    trainable_note = "once built: shots x classes x embed dim (ViT-B/16, 16 shots: 8,192 per class)"
    keys_trainable = True
