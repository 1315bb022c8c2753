"""Pieces several methods share: tokenized class prompts with learnable slots, context init,
per-layer text->image projections.  Methods import this module, never each other."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import ALL, LayerOps, TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.output import ModelOutput, TextInputs

Segment = tuple[str, object]  # ("ctx", n) | ("text", "a photo of a {}.")


class ClassPrompts(nn.Module):
    """Tokenized prompts for every class, with ``n_ctx`` learnable slots at known positions.

    ``segments`` describe one prompt, e.g. ``[("ctx", 4), ("text", "{}.")]`` for CoOp's
    ``[SOS][V1..V4][CLASS][.][EOT]``; ``{}`` in a text segment is the class name.  The frozen token
    embeddings are kept; :meth:`fill` writes context vectors into the slots, which is exactly
    CoOp's concatenation ``[prefix, ctx, suffix]`` (the slot tokens' own embeddings are discarded).
    Buffers are non-persistent: they depend on the class names, not on what was learned.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str], segments: Sequence[Segment]):
        super().__init__()
        placeholder = backbone.encode_words("X")
        rows, slots, eots = [], [], []
        length = backbone.context_length
        for name in classnames:
            ids, pos = [backbone.sot_id], []
            for kind, val in segments:
                if kind == "ctx":
                    pos += list(range(len(ids), len(ids) + int(val)))
                    ids += placeholder * int(val)
                else:
                    ids += backbone.encode_words(str(val).replace("{}", name))
            ids.append(backbone.eot_id)
            if len(ids) > length:
                raise VlpromptError(
                    f"prompt for class '{name}' is {len(ids)} tokens, longer than the model's {length}; "
                    "shorten the class name or the context"
                )
            eots.append(len(ids) - 1)
            rows.append(ids + [0] * (length - len(ids)))
            slots.append(pos)
        ids_t = torch.tensor(rows, dtype=torch.long)
        with torch.no_grad():
            emb = backbone.token_embed(ids_t).float()
        self.register_buffer("ids", ids_t, persistent=False)
        self.register_buffer("embeds", emb, persistent=False)
        self.register_buffer("eot", torch.tensor(eots, dtype=torch.long), persistent=False)
        self.register_buffer(
            "slots", torch.tensor(slots, dtype=torch.long).view(len(rows), -1), persistent=False
        )
        self.classnames = list(classnames)

    @property
    def n_classes(self) -> int:
        return self.ids.shape[0]

    def fill(self, ctx: torch.Tensor | None, per_image: bool = False) -> torch.Tensor:
        """Token embeddings with ``ctx`` written into the slots.

        ``ctx``: ``(n, d)`` shared by all classes, ``(C, n, d)`` class-specific, or with
        ``per_image=True`` ``(B, n, d)`` -- one context per image, giving ``(B*C, L, d)`` rows ordered
        image-major (all classes of image 0, then image 1, ...).
        """
        emb = self.embeds
        if ctx is None or self.slots.shape[1] == 0:
            return emb
        c, length, d = emb.shape
        n = self.slots.shape[1]
        ctx = ctx.to(emb.dtype)
        if per_image:
            b = ctx.shape[0]
            base = emb.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * c, length, d)
            src = ctx.unsqueeze(1).expand(-1, c, -1, -1).reshape(b * c, n, d)
            idx = self.slots.repeat(b, 1)
        else:
            base = emb
            src = ctx.unsqueeze(0).expand(c, -1, -1) if ctx.dim() == 2 else ctx
            idx = self.slots
        return base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), src)

    def eot_for(self, batch: int | None = None) -> torch.Tensor:
        return self.eot if batch is None else self.eot.repeat(batch)


def ctx_from_words(backbone: Backbone, words: str, n_ctx: int) -> torch.Tensor:
    """Context vectors initialised from the token embeddings of ``words`` (must be ``n_ctx`` tokens)."""
    ids = backbone.encode_words(words.replace("_", " "))
    if len(ids) != n_ctx:
        raise VlpromptError(
            f"context init '{words}' is {len(ids)} tokens but n_ctx={n_ctx}; use a phrase of {n_ctx} tokens "
            "or ctx_init='' for random init"
        )
    with torch.no_grad():
        return backbone.token_embed(torch.tensor(ids)).float().clone()


def init_ctx(backbone: Backbone, n_ctx: int, ctx_init: str, width: int, std: float = 0.02) -> torch.Tensor:
    """``n_ctx`` vectors from ``ctx_init`` words, or N(0, std^2) when ``ctx_init`` is empty."""
    if ctx_init:
        return ctx_from_words(backbone, ctx_init, n_ctx)
    return torch.randn(n_ctx, width) * std


def normal_prompts(*shape: int, std: float = 0.02) -> nn.Parameter:
    """Fresh N(0, std^2) prompt parameters (the official init of deep prompts)."""
    return nn.Parameter(torch.randn(*shape) * std)


def uniform_prompts(n: int, width: int, patch_size: int) -> nn.Parameter:
    """VPT's init: U(-v, v) with v = sqrt(6 / (3 * patch^2 + width))."""
    v = (6.0 / (3 * patch_size * patch_size + width)) ** 0.5
    return nn.Parameter(torch.empty(n, width).uniform_(-v, v))


def linear_stack(n: int, d_in: int, d_out: int, tie_init: bool = False) -> nn.ModuleList:
    """``n`` Linear(d_in -> d_out) layers; with ``tie_init`` all start from one layer's weights
    (MaPLe's/MPL's ``_get_clones``: deep copies of a single initialised Linear)."""
    if n <= 0:
        return nn.ModuleList()
    first = nn.Linear(d_in, d_out)
    if tie_init:
        return nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(n - 1)])
    return nn.ModuleList([first] + [nn.Linear(d_in, d_out) for _ in range(n - 1)])


def validate_depth(depth: int, layers: int, tower: str, minimum: int = 1) -> None:
    if not minimum <= depth <= layers:
        raise VlpromptError(
            f"prompt depth {depth} is outside [{minimum}, {layers}] for the {tower} tower's {layers} layers"
        )


def ctx_segments(n_ctx: int, position: str, template_text: str = "{}.") -> list[Segment]:
    """CoOp's class-token positions.

    ``end``: (ctx, class) · ``front``: (class, ctx) · ``middle``: (half the ctx, class, other half).
    """
    if position == "end":
        return [("ctx", n_ctx), ("text", template_text)]
    if position == "front":
        name, rest = _split_class(template_text)
        return [("text", name), ("ctx", n_ctx), ("text", rest)]
    if position == "middle":
        half = n_ctx // 2
        name, rest = _split_class(template_text)
        return [("ctx", half), ("text", name), ("ctx", n_ctx - half), ("text", rest)]
    raise VlpromptError(f"unknown class_token_position '{position}'; use end, middle or front")


def _split_class(text: str) -> tuple[str, str]:
    m = re.match(r"^(.*\{\})(.*)$", text)
    if not m:
        raise VlpromptError(f"template '{text}' has no '{{}}' for the class name")
    return m.group(1), m.group(2)


def prefix_ctx(
    backbone: Backbone, n_ctx: int, ctx_init: str, width: int, std: float = 0.02
) -> tuple[torch.Tensor, list[Segment]]:
    """MaPLe/IVLP-style context: the prompt is ``"<ctx_init> {}."`` whose first ``n_ctx`` tokens are
    learnable slots initialised from those tokens' embeddings; the rest of the phrase stays frozen
    text (``"a photo of a"`` with n_ctx=2: "a photo" learns, "of a" is fixed).  Without ``ctx_init``
    the prompt is ``[V1..Vn] {}.`` with N(0, std^2) context.  Returns ``(ctx (n_ctx, width), segments)``."""
    if n_ctx < 1:
        raise VlpromptError(f"n_ctx={n_ctx} must be at least 1")
    if not ctx_init:
        return torch.randn(n_ctx, width) * std, [("ctx", n_ctx), ("text", "{}.")]
    ids = backbone.encode_words(ctx_init.replace("_", " "))
    if len(ids) < n_ctx:
        raise VlpromptError(
            f"context init '{ctx_init}' is {len(ids)} tokens but n_ctx={n_ctx}; use a phrase of at least "
            f"{n_ctx} tokens or ctx_init='' for random init"
        )
    with torch.no_grad():
        ctx = backbone.token_embed(torch.tensor(ids[:n_ctx])).float().clone().cpu()
    rest = backbone.tokenizer.decode(ids[n_ctx:]).strip() if len(ids) > n_ctx else ""
    if rest and backbone.encode_words(rest) != ids[n_ctx:]:  # BPE round trip must be exact
        raise VlpromptError(
            f"context init '{ctx_init}' cannot be split after {n_ctx} tokens; use whole words"
        )
    return ctx, [("ctx", n_ctx), ("text", f"{rest} {{}}." if rest else "{}.")]


def deep_text_plan(deep: Sequence[torch.Tensor], at: int) -> TowerPlan | None:
    """Independent deep text prompts (IVLP/PromptSRC): before layer ``i + 1`` the context slots
    ``[at, at + n)`` are *replaced* by ``deep[i]`` (no positional embedding at deep layers)."""
    layers = {i + 1: LayerOps(replace=t, replace_at=at) for i, t in enumerate(deep)}
    return TowerPlan(layers=layers) if layers else None


def deep_image_plan(prompts: torch.Tensor | None) -> TowerPlan | None:
    """Independent deep image prompts (IVLP/PromptSRC): ``prompts[0]`` (n, d) appended after
    the positional embedding; at layer ``l`` the previous prompt outputs dropped, ``prompts[l]`` appended."""
    if prompts is None:
        return None
    layers = {i: LayerOps(remove=ALL, append=prompts[i]) for i in range(1, prompts.shape[0])}
    return TowerPlan(shallow=prompts[0], layers=layers)


def words_ctx(
    backbone: Backbone, n_ctx: int, phrase: str, std: float = 0.02
) -> tuple[torch.Tensor, list[Segment]]:
    """ProGrad-style context: ``n_ctx`` learnable slots ending in the first ``w`` tokens of ``phrase``
    (``w`` = its word count, as the official code counts), zeros before them; the phrase's remaining
    tokens stay frozen text before the class name.  ``""``: N(0, std^2) context, CoOp's prompt.
    Returns ``(ctx (n_ctx, d), segments)``."""
    width = backbone.text.width
    if not phrase:
        return torch.randn(n_ctx, width) * std, [("ctx", n_ctx), ("text", "{}.")]
    ids = backbone.encode_words(phrase.replace("_", " "))
    w = len(phrase.split(" "))
    if w > n_ctx:
        raise VlpromptError(
            f"context init '{phrase}' has {w} words but n_ctx={n_ctx}; raise n_ctx to at least {w}"
        )
    ctx = torch.zeros(n_ctx, width)
    with torch.no_grad():
        ctx[n_ctx - w :] = backbone.token_embed(torch.tensor(ids[:w])).float().cpu()
    rest = backbone.tokenizer.decode(ids[w:]).strip() if len(ids) > w else ""
    if rest and backbone.encode_words(rest) != ids[w:]:  # BPE round trip must be exact
        raise VlpromptError(f"context init '{phrase}' cannot be split after {w} tokens; use whole words")
    return ctx, [("ctx", n_ctx), ("text", f"{rest} {{}}." if rest else "{}.")]


def official_template(table: dict[str, str], template: str, override: str = "") -> str:
    """``override`` when set, else the official code's template for the data set whose CoOp template
    is ``template`` (``table`` lists only those that differ), else ``template`` itself."""
    if override:
        if "{}" not in override:
            raise VlpromptError(f"template '{override}' has no '{{}}' placeholder for the class name")
        return override
    return table.get(template, template)


#: CLIP's ImageNet prompt templates as used by PromptSRC's frozen text ensemble (60 of them)
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)  # fmt: skip


class HandCraftedContext:
    """Mixin for the regularised CoOp variants (KgCoOp, ProGrad): one learnable context ``ctx`` filled
    into every class prompt, and frozen text from the official code's hand-crafted template for the data
    set (``official_templates``: those that differ from the CoOp template; ``cfg.frozen_template``
    overrides)."""

    official_templates: dict[str, str] = {}

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot)

    def frozen_templates(self, template: str) -> list[str]:
        return [official_template(self.official_templates, template, self.cfg.frozen_template)]


class IndependentDeepPrompts:
    """Mixin for methods with IVLP's prompts: a learnable text context (the first tokens of a phrase),
    independent deep text prompts, and deep image prompts.  The parameters keep IVLP's names
    (``ctx``, ``text_deep``, ``image_prompts``), so saved prompts and imported checkpoints fit."""

    #: the official trainer config's keys of these prompts (IVLP's, PromptSRC's: registry ``dassl_keys``)
    dassl_keys: ClassVar[Mapping[str, str]] = {
        "N_CTX_TEXT": "n_ctx_text",
        "N_CTX_VISION": "n_ctx_image",
        "CTX_INIT": "ctx_init",
        "PROMPT_DEPTH_TEXT": "depth_text",
        "PROMPT_DEPTH_VISION": "depth_image",
    }

    def init_independent_prompts(
        self, backbone: Backbone, *, n_ctx_text: int, ctx_words: str, depth_text: int, n_ctx_image: int,
        depth_image: int,
    ) -> None:  # fmt: skip
        validate_depth(depth_text, backbone.text.layers, "text")
        if depth_image:
            validate_depth(depth_image, backbone.image.layers, "image")
            if n_ctx_image < 1:
                raise VlpromptError(f"n_ctx_image={n_ctx_image} must be at least 1 (or set depth_image=0)")
        elif depth_image < 0:
            raise VlpromptError(f"depth_image={depth_image} must be 0 (off) or a layer count")
        d_txt, d_img = backbone.text.width, backbone.image.width
        ctx, self._segments = prefix_ctx(backbone, n_ctx_text, ctx_words, d_txt)
        self.ctx = nn.Parameter(ctx)
        self.text_deep = nn.ParameterList([normal_prompts(n_ctx_text, d_txt) for _ in range(depth_text - 1)])
        self.image_prompts = normal_prompts(depth_image, n_ctx_image, d_img) if depth_image else None

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, self._segments)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        at = int(self.prompts.slots[0, 0])
        return TextInputs(self.prompts.fill(self.ctx), self.prompts.eot, deep_text_plan(self.text_deep, at))

    def image_plan(self) -> TowerPlan | None:
        return deep_image_plan(self.image_prompts)


class CoupledDeepPrompts:
    """Mixin for methods with MaPLe's prompts: a learnable text context (the first ``n_ctx`` tokens of a
    phrase), deep text prompts replacing those slots at text layers 1..J-1, and image prompts projected
    from the text ones (layer 0: ``proj(ctx)`` appended; layer l: ``proj_l(T_l)`` replacing the previous
    layer's).  The parameters keep MaPLe's names (``ctx``, ``proj``, ``compound_prompts_text``,
    ``compound_prompt_projections``), so saved prompts and imported checkpoints fit."""

    def init_coupled_prompts(
        self, backbone: Backbone, *, n_ctx: int, ctx_init: str, depth: int, tie_init: bool
    ) -> None:
        validate_depth(depth, backbone.text.layers, "text")
        validate_depth(depth, backbone.image.layers, "image")
        d_txt, d_img = backbone.text.width, backbone.image.width
        ctx, self._segments = prefix_ctx(backbone, n_ctx, ctx_init, d_txt)
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(d_txt, d_img)
        self.compound_prompts_text = nn.ParameterList(
            [normal_prompts(n_ctx, d_txt) for _ in range(depth - 1)]
        )
        self.compound_prompt_projections = (
            linear_stack(depth - 1, d_txt, d_img, tie_init=tie_init) if depth > 1 else nn.ModuleList()
        )

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, self._segments)

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        at = int(self.prompts.slots[0, 0])
        layers = {i + 1: LayerOps(replace=t, replace_at=at) for i, t in enumerate(self.compound_prompts_text)}
        return TextInputs(
            self.prompts.fill(self.ctx), self.prompts.eot, TowerPlan(layers=layers) if layers else None
        )

    def image_plan(self) -> TowerPlan:
        layers = {
            i + 1: LayerOps(remove=ALL, append=f(t))
            for i, (f, t) in enumerate(zip(self.compound_prompt_projections, self.compound_prompts_text))
        }
        return TowerPlan(shallow=self.proj(self.ctx), layers=layers)


def knowledge_gap(out: ModelOutput) -> torch.Tensor:
    """KgCoOp's term, 1 - mean cosine of the learned to the frozen class text features.

    As the official code: ``CosineSimilarity(dim=1, eps=1e-7)`` of the normalised features (KgCoOp, TCP).
    """
    cos = torch.nn.functional.cosine_similarity(
        out.text_features.float(), out.frozen_text_features.float(), dim=1, eps=1e-7
    )
    return 1.0 - cos.mean()
