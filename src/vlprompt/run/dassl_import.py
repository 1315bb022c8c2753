"""Import prompt checkpoints of the official (Dassl-based) code of the methods that declare one.

The official trainers save ``output/<learner>/model.pth.tar-N`` (and ``model-best.pth.tar``) with
``torch.save({"state_dict", "epoch", "optimizer", "scheduler"[, "val_result"]})`` -- the optimizer
state and, with the recipes' warm-up, Dassl's nested warm-up scheduler objects.  The file is read by
:mod:`vlprompt.torchfile`: only tensors are resolved; everything else the file names (schedulers,
optimizers, builtins, numpy scalars) becomes an inert stub; nothing of the file is constructed or run.

Which method a state dict comes from, and how its tensors map to vlprompt's parameters, is declared
by each method (``official: ClassVar[OfficialLayout]``, see :mod:`vlprompt.methods.official`); this
module names no method.  The options no shape records come from the method's official defaults or
the caller; the frozen words between the context and the class name, which the checkpoint's
``token_suffix`` records as a count, are compared with the model that is built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlprompt import torchfile
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model, get_method, list_methods
from vlprompt.methods.official import frozen_token_count
from vlprompt.run.layout import RunDir
from vlprompt.run.train import FORMAT, FORMAT_VERSION, provenance, save_prompt
from vlprompt.version import __version__

log = logging.getLogger(__name__)


@dataclass
class Imported:
    """The result of mapping an official checkpoint: vlprompt's prompt state and how it was found."""

    method: str
    state: dict[str, torch.Tensor]
    options: dict[str, Any]
    sources: dict[str, str]  # vlprompt name -> official name (for error messages)
    epoch: int | None = None
    notes: list[str] = field(default_factory=list)
    ctx_tokens: int | None = None  # the first-layer text context's length
    frozen_tokens: int | None = None  # frozen word tokens the checkpoint keeps between context and class
    frame: tuple[torch.Tensor, torch.Tensor] | None = None  # official token_prefix / token_suffix embeddings


# ------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict (``state_dict``, ``epoch`` ...) of an official ``model.pth.tar-N`` file.

    Read with :mod:`vlprompt.torchfile`: tensors only; the scheduler, optimizer and anything else the
    file names become inert stubs (nothing of the file is constructed or run).
    """
    p = Path(path)
    if p.is_dir():
        p = _find_in_dir(p)
    if not p.is_file():
        raise VlpromptError(f"checkpoint not found: {p}; pass a model.pth.tar-N / model-best.pth.tar file")
    try:
        tf = torchfile.read(p)
    except torchfile.TorchFileError as e:
        raise VlpromptError(
            f"cannot read {p} as a checkpoint ({e.reason[:160]}); "
            "pass the model.pth.tar-N file the official trainer wrote"
        ) from None
    obj = tf.obj
    if tf.torchscript:
        raise VlpromptError(f"{p} is a TorchScript archive, not a prompt checkpoint; pass model.pth.tar-N")
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
        numbered = sorted(
            (x for x in folder.glob("model.pth.tar-*") if x.name.rsplit("-", 1)[-1].isdigit()),
            key=lambda x: int(x.name.rsplit("-", 1)[-1]),
        )
        if numbered:
            return numbered[-1]
    raise VlpromptError(f"no model.pth.tar-N or model-best.pth.tar in {d}; pass the checkpoint file")


# ------------------------------------------------------------------------------------ mapping
def official_layouts() -> dict[str, Any]:
    """Every registered method's :class:`~vlprompt.methods.official.OfficialLayout`, by method name."""
    return {m: get_method(m).official for m in list_methods() if get_method(m).official is not None}


def _clean(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}


def detect_method(sd: Mapping[str, Any], checkpoint_keys: set[str] | frozenset[str] = frozenset()) -> str:
    """The official method a state dict comes from, by its tensor names (and the checkpoint's keys).

    Methods whose checkpoints hold the same tensors are told apart by what the file records (the
    signature's top-level checkpoint keys; frozen words after the context, see
    :class:`~vlprompt.methods.official.Signature`); otherwise refused in one line listing the candidates.
    """
    layouts = official_layouts()
    sd = _clean(sd)
    suffix = next((v for k, v in sd.items() if k.endswith("token_suffix")), None)
    frozen = frozen_token_count(suffix)  # frozen words after the context (some learners never keep any)
    found = [
        m for m, lay in layouts.items() if lay.signature.matches(set(sd), set(checkpoint_keys), frozen, sd)
    ]
    # the most specific signature wins: a layout whose required tensors are a strict subset of another
    # matching layout's (a plug-in's file holds its base's tensors and its own, e.g. maple < maple+dept)
    has = {m: set(layouts[m].signature.has) for m in found}
    found = [m for m in found if not any(has[m] < has[o] for o in found)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise VlpromptError(
            "cannot tell which method this checkpoint is from (its tensors fit no official layout); "
            "pass --method (one of " + ", ".join(layouts) + ")"
        )
    raise VlpromptError(
        f"this checkpoint's tensors fit {' and '.join(found)} alike (the same learner; the file records "
        f"nothing that tells them apart); pass --method {' or --method '.join(found)}"
    )


def convert_state_dict(
    sd: Mapping[str, Any], method: str | None = None, checkpoint_keys: set[str] | frozenset[str] = frozenset()
) -> Imported:
    """Map an official state dict to vlprompt's prompt state for ``method`` (detected when ``None``)."""
    sd = _clean(sd)
    layouts = official_layouts()
    method = (method or detect_method(sd, checkpoint_keys)).lower()
    if method not in layouts:
        raise VlpromptError(f"no importer for method '{method}'; use one of {', '.join(layouts)}")
    try:
        m = layouts[method].convert(sd, method)
    except (ValueError, IndexError, TypeError, RuntimeError, ZeroDivisionError) as e:  # a damaged file
        raise VlpromptError(
            f"the checkpoint's tensors do not fit {method}'s official layout ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:100] if str(e) else '-'}); pass --method or the file the trainer wrote"
        ) from None
    imp = Imported(method, m.state, m.options, m.sources, notes=list(m.notes))
    imp.ctx_tokens, imp.frozen_tokens, imp.frame = m.ctx_tokens, m.frozen_tokens, m.frame
    return imp


def import_checkpoint(path: str | os.PathLike, method: str | None = None) -> Imported:
    """Read an official checkpoint file and map it (see :func:`convert_state_dict`)."""
    ck = read_checkpoint(path)
    imp = convert_state_dict(ck["state_dict"], method, set(ck))
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

    cls = get_method(imp.method)  # a one-line error when the method is not built (yet)
    check_options(cls.Config, options, imp.method)
    recorded = int(imp.frame[0].shape[0]) if imp.frame is not None and imp.frame[0].dim() >= 2 else None
    if recorded is not None and recorded != len(classnames):  # token_prefix: one row per training class
        log.warning(
            "the checkpoint was trained on %d classes (its token_prefix has %d rows), %d class names were "
            "given: a class-specific context needs its own classes; shared context transfers to any",
            recorded, recorded, len(classnames),
        )  # fmt: skip
    opts = {**imp.options, **options}
    try:
        model = create_model(imp.method, backbone, classnames, template=template, **opts)
    except (TypeError, ValueError) as e:  # an option value the method cannot use
        raise VlpromptError(
            f"{imp.method} cannot be built with options {opts} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else '-'}); pass the options it was trained with"
        ) from None
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
    embeds = _text_embeds(model)
    n = imp.ctx_tokens
    ours = None if embeds is None or n is None else frozen_token_count(embeds[:, 1 + n :])
    if imp.frozen_tokens is not None and ours is not None and ours != imp.frozen_tokens:
        raise VlpromptError(
            f"the checkpoint keeps {imp.frozen_tokens} frozen word token(s) between context and class "
            f"name, {imp.method} with options {opts} keeps {ours}; pass the phrase it was trained with "
            "(--option ctx_init=PHRASE) or the --dataset whose template it used"
        )
    if embeds is not None and n is not None and imp.frame is not None and imp.frozen_tokens:
        _check_frozen_words(embeds, imp, opts)
    model.load_prompt_state_dict({k: v.to(backbone.device) for k, v in imp.state.items()})
    return model


def _text_embeds(model: Any) -> torch.Tensor | None:
    """Our class prompts' input embeddings (C, L, d); ``None`` for an image-conditioned text side."""
    try:
        with torch.no_grad():
            embeds = model.method.text_inputs().embeds
    except Exception:  # noqa: BLE001 -- e.g. CoCoOp's text needs image features: nothing to compare
        return None
    return embeds.detach().float().cpu() if embeds.dim() == 3 else None


def _check_frozen_words(embeds: torch.Tensor, imp: Imported, opts: Mapping[str, Any]) -> None:
    """With the CLIP the checkpoint was trained on (its start-of-text embedding matches ours), the
    frozen words themselves must match, not only their count (the official file may be fp16)."""
    prefix, suffix = imp.frame  # type: ignore[misc]
    n, k = int(imp.ctx_tokens or 0), int(imp.frozen_tokens or 0)
    sos = prefix[0, 0]
    if sos.shape != embeds[0, 0].shape or not torch.allclose(embeds[0, 0], sos, rtol=2e-3, atol=1e-5):
        return  # another CLIP (e.g. random shapes-only weights): the words cannot be compared
    if not torch.allclose(embeds[0, 1 + n : 1 + n + k], suffix[0, :k], rtol=2e-3, atol=1e-5):
        raise VlpromptError(
            f"the {k} frozen word token(s) after the checkpoint's context differ from those of {imp.method} "
            f"with options {dict(opts)} (same CLIP, other words); pass the phrase it was trained with "
            "(--option ctx_init=PHRASE) or the --dataset whose template it used"
        )


def check_options(config: type, options: Mapping[str, Any], method: str) -> None:
    """``--option`` keys and value types against the method's Config, each refused in one line."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for key, value in options.items():
        if key not in fields:
            raise VlpromptError(
                f"--option {key}: {method} has no option '{key}'; its options are {', '.join(fields)}"
            )
        kinds = {t.strip() for t in str(fields[key].type).split("|")}
        ok = (
            ("bool" in kinds and isinstance(value, bool))
            or ("int" in kinds and isinstance(value, int) and not isinstance(value, bool))
            or ("float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool))
            or ("str" in kinds and isinstance(value, str))
            or not kinds & {"bool", "int", "float", "str"}
        )
        if not ok:
            raise VlpromptError(
                f"--option {key}={value!r}: {method}'s {key} takes {' or '.join(sorted(kinds))}; "
                f"e.g. --option {key}={fields[key].default!r}"
            )


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
