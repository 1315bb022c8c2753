"""PromptModel: a frozen backbone + one method, giving ``forward(images) -> logits (B, C)``.

The data flow of every method: images -> image tower (engine, method's image plan) -> features;
class names -> tokens -> text tower (engine, method's text plan) -> features; logits =
logit_scale * cosine.  The text side is computed once per step for all classes and cached at
evaluation whenever nothing in it depends on the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import ATTENTION_MODES, TowerPlan, encode_image, encode_text
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import PromptMethod, build_config, get_method

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class ModelOptions:
    """Execution options (not part of any method's recipe); all exact unless noted."""

    truncate_text: bool = True  # drop tokens after the longest EOT (exact under the causal mask)
    cache_text: bool = True  # reuse text features at evaluation while prompts are unchanged
    text_chunk: int = 2048  # max text sequences per text-tower call (image-conditioned methods)
    checkpoint_text: bool = False  # activation checkpointing in the text tower (memory for 1000 classes)
    checkpoint_image: bool = False
    attention: str = "auto"  # where a plan names no mode: "auto" (measured per shape) | "sdpa" | "plain"
    share_prefix: bool = True  # run the tokens all class prompts share ([SOS] + shared context) once

    @classmethod
    def keys(cls) -> set[str]:
        return set(cls.__dataclass_fields__)


class PromptModel(nn.Module):
    """Frozen CLIP + a prompt method; ``forward(images)`` gives logits over the current class names."""

    def __init__(
        self,
        method: PromptMethod,
        backbone: Backbone,
        classnames: list[str],
        template: str = DEFAULT_TEMPLATE,
        options: ModelOptions | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.options = options or ModelOptions()
        if self.options.attention not in ATTENTION_MODES:
            raise VlpromptError(
                f"unknown attention '{self.options.attention}'; use one of {', '.join(ATTENTION_MODES)}"
            )
        self._text_cache: tuple[Any, torch.Tensor] | None = None
        self.classnames: list[str] = []
        self.template = template
        self.set_classnames(classnames, template)

    # ------------------------------------------------------------------ classes
    def set_classnames(self, classnames: list[str], template: str | None = None) -> None:
        """Switch the label space (e.g. base -> new classes); the learned prompts are kept."""
        classnames = [str(c) for c in classnames]
        if not classnames:
            raise VlpromptError("no class names given; pass at least one class name")
        if len(set(classnames)) != len(classnames):
            dup = sorted({c for c in classnames if classnames.count(c) > 1})
            raise VlpromptError(f"duplicate class names {dup[:5]}; class names must be unique")
        if template is not None:
            if "{}" not in template:
                raise VlpromptError(f"template '{template}' has no '{{}}' placeholder for the class name")
            self.template = template
        self.classnames = classnames
        self.method.prepare_text(self.backbone, classnames, self.template)
        self.method.to(self.backbone.device)
        self._text_cache = None

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything that learns: the method's prompts, nothing of CLIP."""
        return [(n, p) for n, p in self.method.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """The learned state (parameters and persistent buffers of the method) -- what gets saved."""
        return {k: v.detach() for k, v in self.method.state_dict().items()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.method.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise VlpromptError(
                f"saved prompt does not fit method '{self.method.name}' with these options "
                f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); use the run's own config"
            )
        self._text_cache = None

    def train(self, mode: bool = True) -> PromptModel:
        self._text_cache = None
        return super().train(mode)

    # ------------------------------------------------------------------ towers
    def encode_image(self, images: torch.Tensor, plan: TowerPlan | None = None) -> torch.Tensor:
        """Normalised image features (B, e) under the method's image plan."""
        plan = self.method.image_plan() if plan is None else plan
        feats = encode_image(
            self.backbone.clip.visual,
            images.to(self.backbone.device),
            plan,
            checkpoint=self.options.checkpoint_image,
            default_attention=ATTENTION_MODES[self.options.attention],
        )
        return F.normalize(feats.float(), dim=-1)

    def _run_text(self, embeds: torch.Tensor, eot: torch.Tensor, plan: TowerPlan | None) -> torch.Tensor:
        n = embeds.shape[0]
        chunk = max(1, int(self.options.text_chunk))
        outs = []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            sub = plan if (s == 0 and e == n) else _slice_plan(plan, s, e, n)
            outs.append(
                encode_text(
                    self.backbone.clip,
                    embeds[s:e],
                    eot[s:e],
                    sub,
                    truncate=self.options.truncate_text,
                    checkpoint=self.options.checkpoint_text,
                    default_attention=ATTENTION_MODES[self.options.attention],
                    share_prefix=self.options.share_prefix,
                )
            )
        return F.normalize(torch.cat(outs).float(), dim=-1)

    def encode_text(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features: (C, e), or (B, C, e) for image-conditioned methods."""
        if self.method.image_conditioned_text:
            if image_features is None:
                raise ValueError(
                    f"method '{self.method.name}' needs image features to build its text prompts"
                )
            inputs = self.method.text_inputs(image_features)
            b = image_features.shape[0]
            return self._run_text(inputs.embeds, inputs.eot, inputs.plan).view(b, self.n_classes, -1)
        cacheable = self.options.cache_text and not torch.is_grad_enabled()
        key = None
        if cacheable:
            key = (
                tuple(self.classnames),
                tuple(p._version for p in self.method.parameters()),
                self.backbone.device,
            )
            if self._text_cache is not None and self._text_cache[0] == key:
                return self._text_cache[1]
        inputs = self.method.text_inputs(None)
        feats = self._run_text(inputs.embeds, inputs.eot, inputs.plan)
        if cacheable:
            self._text_cache = (key, feats)
        return feats

    def logits_from_features(self, img: torch.Tensor) -> torch.Tensor:
        """Logits from normalised image features (lets callers cache frozen image features)."""
        txt = self.encode_text(img if self.method.image_conditioned_text else None)
        scale = self.backbone.logit_scale.float()
        if txt.dim() == 3:
            return scale * torch.einsum("be,bce->bc", img, txt)
        return scale * img @ txt.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits from images ``(B, 3, H, W)`` -- or from cached frozen image features ``(B, e)``.

        Features are accepted only when the method's image side has no prompts (they are then exactly
        what the image tower would give; see :mod:`vlprompt.bench.features`), so a trainer or evaluator
        can run on a feature dataset unchanged.
        """
        if images.dim() == 2:
            if self.method.prompts_image:
                raise VlpromptError(
                    f"method '{self.method.name}' prompts the image tower, so cached image features cannot "
                    "be used; pass images"
                )
            return self.logits_from_features(F.normalize(images.to(self.backbone.device).float(), dim=-1))
        return self.logits_from_features(self.encode_image(images))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Any, classnames: list[str] | None = None, topk: int = 5):
        """Top-k ``(probabilities, indices)`` over ``classnames`` (default: current classes).

        ``images``: a preprocessed ``(B, 3, H, W)`` tensor, or image file paths / PIL images (a list
        or one), which get the backbone's test transform.  Classes may differ from training: that
        is the point of base-to-new generalisation.
        """
        if not isinstance(images, torch.Tensor):
            images = self.preprocess(images)
        if classnames is not None and list(classnames) != self.classnames:
            self.set_classnames(list(classnames))
        was = self.training
        self.eval()
        probs = self(images).softmax(-1)
        self.train(was)
        k = min(topk, probs.shape[-1])
        return probs.topk(k, dim=-1)

    def preprocess(self, images: Any) -> torch.Tensor:
        """Paths or PIL images -> a ``(B, 3, H, W)`` batch under the backbone's test transform."""
        from PIL import Image

        from vlprompt.data import build_transform
        from vlprompt.data.images import load_rgb

        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise VlpromptError("no images given to predict")
        tf = build_transform(False, **self.backbone.preprocess_cfg)
        pil = [im.convert("RGB") if isinstance(im, Image.Image) else load_rgb(str(im)) for im in items]
        return torch.stack([tf(im) for im in pil])


def _slice_plan(plan: TowerPlan | None, s: int, e: int, n: int) -> TowerPlan | None:
    """The part of ``plan`` for sequences ``s:e`` (per-sequence prompt tensors are sliced)."""
    if plan is None:
        return None

    def cut(t):
        return t[s:e] if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == n else t

    from dataclasses import replace

    layers = {i: replace(op, replace=cut(op.replace), append=cut(op.append)) for i, op in plan.layers.items()}
    return TowerPlan(shallow=cut(plan.shallow), layers=layers, attention=plan.attention)


def create_model(
    method: str,
    backbone: Backbone,
    classnames: list[str],
    template: str | None = None,
    **options: Any,
) -> PromptModel:
    """Build ``method`` on ``backbone`` for ``classnames``.

    ``options`` are the method's config fields (see ``vlprompt methods``) plus execution options
    of :class:`ModelOptions`; unknown keys raise an error naming the valid ones.
    """
    cls = get_method(method)
    model_opts = {k: options.pop(k) for k in list(options) if k in ModelOptions.keys()}
    cfg = build_config(cls, options)
    m = cls(cfg, backbone)
    return PromptModel(m, backbone, classnames, template or DEFAULT_TEMPLATE, ModelOptions(**model_opts))
