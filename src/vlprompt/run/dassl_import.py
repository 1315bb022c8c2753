"""Import prompt checkpoints of the official (Dassl-based) code: CoOp, CoCoOp, IVLP, VPT, MaPLe, MPL.

The official trainers save ``output/<name>/model.pth.tar-N`` (and ``model-best.pth.tar``) with
``torch.save({"state_dict", "epoch", "optimizer", "scheduler", "val_result"})``; ``<name>`` is
``prompt_learner`` (CoOp, CoCoOp, VPT), ``VLPromptLearner`` (IVLP, PromptSRC) or
``MultiModalPromptLearner`` (MaPLe, MPL).  CoOp/CoCoOp store the prompt learner's own state dict;
the others store the whole ``CustomCLIP`` (frozen CLIP included), where the prompts are:

* ``prompt_learner.ctx`` -- the first-layer text context (every method but VPT);
* ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` -- IVLP's deep text prompts (``i >= 1``);
* ``image_encoder.VPT`` / ``image_encoder.transformer.resblocks.<i>.VPT_shallow`` -- IVLP's / VPT's
  image prompts of layer 0 / layer ``i``;
* ``prompt_learner.proj``, ``prompt_learner.compound_prompts_text.<j>``,
  ``prompt_learner.compound_prompt_projections.<j>`` -- MaPLe's coupling function, deep text prompts
  and their projections (layer ``j + 1``);
* ``prompt_learner.txt2img_proj.<k>.<j>`` -- MPL's ``k``-th added projection of layer ``j + 1``.

Each tensor is mapped by that role to vlprompt's parameter name; the method's options (context
length, depth ...) are read from the shapes.  What no shape records -- the frozen words after the
context (``ctx_init``), the class names -- comes from the official defaults or the caller.  The file
is read with ``torch.load(weights_only=True)``: classes the checkpoint names (Dassl's schedulers) are
replaced by inert placeholders, nothing of the file is executed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method
from vlprompt.run.layout import RunDir
from vlprompt.run.train import FORMAT, FORMAT_VERSION, provenance, save_prompt
from vlprompt.version import __version__

log = logging.getLogger(__name__)

OFFICIAL_METHODS = ("coop", "cocoop", "ivlp", "vpt", "maple", "mpl", "kgcoop", "prograd", "promptsrc")
_PL = "prompt_learner."
_TXT_DEEP = re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
_IMG_DEEP = re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


@dataclass
class Imported:
    """The result of mapping an official checkpoint: vlprompt's prompt state and how it was found."""

    method: str
    state: dict[str, torch.Tensor]
    options: dict[str, Any]
    sources: dict[str, str]  # vlprompt name -> official name (for error messages)
    epoch: int | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ reading
class _Placeholder:
    """Stands in for a class the checkpoint names (e.g. a Dassl scheduler); holds its state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict (``state_dict``, ``epoch`` ...) of an official ``model.pth.tar-N`` file."""
    p = Path(path)
    if p.is_dir():
        p = _find_in_dir(p)
    if not p.is_file():
        raise VlpromptError(f"checkpoint not found: {p}; pass a model.pth.tar-N / model-best.pth.tar file")
    extra: list[tuple[type, str]] = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(extra):
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
            break
        except Exception as e:  # noqa: BLE001 -- any unpickling refusal or a corrupt file
            m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
            if m is None:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise VlpromptError(
                    f"cannot read {p} as a checkpoint ({type(e).__name__}: {first[:100]}); "
                    "pass the model.pth.tar-N file the official trainer wrote"
                ) from None
            name = m.group(1)
            extra.append((type(name.rsplit(".", 1)[-1], (_Placeholder,), {}), name))
    else:  # pragma: no cover - a checkpoint naming more than 64 classes
        raise VlpromptError(f"{p} names too many classes to read safely; re-save only its state_dict")
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return dict(obj)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj), "epoch": None}  # a bare state dict
    raise VlpromptError(
        f"{p} holds no Dassl checkpoint (no 'state_dict' entry); pass prompt_learner/model.pth.tar-N"
    )


def _find_in_dir(d: Path) -> Path:
    """``model-best.pth.tar`` or the newest ``model.pth.tar-N`` in ``d`` or its one learner folder."""
    for folder in [d] + sorted(x for x in d.iterdir() if x.is_dir()):
        best = folder / "model-best.pth.tar"
        if best.is_file():
            return best
        numbered = sorted(folder.glob("model.pth.tar-*"), key=lambda x: int(x.name.rsplit("-", 1)[-1] or 0))
        if numbered:
            return numbered[-1]
    raise VlpromptError(f"no model.pth.tar-N or model-best.pth.tar in {d}; pass the checkpoint file")


# ------------------------------------------------------------------------------------ mapping
def detect_method(sd: Mapping[str, Any]) -> str:
    """The official method a state dict comes from, by its parameter names."""
    keys = set(sd)
    if any(k.startswith(_PL + "txt2img_proj.") for k in keys):
        return "mpl"
    if any(k.startswith(_PL + "compound_prompt_projections.") for k in keys) or _PL + "proj.weight" in keys:
        return "maple"
    if _PL + "ctx" in keys and any(_TXT_DEEP.match(k) or k == "image_encoder.VPT" for k in keys):
        return "ivlp"
    if "image_encoder.VPT" in keys:
        return "vpt"
    if _PL + "ctx" in keys:  # IVLP with text prompts only (vision depth 0, text depth 1)
        return "ivlp"
    if "ctx" in keys and any(k.startswith("meta_net.") for k in keys):
        return "cocoop"
    if "ctx" in keys:
        return "coop"
    raise VlpromptError(
        "cannot tell which method this checkpoint is from (no ctx, VPT, proj or txt2img_proj tensors); "
        "pass --method (one of " + ", ".join(OFFICIAL_METHODS) + ")"
    )


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _need(sd: Mapping[str, Any], key: str, method: str) -> torch.Tensor:
    if key not in sd:
        raise VlpromptError(
            f"checkpoint has no '{key}', which a {method} checkpoint must hold; pass --method"
        )
    return sd[key]


def _indexed(sd: Mapping[str, Any], pattern: re.Pattern[str]) -> dict[int, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = pattern.match(k)
        if m:
            out[int(m.group(1))] = v
    return dict(sorted(out.items()))


def _consecutive(idx: list[int], start: int, what: str) -> None:
    if idx != list(range(start, start + len(idx))):
        raise VlpromptError(
            f"{what} of layers {idx} are not consecutive from layer {start}; the checkpoint is damaged"
        )


def _linear(sd, state, sources, official: str, ours: str, method: str) -> None:
    for part in ("weight", "bias"):
        state[f"{ours}.{part}"] = _f32(_need(sd, f"{official}.{part}", method))
        sources[f"{ours}.{part}"] = f"{official}.{part}"


def _map_coop(sd: Mapping[str, Any], method: str) -> Imported:
    ctx = _need(sd, "ctx", method)
    opts: dict[str, Any] = {"n_ctx": int(ctx.shape[-2]), "ctx_init": ""}
    if ctx.dim() == 3:
        opts["csc"] = True
    return Imported(method, {"ctx": _f32(ctx)}, opts, {"ctx": "ctx"})


def _map_cocoop(sd: Mapping[str, Any], method: str) -> Imported:
    ctx = _need(sd, "ctx", method)
    state, sources = {"ctx": _f32(ctx)}, {"ctx": "ctx"}
    _linear(sd, state, sources, "meta_net.linear1", "meta_net.0", method)
    _linear(sd, state, sources, "meta_net.linear2", "meta_net.2", method)
    e, hidden = state["meta_net.0.weight"].shape[1], state["meta_net.0.weight"].shape[0]
    if e % hidden:
        raise VlpromptError(
            f"meta_net.linear1.weight {tuple(state['meta_net.0.weight'].shape)} is not embed->embed/k"
        )
    opts = {"n_ctx": int(ctx.shape[0]), "meta_ratio": e // hidden, "ctx_init": ""}  # init only
    return Imported(method, state, opts, sources)


def _map_ivlp(sd: Mapping[str, Any], method: str) -> Imported:
    ctx = _need(sd, _PL + "ctx", method)
    state, sources = {"ctx": _f32(ctx)}, {"ctx": _PL + "ctx"}
    text = _indexed(sd, _TXT_DEEP)
    _consecutive(list(text), 1, "deep text prompts")
    for j, (i, t) in enumerate(text.items()):
        state[f"text_deep.{j}"] = _f32(t)
        sources[f"text_deep.{j}"] = f"text_encoder.transformer.resblocks.{i}.VPT_shallow"
    n_ctx = int(ctx.shape[0])
    opts: dict[str, Any] = {
        "n_ctx_text": n_ctx,
        "depth_text": 1 + len(text),
        "ctx_init": _official_init(n_ctx),
    }
    img = _image_prompts(sd, state, sources)
    opts["depth_image"] = img[0]
    if img[0]:
        opts["n_ctx_image"] = img[1]
    return Imported(method, state, opts, sources, notes=[_INIT_NOTE])


_INIT_NOTE = (
    "the frozen words after the context are the official default 'a photo of a' (no tensor records "
    "them); pass --option ctx_init=... if the checkpoint was trained with another CTX_INIT"
)


def _official_init(n_ctx: int) -> str:
    """The official MaPLe/IVLP learners use CTX_INIT 'a photo of a' when n_ctx <= 4, 'X X ..' otherwise."""
    return "a photo of a" if n_ctx <= 4 else ""


def _image_prompts(sd, state, sources) -> tuple[int, int]:
    """IVLP/VPT image prompts (layer 0 + deep) stacked into ``image_prompts`` (depth, n, d)."""
    if "image_encoder.VPT" not in sd:
        return 0, 0
    deep = _indexed(sd, _IMG_DEEP)
    _consecutive(list(deep), 1, "deep image prompts")
    layers = [sd["image_encoder.VPT"], *deep.values()]
    shapes = {tuple(t.shape) for t in layers}
    if len(shapes) != 1:
        raise VlpromptError(
            f"image prompts have different shapes per layer {sorted(shapes)}; vlprompt needs one "
            "token count per layer (the official IVLP/VPT code uses one)"
        )
    state["image_prompts"] = torch.stack([_f32(t) for t in layers])
    sources["image_prompts"] = "image_encoder.VPT + image_encoder.transformer.resblocks.<i>.VPT_shallow"
    return len(layers), int(layers[0].shape[0])


def _map_vpt(sd: Mapping[str, Any], method: str) -> Imported:
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    depth, n = _image_prompts(sd, state, sources)
    if not depth:
        raise VlpromptError(
            "checkpoint has no 'image_encoder.VPT', which a vpt checkpoint must hold; pass --method"
        )
    return Imported(method, state, {"n_ctx": n, "depth": depth, "init": "normal"}, sources)


def _map_maple(sd: Mapping[str, Any], method: str) -> Imported:
    ctx = _need(sd, _PL + "ctx", method)
    state, sources = {"ctx": _f32(ctx)}, {"ctx": _PL + "ctx"}
    _linear(sd, state, sources, _PL + "proj", "proj", method)
    deep = _indexed(sd, re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$"))
    _consecutive(list(deep), 0, "compound text prompts")
    for j, t in deep.items():
        state[f"compound_prompts_text.{j}"] = _f32(t)
        sources[f"compound_prompts_text.{j}"] = f"{_PL}compound_prompts_text.{j}"
        _linear(
            sd,
            state,
            sources,
            f"{_PL}compound_prompt_projections.{j}",
            f"compound_prompt_projections.{j}",
            method,
        )
    n_ctx = int(ctx.shape[0])
    opts = {"n_ctx": n_ctx, "depth": 1 + len(deep), "ctx_init": _official_init(n_ctx)}
    return Imported(method, state, opts, sources, notes=[_INIT_NOTE])


def _map_mpl(sd: Mapping[str, Any], method: str) -> Imported:
    ctx = _need(sd, _PL + "ctx", method)
    state, sources = {"ctx": _f32(ctx)}, {"ctx": _PL + "ctx"}
    _linear(sd, state, sources, _PL + "proj", "proj0", method)
    deep = _indexed(sd, re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$"))
    _consecutive(list(deep), 0, "compound text prompts")
    for j, t in deep.items():
        state[f"text_deep.{j}"] = _f32(t)
        sources[f"text_deep.{j}"] = f"{_PL}compound_prompts_text.{j}"
    adds = sorted({int(k.split(".")[2]) for k in sd if k.startswith(_PL + "txt2img_proj.")})
    _consecutive(adds, 0, "txt2img projections")
    n_layers = len(deep)
    for k in adds:  # ours: proj[k * (depth-1) + (l-1)] is F_{k,l}; theirs: txt2img_proj[k][l-1]
        for j in range(n_layers):
            _linear(sd, state, sources, f"{_PL}txt2img_proj.{k}.{j}", f"proj.{k * n_layers + j}", method)
    opts = {"n_ctx": int(ctx.shape[0]), "depth": 1 + n_layers, "add": len(adds), "ctx_init": "X"}
    notes = ["MPL's remove count is a config value no tensor records; pass it with --option remove=N"]
    return Imported(method, state, opts, sources, notes=notes)


MAPPERS: dict[str, Callable[[Mapping[str, Any], str], Imported]] = {
    "coop": _map_coop,
    "kgcoop": _map_coop,  # the official KgCoOp / ProGrad prompt learners are CoOp's (ctx only)
    "prograd": _map_coop,
    "cocoop": _map_cocoop,
    "ivlp": _map_ivlp,
    "promptsrc": _map_ivlp,  # PromptSRC's learner is IVLP's (its extra terms are losses, not tensors)
    "vpt": _map_vpt,
    "maple": _map_maple,
    "mpl": _map_mpl,
}


def convert_state_dict(sd: Mapping[str, Any], method: str | None = None) -> Imported:
    """Map an official state dict to vlprompt's prompt state for ``method`` (detected when ``None``)."""
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    method = (method or detect_method(sd)).lower()
    if method not in MAPPERS:
        raise VlpromptError(f"no importer for method '{method}'; use one of {', '.join(MAPPERS)}")
    return MAPPERS[method](sd, method)


def import_checkpoint(path: str | os.PathLike, method: str | None = None) -> Imported:
    """Read an official checkpoint file and map it (see :func:`convert_state_dict`)."""
    ck = read_checkpoint(path)
    imp = convert_state_dict(ck["state_dict"], method)
    epoch = ck.get("epoch")
    imp.epoch = int(epoch) if isinstance(epoch, int) else None
    return imp


# ------------------------------------------------------------------------------------ building
def build_model(
    imp: Imported, backbone: Any, classnames: list[str], template: str | None = None, **options: Any
):
    """A PromptModel of ``imp.method`` on ``backbone`` holding the imported prompts.

    Shapes are checked tensor by tensor first, so a checkpoint for another backbone (or with options
    that differ from ours) is refused naming the official tensor and both shapes.
    """

    get_method(imp.method)  # a one-line error when the method is not built (yet)
    opts = {**imp.options, **options}
    model = create_model(imp.method, backbone, classnames, template=template, **opts)
    want = model.prompt_state_dict()
    dims = f"text width {backbone.text.width}, image width {backbone.image.width}"
    for name, t in imp.state.items():
        src = imp.sources.get(name, name)
        if name not in want:
            raise VlpromptError(
                f"checkpoint tensor '{src}' has no place in {imp.method} with options {opts} "
                f"(vlprompt name '{name}'); pass the options it was trained with (--option KEY=VALUE)"
            )
        if tuple(want[name].shape) != tuple(t.shape):
            raise VlpromptError(
                f"checkpoint tensor '{src}' has shape {tuple(t.shape)} but {imp.method} on this backbone "
                f"({dims}) needs {tuple(want[name].shape)} for '{name}'; pass the backbone it was trained on "
                "(--model / --weights) or the matching --option"
            )
    missing = [k for k in want if k not in imp.state]
    if missing:
        raise VlpromptError(
            f"{imp.method} with options {opts} also needs {missing[:3]}, which the checkpoint lacks; "
            "pass the options it was trained with (--option KEY=VALUE) or --method"
        )
    model.load_prompt_state_dict({k: v.to(backbone.device) for k, v in imp.state.items()})
    return model


def write_prompt_dir(out: str | os.PathLike, model: Any, manifest: dict[str, Any]) -> Path:
    """Write ``prompt.safetensors`` + ``manifest.json`` as a trained run does (what ``load_run`` reads).

    A thin wrapper so the writer can move with the run layer without touching the importer.
    """

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vlprompt_version": __version__,
        **provenance(str(manifest.get("method", "zeroshot"))),
        **manifest,
    }
    save_prompt(RunDir(path), model.prompt_state_dict(), full)
    return path
