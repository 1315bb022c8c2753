"""How a method's official (Dassl-based) checkpoint maps to its parameters: declared on the method.

Each method class that has an official implementation carries ``official: ClassVar[OfficialLayout]``
(see ``coop.py`` ...).  The layout says which tensors identify the method's checkpoints
(:class:`Signature`), which function maps the official tensors to vlprompt's parameter names and
reads the options from their shapes, and the options no tensor records.  ``run/dassl_import.py``
reads the file, asks every registered layout, and never names a method.

Official tensor names (keys after an optional ``module.``):

* CoOp/CoCoOp/KgCoOp/ProGrad save the PromptLearner's own state dict: ``ctx`` (+ CoCoOp's
  ``meta_net.linear{1,2}``, KgCoOp's unused ``meta_net.linear1`` + ``bias_vectors``) and the frozen
  ``token_prefix`` / ``token_suffix`` embeddings;
* IVLP/VPT/MaPLe/MPL/PromptSRC save the whole CustomCLIP: ``prompt_learner.ctx``,
  ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` (deep text prompts, ``i >= 1``),
  ``image_encoder.VPT`` / ``image_encoder.transformer.resblocks.<i>.VPT_shallow`` (image prompts),
  MaPLe's ``prompt_learner.proj`` / ``compound_prompts_text.<j>`` / ``compound_prompt_projections.<j>``,
  MPL's ``prompt_learner.txt2img_proj.<k>.<j>``, PromptSRC's frozen ``prompt_learner.ZS_image_encoder.*``.

``token_suffix`` (the embeddings after the context) also records how many frozen word tokens sit
between the context and the class name: the leading rows equal for every class
(:func:`frozen_token_count`).  The importer compares that count with the model it builds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlprompt.errors import VlpromptError

PL = "prompt_learner."
_TXT_DEEP = re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
_IMG_DEEP = re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
_TXT2IMG = re.compile(r"^prompt_learner\.txt2img_proj\.(\d+)\.\d+\.(weight|bias)$")


@dataclass
class Mapped:
    """vlprompt's prompt state from an official state dict, the options its shapes give, and why."""

    state: dict[str, torch.Tensor]
    options: dict[str, Any]
    sources: dict[str, str]  # vlprompt name -> official name (for error messages)
    notes: list[str] = field(default_factory=list)
    ctx_tokens: int | None = None  # first-layer text context length (frozen words follow it)
    frozen_tokens: int | None = None  # frozen word tokens between the context and the class name
    frame: tuple[torch.Tensor, torch.Tensor] | None = None  # the official token_prefix, token_suffix


@dataclass(frozen=True)
class Signature:
    """Which checkpoints are this method's: tensor names (and top-level checkpoint keys) present/absent."""

    has: tuple[str, ...] = ()
    has_prefix: tuple[str, ...] = ()
    lacks: tuple[str, ...] = ()
    lacks_prefix: tuple[str, ...] = ()
    #: top-level checkpoint keys it never has ("val_result": the ProGrad/KgCoOp Dassl fork never writes it)
    checkpoint_lacks: tuple[str, ...] = ()
    frozen_words: bool | None = None  # False: never keeps frozen words after its context (CoOp)
    #: a test on the tensors themselves where their names cannot tell two learners apart (shapes)
    tensors: Callable[[Mapping[str, torch.Tensor]], bool] | None = None

    def matches(
        self,
        keys: set[str],
        checkpoint_keys: set[str],
        frozen: int | None = None,
        sd: Mapping[str, torch.Tensor] | None = None,
    ) -> bool:
        if self.frozen_words is False and frozen:
            return False
        if self.tensors is not None and sd is not None and not self.tensors(sd):
            return False
        return (
            all(k in keys for k in self.has)
            and all(any(k.startswith(p) for k in keys) for p in self.has_prefix)
            and not any(k in keys for k in self.lacks)
            and not any(k.startswith(p) for k in keys for p in self.lacks_prefix)
            and not any(k in checkpoint_keys for k in self.checkpoint_lacks)
        )


@dataclass(frozen=True)
class OfficialLayout:
    """A method's official checkpoint: its repository, signature and mapping to our parameters."""

    repo: str
    learner: str  # the Dassl model name the official trainer saves under (its folder name)
    signature: Signature
    convert: Callable[[Mapping[str, torch.Tensor], str], Mapped]
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------ helpers
def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def need(sd: Mapping[str, Any], key: str, method: str, dims: tuple[int, ...] = ()) -> torch.Tensor:
    """``sd[key]``, refused in one line when absent or of another rank than ``dims`` allows."""
    if key not in sd:
        raise VlpromptError(
            f"checkpoint has no '{key}', which a {method} checkpoint must hold; pass --method"
        )
    t = sd[key]
    if not t.is_floating_point():
        raise VlpromptError(
            f"checkpoint tensor '{key}' holds {t.dtype} values, not weights; the file is damaged"
        )
    if dims and t.dim() not in dims:
        raise VlpromptError(
            f"checkpoint tensor '{key}' has shape {tuple(t.shape)}; a {method} checkpoint holds a "
            f"{' or '.join(f'{d}-D' for d in dims)} tensor there (a damaged file or another method's)"
        )
    return t


def _indexed(sd: Mapping[str, Any], pattern: re.Pattern[str]) -> dict[int, torch.Tensor]:
    out = {int(m.group(1)): v for k, v in sd.items() if (m := pattern.match(k))}
    return dict(sorted(out.items()))


def _consecutive(idx: list[int], start: int, what: str) -> None:
    if idx != list(range(start, start + len(idx))):
        raise VlpromptError(
            f"{what} of layers {idx} are not consecutive from layer {start}; the checkpoint is damaged"
        )


def _linear(sd, state, sources, official: str, ours: str, method: str) -> None:
    for part, dims in (("weight", (2,)), ("bias", (1,))):
        state[f"{ours}.{part}"] = _f32(need(sd, f"{official}.{part}", method, dims))
        sources[f"{ours}.{part}"] = f"{official}.{part}"


def frozen_token_count(suffix: torch.Tensor | None) -> int | None:
    """Leading rows of ``token_suffix`` (C, L, d) equal for every class: the frozen words after the
    context (``None`` when it cannot tell: fewer than two classes or no suffix)."""
    if suffix is None or suffix.dim() != 3 or suffix.shape[0] < 2:
        return None
    same = (suffix == suffix[:1]).flatten(2).all(-1).all(0)  # (L,)
    k = 0
    while k < same.numel() and bool(same[k]):
        k += 1
    return None if k == same.numel() else k  # no class-specific row: nothing recorded (e.g. zeros)


def _suffix(sd: Mapping[str, Any], prefix: str) -> int | None:
    t = sd.get(prefix + "token_suffix")
    return frozen_token_count(t) if isinstance(t, torch.Tensor) else None


def _frame(sd: Mapping[str, Any], prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    pre, suf = sd.get(prefix + "token_prefix"), sd.get(prefix + "token_suffix")
    if isinstance(pre, torch.Tensor) and isinstance(suf, torch.Tensor) and pre.dim() == suf.dim() == 3:
        return _f32(pre), _f32(suf)
    return None


def phrase_for(n_ctx: int, frozen: int | None, phrase: str = "a photo of a", words: int = 4) -> str | None:
    """The official MaPLe/IVLP/PromptSRC ``CTX_INIT``: ``phrase`` when n_ctx <= its tokens (the rest
    stays frozen), random ``X`` slots otherwise; chosen from the frozen-token count when recorded."""
    if frozen is None:
        return phrase if n_ctx <= words else ""
    if frozen == words - n_ctx:
        return phrase
    return "" if frozen == 0 else None


_INIT_NOTE = (
    "the frozen words after the context are the official default 'a photo of a' (no tensor records "
    "their text); pass --option ctx_init=... if the checkpoint was trained with another CTX_INIT"
)


# ------------------------------------------------------------------------------------ mappers
def map_coop(sd: Mapping[str, Any], method: str) -> Mapped:
    """CoOp / KgCoOp / ProGrad: the PromptLearner's ``ctx`` (M, d) or class-specific (C, M, d)."""
    ctx = need(sd, "ctx", method, (2, 3))
    opts: dict[str, Any] = {"n_ctx": int(ctx.shape[-2]), "ctx_init": ""}
    if ctx.dim() == 3:
        opts["csc"] = True
    return Mapped({"ctx": _f32(ctx)}, opts, {"ctx": "ctx"}, ctx_tokens=int(ctx.shape[-2]),
                  frozen_tokens=_suffix(sd, ""), frame=_frame(sd, ""))  # fmt: skip


def map_prograd(sd: Mapping[str, Any], method: str) -> Mapped:
    """ProGrad: CoOp's tensors; its words (the data set's template) are the method's default."""
    m = map_coop(sd, method)
    del m.options["ctx_init"]  # 'template': ProGrad's per-data-set phrase, as its recipe (CTX_INIT True)
    m.notes.append(
        "the context phrase is ProGrad's template of the data set (--dataset); its words that do not fit "
        "the context stay frozen -- pass --option ctx_init=PHRASE if the checkpoint was trained otherwise"
    )
    return m


def map_cocoop(sd: Mapping[str, Any], method: str) -> Mapped:
    ctx = need(sd, "ctx", method, (2,))
    state, sources = {"ctx": _f32(ctx)}, {"ctx": "ctx"}
    _linear(sd, state, sources, "meta_net.linear1", "meta_net.0", method)
    _linear(sd, state, sources, "meta_net.linear2", "meta_net.2", method)
    e, hidden = state["meta_net.0.weight"].shape[1], state["meta_net.0.weight"].shape[0]
    if hidden == 0 or e % hidden:
        raise VlpromptError(
            f"meta_net.linear1.weight {tuple(state['meta_net.0.weight'].shape)} is not embed->embed/k"
        )
    opts = {"n_ctx": int(ctx.shape[0]), "meta_ratio": e // hidden, "ctx_init": ""}  # init only
    return Mapped(
        state,
        opts,
        sources,
        ctx_tokens=int(ctx.shape[0]),
        frozen_tokens=_suffix(sd, ""),
        frame=_frame(sd, ""),
    )


def meta_net_tokens(sd: Mapping[str, Any]) -> int | None:
    """Tokens a PromptLearner's ``meta_net.linear2`` writes per input: 1 for CoCoOp's per-image bias,
    TCP's class-aware token count (its output is ``tokens * width``); ``None`` when it cannot tell."""
    ctx, w = sd.get("ctx"), sd.get("meta_net.linear2.weight")
    if not isinstance(ctx, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2 or ctx.dim() < 1:
        return None
    d = int(ctx.shape[-1])
    return int(w.shape[0]) // d if d and w.shape[0] % d == 0 else None


def map_tcp(sd: Mapping[str, Any], method: str) -> Mapped:
    """TCP: CoOp's ``ctx`` and the class-token map ``meta_net.linear{1,2}`` (e -> e/r -> k*d)."""
    ctx = need(sd, "ctx", method, (2,))
    state, sources = {"ctx": _f32(ctx)}, {"ctx": "ctx"}
    _linear(sd, state, sources, "meta_net.linear1", "meta_net.linear1", method)
    _linear(sd, state, sources, "meta_net.linear2", "meta_net.linear2", method)
    e, hidden = state["meta_net.linear1.weight"].shape[1], state["meta_net.linear1.weight"].shape[0]
    tokens = meta_net_tokens(sd)
    if hidden == 0 or e % hidden or not tokens or state["meta_net.linear2.weight"].shape[1] != hidden:
        raise VlpromptError(
            f"meta_net tensors {tuple(state['meta_net.linear1.weight'].shape)}, "
            f"{tuple(state['meta_net.linear2.weight'].shape)} are not TCP's map embed -> embed/r -> k*width"
        )
    opts = {"n_ctx": int(ctx.shape[0]), "ctx_init": "", "reduction": e // hidden, "class_tokens": tokens}
    notes = [
        "the block receiving the class-aware tokens is code, not a tensor: the official block 9 of 12 is "
        "used -- pass --option class_depth=N if the checkpoint was trained otherwise"
    ]
    return Mapped(state, opts, sources, notes, ctx_tokens=int(ctx.shape[0]), frozen_tokens=_suffix(sd, ""),
                  frame=_frame(sd, ""))  # fmt: skip


def _image_prompts(sd, state, sources) -> tuple[int, int]:
    """IVLP/VPT image prompts (layer 0 + deep) stacked into ``image_prompts`` (depth, n, d)."""
    if "image_encoder.VPT" not in sd:
        return 0, 0
    deep = _indexed(sd, _IMG_DEEP)
    _consecutive(list(deep), 1, "deep image prompts")
    layers = [need(sd, "image_encoder.VPT", "vpt", (2,)), *deep.values()]
    shapes = {tuple(t.shape) for t in layers}
    if len(shapes) != 1:
        raise VlpromptError(
            f"image prompts have different shapes per layer {sorted(shapes)}; vlprompt needs one "
            "token count per layer (the official IVLP/VPT code uses one)"
        )
    state["image_prompts"] = torch.stack([_f32(t) for t in layers])
    sources["image_prompts"] = "image_encoder.VPT + image_encoder.transformer.resblocks.<i>.VPT_shallow"
    return len(layers), int(layers[0].shape[0])


def _text_ctx_init(opts: dict[str, Any], notes: list[str], n_ctx: int, frozen: int | None) -> None:
    init = phrase_for(n_ctx, frozen)
    if init is not None:
        opts["ctx_init"] = init
        if frozen is None:
            notes.append(_INIT_NOTE)


def map_ivlp(sd: Mapping[str, Any], method: str) -> Mapped:
    """IVLP / PromptSRC (the same learner; PromptSRC's extra terms are losses, not tensors)."""
    ctx = need(sd, PL + "ctx", method, (2,))
    state, sources = {"ctx": _f32(ctx)}, {"ctx": PL + "ctx"}
    text = _indexed(sd, _TXT_DEEP)
    _consecutive(list(text), 1, "deep text prompts")
    for j, (i, t) in enumerate(text.items()):
        state[f"text_deep.{j}"] = _f32(t)
        sources[f"text_deep.{j}"] = f"text_encoder.transformer.resblocks.{i}.VPT_shallow"
    n_ctx, frozen, notes = int(ctx.shape[0]), _suffix(sd, PL), []
    opts: dict[str, Any] = {"n_ctx_text": n_ctx, "depth_text": 1 + len(text)}
    _text_ctx_init(opts, notes, n_ctx, frozen)
    depth, n = _image_prompts(sd, state, sources)
    opts["depth_image"] = depth
    if depth:
        opts["n_ctx_image"] = n
    return Mapped(state, opts, sources, notes, ctx_tokens=n_ctx, frozen_tokens=frozen, frame=_frame(sd, PL))


def map_vpt(sd: Mapping[str, Any], method: str) -> Mapped:
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    depth, n = _image_prompts(sd, state, sources)
    if not depth:
        raise VlpromptError(
            "checkpoint has no 'image_encoder.VPT', which a vpt checkpoint must hold; pass --method"
        )
    return Mapped(state, {"n_ctx": n, "depth": depth, "init": "normal"}, sources)


def map_maple(sd: Mapping[str, Any], method: str) -> Mapped:
    ctx = need(sd, PL + "ctx", method, (2,))
    state, sources = {"ctx": _f32(ctx)}, {"ctx": PL + "ctx"}
    _linear(sd, state, sources, PL + "proj", "proj", method)
    deep = _indexed(sd, re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$"))
    _consecutive(list(deep), 0, "compound text prompts")
    for j, t in deep.items():
        state[f"compound_prompts_text.{j}"] = _f32(t)
        sources[f"compound_prompts_text.{j}"] = f"{PL}compound_prompts_text.{j}"
        _linear(
            sd,
            state,
            sources,
            f"{PL}compound_prompt_projections.{j}",
            f"compound_prompt_projections.{j}",
            method,
        )
    n_ctx, frozen, notes = int(ctx.shape[0]), _suffix(sd, PL), []
    opts: dict[str, Any] = {"n_ctx": n_ctx, "depth": 1 + len(deep)}
    _text_ctx_init(opts, notes, n_ctx, frozen)
    return Mapped(state, opts, sources, notes, ctx_tokens=n_ctx, frozen_tokens=frozen, frame=_frame(sd, PL))


def map_mpl(sd: Mapping[str, Any], method: str) -> Mapped:
    ctx = need(sd, PL + "ctx", method, (2,))
    state, sources = {"ctx": _f32(ctx)}, {"ctx": PL + "ctx"}
    _linear(sd, state, sources, PL + "proj", "proj0", method)
    deep = _indexed(sd, re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$"))
    _consecutive(list(deep), 0, "compound text prompts")
    for j, t in deep.items():
        state[f"text_deep.{j}"] = _f32(t)
        sources[f"text_deep.{j}"] = f"{PL}compound_prompts_text.{j}"
    adds = sorted({int(m.group(1)) for k in sd if (m := _TXT2IMG.match(k))})
    if any(k.startswith(PL + "txt2img_proj.") and not _TXT2IMG.match(k) for k in sd):
        raise VlpromptError(
            "txt2img_proj tensors are not named txt2img_proj.<k>.<j>.*; the checkpoint is damaged"
        )
    _consecutive(adds, 0, "txt2img projections")
    n_layers = len(deep)
    for k in adds:  # ours: proj[k * (depth-1) + (l-1)] is F_{k,l}; theirs: txt2img_proj[k][l-1]
        for j in range(n_layers):
            _linear(sd, state, sources, f"{PL}txt2img_proj.{k}.{j}", f"proj.{k * n_layers + j}", method)
    opts = {"n_ctx": int(ctx.shape[0]), "depth": 1 + n_layers, "add": len(adds), "ctx_init": "X"}
    notes = [
        "MPL's remove count is a config value no tensor records; the official recipe's 1 is used -- "
        "pass --option remove=N if the checkpoint was trained with another"
    ]
    return Mapped(
        state,
        opts,
        sources,
        notes,
        ctx_tokens=int(ctx.shape[0]),
        frozen_tokens=_suffix(sd, PL),
        frame=_frame(sd, PL),
    )


_MMA = re.compile(r"^(text|visual|shared)_adapter\.(\d+)\.(.+)$")
_MMA_PARTS = {
    "text": ("down.0.weight", "down.0.bias", "up.weight", "up.bias"),
    "visual": ("down.0.weight", "down.0.bias", "up.weight", "up.bias"),
    "shared": ("0.weight", "0.bias"),
}


def map_mma(sd: Mapping[str, Any], method: str) -> Mapped:
    """MMA's ``adapter_learner``: ``{text,visual,shared}_adapter.<k>.*`` for the adapted blocks ``k``
    (1-based; vlprompt keeps the official names).  Blocks and width come from the keys and shapes."""
    blocks = sorted({int(m.group(2)) for k in sd if (m := _MMA.match(k))})
    if not blocks:
        raise VlpromptError(
            f"checkpoint has no 'shared_adapter.<k>.*', which a {method} checkpoint must hold"
        )
    if blocks[0] == 0:
        raise VlpromptError(
            "checkpoint has an adapter on the input embeddings (ADAPTER_START=0), which vlprompt's MMA "
            "does not build; only checkpoints with ADAPTER_START >= 1 import"
        )
    _consecutive(blocks, blocks[0], "MMA adapters")
    state, sources = {}, {}
    for k in blocks:
        for tower, parts in _MMA_PARTS.items():
            for part in parts:
                key = f"{tower}_adapter.{k}.{part}"
                state[key] = _f32(need(sd, key, method, (2,) if part.endswith("weight") else (1,)))
                sources[key] = key
    r = int(state[f"shared_adapter.{blocks[0]}.0.weight"].shape[0])
    opts = {"adapter_start": blocks[0], "adapter_end": blocks[-1], "adapter_dim": r}
    return Mapped(state, opts, sources)


def map_coprompt(sd: Mapping[str, Any], method: str) -> Mapped:
    """CoPrompt: MaPLe's learner + ``adapter_image`` / ``adapter_text`` (``fc.0``, ``fc.2``: Linear
    e->e/r and e/r->e without bias)."""
    m = map_maple(sd, method)
    hidden = None
    for side in ("image", "text"):
        for j in (0, 2):
            key = f"adapter_{side}.fc.{j}.weight"
            m.state[f"adapter_{side}.{j}.weight"] = _f32(need(sd, key, method, (2,)))
            m.sources[f"adapter_{side}.{j}.weight"] = key
        w = m.state[f"adapter_{side}.0.weight"]
        if w.shape[0] == 0 or w.shape[1] % w.shape[0]:
            raise VlpromptError(f"adapter_{side}.fc.0.weight {tuple(w.shape)} is not embed -> embed/k")
        hidden = w.shape
    assert hidden is not None
    m.options["adapter_reduction"] = int(hidden[1] // hidden[0])
    return m


_KD = "VPT_image_trans.conv1."  # PromptKD's projector: Conv1x1 (0), BatchNorm2d (1), ReLU (2), Conv1x1 (3)


def map_promptkd(sd: Mapping[str, Any], method: str) -> Mapped:
    """PromptKD's student: IVLP image prompts + the projector (1x1 convolutions become Linear weights,
    BatchNorm2d's parameters and running statistics BatchNorm1d's).  The teacher is not in the file."""
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    depth, n = _image_prompts(sd, state, sources)
    if not depth:
        raise VlpromptError(f"checkpoint has no 'image_encoder.VPT', which a {method} checkpoint must hold")
    for conv, ours in (("0", "projector.0"), ("3", "projector.3")):
        w = need(sd, f"{_KD}{conv}.weight", method, (4, 2))
        state[f"{ours}.weight"] = _f32(w.reshape(w.shape[0], w.shape[1]))
        state[f"{ours}.bias"] = _f32(need(sd, f"{_KD}{conv}.bias", method, (1,)))
        sources.update({f"{ours}.weight": f"{_KD}{conv}.weight", f"{ours}.bias": f"{_KD}{conv}.bias"})
    for part in ("weight", "bias", "running_mean", "running_var"):
        state[f"projector.1.{part}"] = _f32(need(sd, f"{_KD}1.{part}", method, (1,)))
        sources[f"projector.1.{part}"] = f"{_KD}1.{part}"
    tracked = sd.get(f"{_KD}1.num_batches_tracked")
    state["projector.1.num_batches_tracked"] = (
        torch.as_tensor(tracked, dtype=torch.long).reshape(()) if tracked is not None else torch.tensor(0)
    )
    sources["projector.1.num_batches_tracked"] = f"{_KD}1.num_batches_tracked"
    width = int(state["projector.0.weight"].shape[0])
    opts = {"n_ctx_image": n, "depth_image": depth, "teacher_width": width}
    return Mapped(state, opts, sources)
