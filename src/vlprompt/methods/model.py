"""PromptModel: a frozen backbone + one method; ``forward(images) -> logits``, ``run(images) -> ModelOutput``.

The data flow of every method: images -> image tower (engine, method's image plan) -> features;
class names -> tokens -> text tower (engine, method's text plan) -> features; logits =
logit_scale * cosine.  The text side is computed once per step for all classes and cached at
evaluation whenever nothing in it depends on the image.  :meth:`PromptModel.run` also gives, on
request, what a regularised objective compares against: the *frozen* CLIP image / text features and
the zero-shot logits (frozen text computed once per class set and template set, then cached).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.data import ClassDescriptions, build_transform
from vlprompt.data.images import load_rgb
from vlprompt.engine import (
    ATTENTION_MODES,
    AutoAttention,
    TowerPlan,
    attention_mode,
    encode_image,
    encode_text,
    slice_plan,
)
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import PromptMethod, TextInputs, build_config, get_method
from vlprompt.methods.common import ClassPrompts
from vlprompt.methods.output import FROZEN_NEEDS, DescriptionFeatures, ModelOutput
from vlprompt.options import Options, option

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class ModelOptions(Options):
    """The ``model`` section: execution options (not part of any method's recipe, never in the
    fingerprint); all exact unless noted."""

    section: ClassVar[str] = "model"

    truncate_text: bool = option(
        True, "drop text tokens after the longest end-of-text (exact under the causal mask)", execution=True
    )
    cache_text: bool = option(
        True, "reuse the text features at evaluation while the prompts are unchanged", execution=True
    )
    text_chunk: int = option(
        2048, "most text sequences per text-tower call (image-conditioned methods)", minimum=1, execution=True
    )
    checkpoint_text: bool = option(
        False, "activation checkpointing in the text tower (memory for 1000 classes)", execution=True
    )
    checkpoint_image: bool = option(False, "activation checkpointing in the image tower", execution=True)
    attention: str = option(
        "auto",
        "attention where a plan names none: auto (measured per shape) | sdpa | plain",
        choices=ATTENTION_MODES,
        execution=True,
    )
    share_prefix: bool = option(
        True, "run the tokens all class prompts share ([SOS] + shared context) once", execution=True
    )


class TextStrategy(Protocol):
    """Runs the text tower on a method's class prompts (see :meth:`PromptModel.set_text_strategy`)."""

    def encode(self, model: PromptModel, inputs: TextInputs) -> torch.Tensor: ...


class PromptModel(nn.Module):
    """Frozen CLIP + a prompt method; ``forward(images)`` gives logits over the current class names,
    :meth:`run` the typed :class:`ModelOutput` an objective reads."""

    def __init__(
        self,
        method: PromptMethod,
        backbone: Backbone,
        classnames: list[str],
        template: str = DEFAULT_TEMPLATE,
        options: ModelOptions | None = None,
        text_strategy: TextStrategy | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.options = options or ModelOptions()
        #: what ``attention="auto"`` runs per shape class; the run layer hands in a measured table
        #: (:func:`vlprompt.run.attention.measured_attention`); without one, SDPA everywhere
        self.auto_attention = AutoAttention()
        self._text_cache: tuple[Any, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._frozen_text: tuple[Any, torch.Tensor] | None = None
        self.descriptions: ClassDescriptions | None = None  # class descriptions (``set_descriptions``)
        self._desc_cache: tuple[Any, DescriptionFeatures] | None = None
        # the frozen teacher (set_teacher) lives outside the module tree: never in state_dict(), the
        # optimiser, .train() or .to(); its class features are cached per class set
        self.__dict__["_teacher"] = None
        self._teacher_text: dict[tuple[str, ...], torch.Tensor] = {}
        self.text_strategy: TextStrategy | None = text_strategy  # None: all classes, this process
        self.classnames: list[str] = []
        self.template = template
        self.set_classnames(classnames, template)

    # ------------------------------------------------------------------ classes
    def set_classnames(self, classnames: list[str], template: str | None = None) -> None:
        """Switch the label space (e.g. base -> new classes); the learned prompts are kept.

        Underscores become spaces (``golden_retriever`` -> ``golden retriever``), as the official
        trainers do, so API, CLI and predict tokenise every class name the same way."""
        classnames = [str(c).replace("_", " ") for c in classnames]
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
        if self.method.class_conditioned_text:  # class-aware prompts are built from frozen class text
            self.method.condition_on_classes(self.frozen_text_features())
        if self.teacher is not None:
            self.teacher.set_classnames(classnames, self.template)

    # ------------------------------------------------------------------ the teacher
    @property
    def teacher(self) -> PromptModel | None:
        """The frozen second model the method learns from (None: none set)."""
        return self.__dict__.get("_teacher")

    def set_teacher(self, teacher: PromptModel | None) -> None:
        """Attach a frozen teacher (another PromptModel: its own backbone and prompt, e.g. a ViT-L/14
        PromptSRC prompt loaded with ``load_prompt``).

        It is frozen here (no gradient, eval mode, kept in eval by ``train()``), never part of this
        model's state dict, optimiser or checkpoint, follows this model's class names, and its class
        features are computed once per class set.  Its images are this model's (same transform)."""
        if teacher is not None:
            if not isinstance(teacher, PromptModel):
                raise VlpromptError(f"a teacher must be a PromptModel, not {type(teacher).__name__}")
            mine, theirs = self.backbone.preprocess_cfg, teacher.backbone.preprocess_cfg
            if mine.get("size") != theirs.get("size"):
                raise VlpromptError(
                    f"the teacher's backbone takes {theirs.get('size')} px images, the student "
                    f"{mine.get('size')}; "
                    "use a teacher trained at the student's image size"
                )
            self.method.check_teacher(teacher)
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
            teacher.set_classnames(list(self.classnames), self.template)
        self.__dict__["_teacher"] = teacher
        self._teacher_text = {}
        self._text_cache = None

    def _require_teacher(self) -> PromptModel:
        if self.teacher is None:
            raise VlpromptError(
                f"method '{self.method.name}' learns from a teacher and none is set; give its saved prompt "
                "with --set options.teacher=PATH (or call model.set_teacher(load_prompt(PATH)))"
            )
        return self.teacher

    @torch.no_grad()
    def teacher_text_features(self) -> torch.Tensor:
        """The teacher's normalised class features (C, e') for the current classes, once per class set."""
        teacher = self._require_teacher()
        key = tuple(self.classnames)
        if key not in self._teacher_text:
            if len(self._teacher_text) > 8:
                self._teacher_text.clear()
            teacher.eval()
            self._teacher_text[key] = teacher.encode_text().detach()
        return self._teacher_text[key]

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits on ``images`` (its cached class features, its own scale)."""
        teacher = self._require_teacher()
        teacher.eval()
        tm = teacher.method
        # class features depend on the image (nothing to cache), or the teacher's head reads what
        # encode_image does not give (unnormalised features, an image adapter): its full forward
        if tm.image_conditioned_text or tm.raw_features or tm.adapts_image:
            return teacher(images.to(teacher.backbone.device)).float().detach()
        img = teacher.encode_image(images.to(teacher.backbone.device))
        logits = teacher._logits(img, self.teacher_text_features())
        return teacher.method.output_head(logits, img, self.teacher_text_features()).float().detach()

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything that learns (the method's prompts, nothing of CLIP), as torch and peft return it:
        ``sum(p.numel() for p in model.trainable_parameters())``, ``SGD(model.trainable_parameters())``."""
        return [p for _, p in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything that learns (names as in ``prompt.safetensors``)."""
        return [(n, p) for n, p in self.method.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

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
        out = super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm / dropout of a teacher never train
        return out

    # ------------------------------------------------------------------ towers
    def set_auto_attention(self, auto: AutoAttention) -> None:
        """The table (and resolver) that ``attention="auto"`` reads from now on (see engine.attention)."""
        self.auto_attention = auto
        self._text_cache = None

    def default_attention(self) -> Any:
        """The attention mode where a plan names none: ``options.attention``, ``auto`` through the table."""
        return attention_mode(self.options.attention, self.auto_attention)

    def encode_image(
        self, images: torch.Tensor, plan: TowerPlan | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Normalised image features (B, e) under the method's image plan (``normalize=False``: raw)."""
        own = plan is None  # the method's image side: its plan and its head
        plan = self.method.image_plan() if plan is None else plan
        feats = encode_image(
            self.backbone.clip.visual,
            images.to(self.backbone.device),
            plan,
            checkpoint=self.options.checkpoint_image,
            default_attention=self.default_attention(),
        )
        if own and self.method.has_image_head:
            feats = self.method.image_head(feats.float())
        return F.normalize(feats.float(), dim=-1) if normalize else feats.float()

    def run_text(self, embeds: torch.Tensor, eot: torch.Tensor, plan: TowerPlan | None) -> torch.Tensor:
        """Normalised text features of ``embeds`` (N, L, d) under ``plan``, in chunks of ``text_chunk``."""
        return F.normalize(self._text_tower(embeds, eot, plan), dim=-1)

    def _text_tower(self, embeds: torch.Tensor, eot: torch.Tensor, plan: TowerPlan | None) -> torch.Tensor:
        n = embeds.shape[0]
        chunk = max(1, int(self.options.text_chunk))
        outs = []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            sub = plan if (s == 0 and e == n) else slice_plan(plan, s, e, n)
            outs.append(
                encode_text(
                    self.backbone.clip,
                    embeds[s:e],
                    eot[s:e],
                    sub,
                    truncate=self.options.truncate_text,
                    checkpoint=self.options.checkpoint_text,
                    default_attention=self.default_attention(),
                    share_prefix=self.options.share_prefix,
                )
            )
        return torch.cat(outs).float()

    def set_text_strategy(self, strategy: TextStrategy | None) -> None:
        """How the class-prompt text tower runs (``None``: locally, all classes in this process).

        A strategy is any object with ``encode(model, inputs) -> (C, e)`` normalised features; the
        class-sharded DDP encoder of :mod:`vlprompt.train.distributed` is one."""
        self.text_strategy = strategy
        self._text_cache = None

    def encode_text(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features: (C, e), or (B, C, e) for image-conditioned methods."""
        return self._text_features(image_features)[0]

    def _text_features(self, image_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(normalised, unnormalised or None) text features; the latter only for ``raw_features`` methods
        (the tower's output: a method's text adapter, if any, applies to the normalised ones only)."""
        feats, raw = self._method_text(image_features)
        if self.method.adapts_text:  # the method's adapter, outside the cache (it may be learning)
            feats = F.normalize(self.method.adapt_text_features(feats).float(), dim=-1)
        return feats, raw

    def _method_text(self, image_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raw = self.method.raw_features
        if self.method.image_conditioned_text:
            if image_features is None:
                raise ValueError(
                    f"method '{self.method.name}' needs image features to build its text prompts"
                )
            inputs = self.method.text_inputs(image_features)
            b = image_features.shape[0]
            if raw:
                r = self._text_tower(inputs.embeds, inputs.eot, inputs.plan).view(b, self.n_classes, -1)
                return F.normalize(r, dim=-1), r
            return self.run_text(inputs.embeds, inputs.eot, inputs.plan).view(b, self.n_classes, -1), None
        if self.method.text_from_teacher:
            return self.teacher_text_features(), None
        static = self.method.static_text
        cacheable = self.options.cache_text and (static or not torch.is_grad_enabled())
        key = None
        if cacheable:
            key = (
                tuple(self.classnames),
                () if static else tuple(p._version for p in self.method.parameters()),
                self.backbone.device,
            )
            if self._text_cache is not None and self._text_cache[0] == key:
                return self._text_cache[1]
        inputs = self.method.text_inputs(None)
        if raw:
            if self.text_strategy is not None:
                raise VlpromptError(
                    f"method '{self.method.name}' reads unnormalised text features, which the sharded text "
                    "encoder does not give; train it with train.shard_text=false"
                )
            r = self._text_tower(inputs.embeds, inputs.eot, inputs.plan)
            feats: tuple[torch.Tensor, torch.Tensor | None] = (F.normalize(r, dim=-1), r)
        elif self.text_strategy is not None:
            feats = (self.text_strategy.encode(self, inputs), None)
        else:
            feats = (self.run_text(inputs.embeds, inputs.eot, inputs.plan), None)
        if cacheable:
            self._text_cache = (key, feats)
        return feats

    # ------------------------------------------------------------------ frozen CLIP
    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP's normalised image features (no prompts), for the same images."""
        if images.dim() == 2:  # cached frozen features already
            return F.normalize(images.to(self.backbone.device).float(), dim=-1)
        return self.encode_image(images, plan=TowerPlan())

    @torch.no_grad()
    def frozen_text_features(self) -> torch.Tensor:
        """Frozen CLIP's normalised text features (C, e) of the method's hand-crafted templates.

        With several templates the *unnormalised* features are averaged, then normalised (as
        PromptSRC's ensemble does).  Computed once per class set and template set, then cached."""
        templates = tuple(self.method.frozen_templates(self.template))
        if not templates:
            raise VlpromptError(f"method '{self.method.name}' names no template for frozen text features")
        key = (tuple(self.classnames), templates, self.backbone.device)
        if self._frozen_text is not None and self._frozen_text[0] == key:
            return self._frozen_text[1]
        total = None
        for t in templates:
            tok = self.method.frozen_prompts(self.backbone, self.classnames, t)
            feats = self._text_tower(tok.embeds, tok.eot, None)
            total = feats if total is None else total + feats
        out = F.normalize(total / len(templates), dim=-1)
        self._frozen_text = (key, out)
        return out

    # ------------------------------------------------------------------ class descriptions
    def set_descriptions(self, descriptions: ClassDescriptions | None) -> None:
        """Class descriptions (``vlprompt.data.read_descriptions``) whose frozen text features the
        objective may read (``needs`` ``descriptions``); checked against the classes when first encoded."""
        self.descriptions = descriptions
        self._desc_cache = None

    @torch.no_grad()
    def description_features(self) -> DescriptionFeatures:
        """Frozen CLIP's normalised features of every sentence of every current class (each sentence
        tokenised as it is, no template), computed once per class set and file, then cached."""
        if self.descriptions is None:
            raise VlpromptError(
                f"method '{self.method.name}' reads class descriptions; pass --descriptions FILE "
                "(JSON class -> sentences, or CSV class,sentence)"
            )
        key = (tuple(self.classnames), self.descriptions.sha256, self.backbone.device)
        if self._desc_cache is not None and self._desc_cache[0] == key:
            return self._desc_cache[1]
        per_class = self.descriptions.for_classes(self.classnames)
        sentences = [s for group in per_class for s in group]
        limit = self.backbone.context_length
        for name, group in zip(self.classnames, per_class):
            for i, s in enumerate(group):
                if len(self.backbone.encode_words(s)) + 2 > limit:
                    raise VlpromptError(
                        f"description {i + 1} of class '{name}' is longer than the model's {limit} tokens; "
                        "shorten it in the descriptions file"
                    )
        tok = ClassPrompts(self.backbone, sentences, [("text", "{}")]).to(self.backbone.device)
        feats = self._text_tower(tok.embeds, tok.eot, None)
        counts = torch.tensor([len(g) for g in per_class], device=feats.device)
        offsets = torch.cumsum(counts, 0) - counts
        out = DescriptionFeatures(F.normalize(feats, dim=-1), counts, offsets)
        self._desc_cache = (key, out)
        return out

    # ------------------------------------------------------------------ forward
    def logits_from_features(self, img: torch.Tensor, raw_img: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from normalised image features (lets callers cache frozen image features); the
        method's image adapter, if any, is applied here.  ``raw_img``: the unnormalised ones, for a
        method that sets ``raw_features``."""
        img = self._adapt_image(img)
        txt, raw_txt = self._text_features(img if self.method.image_conditioned_text else None)
        return self._head(self._logits(img, txt), img, txt, raw_img, raw_txt)

    def _head(
        self,
        logits: torch.Tensor,
        img: torch.Tensor,
        txt: torch.Tensor,
        raw_img: torch.Tensor | None,
        raw_txt: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.method.raw_features:
            if raw_img is None or raw_txt is None:
                raise VlpromptError(
                    f"method '{self.method.name}' reads unnormalised features; pass images, not cached "
                    "features"
                )
            return self.method.output_head(logits, raw_img, raw_txt)
        return self.method.output_head(logits, img, txt)

    def _logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        scale = self.backbone.logit_scale.float()
        if txt.dim() == 3:
            return scale * torch.einsum("be,bce->bc", img, txt)
        return scale * img @ txt.t()

    def _adapt_image(self, img: torch.Tensor) -> torch.Tensor:
        if not self.method.adapts_image:
            return img
        return F.normalize(self.method.adapt_image_features(img).float(), dim=-1)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._image_pair(images)[0]

    def _image_pair(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(normalised, unnormalised or None) image features; the latter only for ``raw_features`` methods."""
        if images.dim() == 2:
            if not self.method.takes_cached_image_features:
                why = (
                    "prompts the image tower" if self.method.prompts_image else "reads unnormalised features"
                )
                raise VlpromptError(
                    f"method '{self.method.name}' {why}, so cached image features cannot be used; pass images"
                )
            return F.normalize(images.to(self.backbone.device).float(), dim=-1), None
        if self.method.raw_features:
            raw = self.encode_image(images, normalize=False)
            return F.normalize(raw, dim=-1), raw
        return self.encode_image(images), None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits from images ``(B, 3, H, W)`` -- or from cached frozen image features ``(B, e)``.

        Features are accepted only when the method's image side has no prompts (they are then exactly
        what the image tower would give; see :mod:`vlprompt.train.features`), so a trainer or evaluator
        can run on a feature dataset unchanged.  Of several views ``(B, V, 3, H, W)`` view 0 is used.
        """
        return self.logits_from_features(*self._image_pair(images[:, 0] if images.dim() == 5 else images))

    def run(self, images: torch.Tensor, need: Iterable[str] = ()) -> ModelOutput:
        """The typed output of one forward: logits, features and the frozen-CLIP entries in ``need``.

        ``need`` is a subset of ``FROZEN_NEEDS`` (the trainer passes ``method.needs``);
        ``zero_shot_logits`` implies both frozen feature sets.  Logits equal ``forward(images)``.
        ``images`` may hold several views per image, ``(B, V, 3, H, W)`` (``PromptMethod.views``):
        view 0 gives the logits and learned features, view ``method.frozen_image_view`` the frozen
        image features (a single view stands for all)."""
        need = set(need)
        bad = need - FROZEN_NEEDS
        if bad:
            raise VlpromptError(f"unknown model output(s) {sorted(bad)}; choose from {sorted(FROZEN_NEEDS)}")
        frozen_view = images
        if images.dim() == 5:
            v = self.method.frozen_image_view
            other = images[:, v] if 0 < v < images.shape[1] else None
            images = images[:, 0]
            frozen_view = images if other is None else other
        tower, raw_img = self._image_pair(images)
        img = self._adapt_image(tower)
        txt, raw_txt = self._text_features(img if self.method.image_conditioned_text else None)
        logits = self._head(self._logits(img, txt), img, txt, raw_img, raw_txt)
        out = ModelOutput(logits, img, txt, logit_scale=self.backbone.logit_scale.float())
        out.raw_image_features, out.raw_text_features = raw_img, raw_txt
        if need & {"frozen_image", "zero_shot_logits"}:
            same = frozen_view is images and not self.method.prompts_image
            out.frozen_image_features = tower.detach() if same else self.frozen_image_features(frozen_view)
        if "descriptions" in need and self.descriptions is not None:
            out.description_features = self.description_features()
        if need & {"frozen_text", "zero_shot_logits"}:
            out.frozen_text_features = self.frozen_text_features()
        if "zero_shot_logits" in need:
            out.zero_shot_logits = self._logits(out.frozen_image_features, out.frozen_text_features).detach()
        if "teacher_logits" in need:
            out.teacher_logits = self.teacher_logits(images)
            out.teacher_text_features = self.teacher_text_features()
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images: Any, classnames: list[str] | None = None, topk: int = 5) -> Prediction:
        """Class probabilities of ``images`` over ``classnames`` (default: the current classes).

        ``images``: a preprocessed ``(B, 3, H, W)`` tensor, or image file paths / PIL images (a list
        or one), which get the backbone's test transform.  Classes may differ from training: that
        is the point of base-to-new generalisation.  Returns a :class:`Prediction` (class names and
        probabilities; ``.probs`` / ``.values`` / ``.indices`` are the tensors).
        """
        if topk < 1:
            raise VlpromptError(f"topk must be at least 1, got {topk}")
        if not isinstance(images, torch.Tensor):
            images = self.preprocess(images)
        if classnames is not None and list(classnames) != self.classnames:
            self.set_classnames(list(classnames))
        was = self.training
        self.eval()
        try:
            probs = self(images).float().softmax(-1)
        finally:
            self.train(was)
        if not bool(torch.isfinite(probs).all()):  # never report NaN probabilities as a prediction
            raise VlpromptError(
                "the model gives non-finite probabilities (its prompt, backbone weights or images hold NaN "
                "or inf); check the run with `vlprompt inspect` and the weights file"
            )
        return Prediction(list(self.classnames), probs.cpu(), min(topk, probs.shape[-1]))

    def preprocess(self, images: Any) -> torch.Tensor:
        """Paths or PIL images -> a ``(B, 3, H, W)`` batch under the backbone's test transform."""

        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise VlpromptError("no images given to predict; pass image paths, PIL images or a tensor")
        tf = build_transform(False, **self.backbone.preprocess_cfg)
        pil = [im.convert("RGB") if isinstance(im, Image.Image) else load_rgb(str(im)) for im in items]
        return torch.stack([tf(im) for im in pil])


@dataclass
class Prediction:
    """What :meth:`PromptModel.predict` returns: per image, the top classes by name with probabilities.

    ``probs`` is the full ``(B, C)`` probability tensor over ``classnames``; ``values`` / ``indices``
    are its top-k (and the object unpacks as ``values, indices`` like ``torch.topk``'s result).
    """

    classnames: list[str]
    probs: torch.Tensor
    k: int = 5

    @property
    def values(self) -> torch.Tensor:
        return self.probs.topk(self.k, dim=-1).values

    @property
    def indices(self) -> torch.Tensor:
        return self.probs.topk(self.k, dim=-1).indices

    @property
    def labels(self) -> list[str]:
        """The most probable class name of each image."""
        return [self.classnames[i] for i in self.probs.argmax(-1).tolist()]

    def top(self, k: int | None = None) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` (default: as asked) most probable ``(class name, probability)`` pairs."""
        k = min(k or self.k, self.probs.shape[-1])
        vals, idx = self.probs.topk(k, dim=-1)
        return [
            [(self.classnames[i], float(v)) for v, i in zip(vs, ix)]
            for vs, ix in zip(vals.tolist(), idx.tolist())
        ]

    def records(self) -> list[list[dict[str, Any]]]:
        """JSON-ready: per image a list of ``{"rank", "class", "probability"}``."""
        return [
            [{"rank": r + 1, "class": c, "probability": round(p, 6)} for r, (c, p) in enumerate(row)]
            for row in self.top()
        ]

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def __iter__(self):
        return iter((self.values, self.indices))

    def __repr__(self) -> str:
        rows = "; ".join(", ".join(f"{c} {p:.3f}" for c, p in row[:3]) for row in self.top()[:3])
        more = " ..." if len(self) > 3 else ""
        return f"Prediction({len(self)} image(s), {len(self.classnames)} classes: {rows}{more})"


def create_model(
    method: str,
    backbone: Backbone,
    classnames: list[str],
    template: str | None = None,
    *,
    model: ModelOptions | None = None,
    **options: Any,
) -> PromptModel:
    """Build ``method`` on ``backbone`` for ``classnames``.

    ``options`` are the method's config fields (see ``vlprompt methods``; unknown keys raise an error
    naming the valid ones); ``model`` the execution options (the run configuration's ``model`` section).
    """
    cls = get_method(method)
    m = cls(build_config(cls, options), backbone)
    return PromptModel(m, backbone, classnames, template or DEFAULT_TEMPLATE, model or ModelOptions())
