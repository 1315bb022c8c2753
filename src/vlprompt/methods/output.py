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
FROZEN_NEEDS = frozenset(
    {"frozen_image", "frozen_text", "zero_shot_logits", "descriptions", "teacher_logits"}
)


@dataclass
class DescriptionFeatures:
    """Frozen CLIP's normalised text features of every class's description sentences.

    ``features`` ``(N, e)`` holds class 0's sentences, then class 1's, ...; ``counts`` ``(C,)`` how
    many each class has (``offsets`` where each starts)."""

    features: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    def pick(self, index: int) -> torch.Tensor:
        """``(C, e)``: sentence ``index`` of every class (``index mod count`` for a class with fewer)."""
        rows = self.offsets + torch.remainder(torch.as_tensor(index, device=self.counts.device), self.counts)
        return self.features[rows]

    @property
    def most(self) -> int:
        """The largest number of sentences of a class."""
        return int(self.counts.max())


@dataclass
class ModelOutput:
    """Logits and the L2-normalised features they came from; frozen-CLIP entries only when requested.

    ``text_features`` is ``(C, e)``, or ``(B, C, e)`` for methods whose text depends on the image.
    ``frozen_text_features`` are frozen CLIP's features of the method's hand-crafted templates
    (:meth:`PromptMethod.frozen_templates`; several templates are averaged before normalising);
    ``zero_shot_logits = logit_scale * frozen_image_features @ frozen_text_features.T``.  Frozen
    entries carry no gradient.  With several views per image (``PromptMethod.views``) the learned
    entries come from view 0 and ``frozen_image_features`` from ``PromptMethod.frozen_image_view``.
    ``description_features``: frozen CLIP's features of the class descriptions (``--descriptions``).
    ``teacher_logits`` (``(B, C)``, on request) are the frozen teacher's logits on the same images and
    ``teacher_text_features`` its normalised class features (computed once per class set): see
    :meth:`PromptModel.set_teacher`.
    """

    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor
    frozen_image_features: torch.Tensor | None = None
    frozen_text_features: torch.Tensor | None = None
    zero_shot_logits: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    # the features before L2 normalisation, only for a method that sets ``raw_features`` (DePT's head)
    raw_image_features: torch.Tensor | None = None
    raw_text_features: torch.Tensor | None = None
    description_features: DescriptionFeatures | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_text_features: torch.Tensor | None = None
