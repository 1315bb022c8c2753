"""Read a saved prompt: its manifest, and the PromptModel it holds (with its frozen teacher, if any).

The one way to load a prompt (``load_prompt``); it sits below the training code so that training can
load a method's frozen teacher with it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from vlprompt.backbones import load_backbone
from vlprompt.errors import VlpromptError
from vlprompt.methods import create_model
from vlprompt.run.attention import measured_attention
from vlprompt.run.backbone import backbone_for_manifest, check_weights
from vlprompt.run.hub_ref import download, is_hub_ref
from vlprompt.run.layout import CONFIG, MANIFEST, PROMPT, RunDir, read_json
from vlprompt.train.checkpoint import load_safetensors
from vlprompt.train.precision import resolve_device

FORMAT = "vlprompt-prompt"
FORMAT_VERSION = 1


def read_manifest(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """``(manifest, prompt file)`` of a run/export directory or a single prompt ``.safetensors``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        _, meta = load_safetensors(path)
        if "vlprompt_manifest" not in meta:
            raise VlpromptError(f"{path} carries no vlprompt manifest; pass the run directory instead")
        try:
            return json.loads(meta["vlprompt_manifest"]), path
        except json.JSONDecodeError:
            raise VlpromptError(f"{path} has a damaged manifest; re-export the prompt") from None
    if path.is_file():
        raise VlpromptError(
            f"{path} is a file, not a run; pass the run directory written by `vlprompt train` (or a prompt "
            ".safetensors file)"
        )
    if not path.is_dir():
        raise VlpromptError(f"run not found: {path}; pass a run directory written by `vlprompt train`")
    man, prm = path / MANIFEST, path / PROMPT
    if not man.is_file() or not prm.is_file():
        raise VlpromptError(_not_a_prompt(path, PROMPT if not prm.is_file() else MANIFEST))
    manifest = read_json(man)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VlpromptError(f"{man} is not a vlprompt prompt manifest; pass a run or an exported prompt")
    RunDir(path).verify()  # manifest.json, prompt bytes, fingerprint and config agree (one line if not)
    return manifest, prm


def _not_a_prompt(path: Path, missing: str) -> str:
    """The right advice for a folder without a prompt: a grid folder, an unfinished run, or neither."""
    if (path / CONFIG).is_file():
        return (
            f"{path} has no {missing} (the run did not finish); finish it with `vlprompt train ... --resume` "
            "(or `vlprompt run` again for a grid) or pass a complete run"
        )
    below = sorted(p.parent for p in path.rglob(PROMPT) if (p.parent / MANIFEST).is_file())
    if below:
        return (
            f"{path} is a folder of {len(below)} run(s), not one run; pass one run directory, e.g. {below[0]}"
        )
    return f"{path} is not a run directory (no {missing}); pass a run written by `vlprompt train`"


def load_run(
    path: str | os.PathLike,
    backbone: Any = None,
    device: Any = None,
    *,
    weights: str | None = None,
    teacher: Any = None,
):
    """The trained PromptModel of a run or export (classnames = training classes).

    The backbone is ``backbone`` if given, else loaded from ``weights`` (your copy of the weights
    file; its sha256 is checked against the one the prompt was trained with), else from the
    manifest (name + tag, or the weights path recorded on this machine).
    ``model.predict(images, classnames)`` works with new classes.  A method that learns from a frozen
    teacher gets ``teacher`` (a PromptModel) or, by default, the teacher its options name, loaded too
    (it is never part of the student's prompt file).
    """
    if is_hub_ref(path):  # hf-hub:org/name[@rev]: the Hub's copy, through its cache
        path = download(str(path))
    manifest, prompt_path = read_manifest(path)
    local = RunDir(path).local() if Path(path).is_dir() else {}
    device = (
        resolve_device(device)
        if device is not None
        else (None if backbone is not None else resolve_device("auto"))
    )
    if backbone is None:
        backbone = backbone_for_manifest(manifest, local, weights, device)
    else:
        src = (backbone.meta or {}).get("source")
        want = (manifest.get("backbone") or {}).get("weights_sha256")
        if want and src and Path(str(src)).is_file():
            check_weights(str(src), want, (manifest.get("backbone") or {}).get("weights_file"))
        if device is not None:
            backbone = backbone.to(device)
    try:
        model = create_model(
            manifest["method"],
            backbone,
            list(manifest["classnames"]),
            template=manifest.get("template"),
            **manifest["options"],
        )
    except KeyError as e:
        raise VlpromptError(f"manifest of {path} lacks '{e.args[0]}'; re-export the prompt") from None
    src = type(model.method).teacher_source(model.method.cfg)
    if teacher is None and src:
        teacher = load_run(src, device=backbone.device)
    if teacher is not None:
        model.set_teacher(teacher)
    elif model.method.needs_teacher:
        raise VlpromptError(
            f"prompt {prompt_path} was trained from a frozen teacher its manifest does not name; pass "
            "teacher=load_prompt(TEACHER) (the teacher's own prompt)"
        )
    state, _ = load_safetensors(prompt_path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise VlpromptError(
            f"prompt in {prompt_path} holds non-finite values ({', '.join(bad[:3])}); it is damaged -- "
            "retrain, re-export or re-import it"
        )
    try:
        model.load_prompt_state_dict({k: v.to(backbone.device) for k, v in state.items()})
    except RuntimeError as e:  # shape mismatch: a different backbone than the one it was trained on
        detail = str(e).strip().splitlines()[-1].strip()
        raise VlpromptError(
            f"prompt in {prompt_path} does not fit this backbone ({detail}); use the run's backbone "
            f"{(manifest.get('backbone') or {}).get('name')}"
        ) from None
    recorded = None
    if Path(path).is_dir():  # a run: evaluate with the attention implementations it trained with
        with contextlib.suppress(VlpromptError):
            recorded = (RunDir(path).env() or {}).get("attention")
    model.set_auto_attention(measured_attention(backbone.device, recorded)[0])
    model.eval()
    model.manifest = manifest
    return model


def load_prompt(
    path_or_run: str | os.PathLike,
    backbone: Any = None,
    device: Any = None,
    *,
    weights: str | None = None,
    teacher: Any = None,
) -> Any:
    """The PromptModel of a run directory, an export, a ``prompt.safetensors`` or an imported prompt
    (``vlprompt.load_prompt``: the one way to load a prompt).

    ``backbone``: a loaded :class:`Backbone` (or an open_clip name / weights file) to use instead of
    the one the manifest records; ``weights``: your copy of the weights file the prompt was trained
    with (its sha256 is checked against the manifest's).
    """
    if isinstance(backbone, (str, os.PathLike)):
        backbone = load_backbone(str(backbone), device=device)
    return load_run(path_or_run, backbone=backbone, device=device, weights=weights, teacher=teacher)


__all__ = ["FORMAT", "FORMAT_VERSION", "load_prompt", "load_run", "read_manifest"]
