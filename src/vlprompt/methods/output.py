"""The typed values between a method and the model: what the text tower runs (:class:`TextInputs`) and
what one forward pass gives an objective (:class:`ModelOutput`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprompt.engine import TowerPlan


@dataclass
class TextInputs:
    """What the text tower runs: layer-0 embeddings (N, L, d), end-of-text positions (N,) and a plan."""

    embeds: torch.Tensor
    eot: torch.Tensor
    plan: TowerPlan | None = None


#: what a method may ask :meth:`PromptModel.run` for beyond logits and features (``PromptMethod.needs``)
FROZEN_NEEDS = frozenset({"frozen_image", "frozen_text", "zero_shot_logits", "teacher_logits"})


@dataclass
class ModelOutput:
    """Logits and the L2-normalised features they came from; frozen-CLIP entries only when requested.

    ``text_features`` is ``(C, e)``, or ``(B, C, e)`` for methods whose text depends on the image.
    ``frozen_text_features`` are frozen CLIP's features of the method's hand-crafted templates
    (:meth:`PromptMethod.frozen_templates`; several templates are averaged before normalising);
    ``zero_shot_logits = logit_scale * frozen_image_features @ frozen_text_features.T``.  Frozen
    entries carry no gradient.  ``teacher_logits`` (``(B, C)``, on request) are the frozen teacher's
    logits on the same images and ``teacher_text_features`` its normalised class features (computed once
    per class set): see :meth:`PromptModel.set_teacher`.
    """

    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor
    frozen_image_features: torch.Tensor | None = None
    frozen_text_features: torch.Tensor | None = None
    zero_shot_logits: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_text_features: torch.Tensor | None = None
