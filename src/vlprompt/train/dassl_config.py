"""Dassl habits: the official repositories' trainer names, trainer YAML files and ``KEY VALUE`` options.

The official code of CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe, IVLP, VPT, PromptSRC and MPL is built on
Dassl: ``python train.py --trainer MaPLe --config-file configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml
DATASET.NUM_SHOTS 16``.  This module maps what decides a result in those files to vlprompt's
``--set`` keys (``train.lr=0.0035``, ``options.depth=9`` ...): the keys every trainer shares here, each
method's own trainer names and ``TRAINER.<SECTION>`` keys from its registry entry (``dassl_trainers``,
``dassl_keys``), and refuses -- in one line listing them
all -- every key it cannot map, so a Dassl file never changes a run silently.  Keys that only change
logging or speed (``TRAIN.PRINT_FREQ``, ``DATALOADER.NUM_WORKERS``, ``DATALOADER.TEST.BATCH_SIZE``) and
the CLIP pre-processing every official config repeats are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlprompt.backbones.names import canonical_model_name
from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method, list_methods
from vlprompt.train.config import read_yaml


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def _trainers() -> dict[str, str]:
    """The official trainers' names (``--trainer``), normalised -> vlprompt method: each method's
    registry entry names its own (``dassl_trainers``)."""
    return {_norm(t): name for name in list_methods() for t in get_method(name).dassl_trainers}


#: top-level Dassl sections; a YAML whose keys are all upper case and include one of these is Dassl's
DASSL_SECTIONS = ("DATALOADER", "INPUT", "OPTIM", "TRAIN", "TEST", "MODEL", "TRAINER", "DATASET", "LOSS")

#: Dassl key -> vlprompt key (every method)
_COMMON = {
    "OPTIM.NAME": "train.optimizer",
    "OPTIM.LR": "train.lr",
    "OPTIM.MAX_EPOCH": "train.epochs",
    "OPTIM.MOMENTUM": "train.momentum",
    "OPTIM.WEIGHT_DECAY": "train.weight_decay",
    "OPTIM.LR_SCHEDULER": "train.scheduler",
    "OPTIM.WARMUP_EPOCH": "train.warmup_epochs",
    "OPTIM.WARMUP_TYPE": "train.warmup_type",
    "OPTIM.WARMUP_CONS_LR": "train.warmup_lr",
    "DATALOADER.TRAIN_X.BATCH_SIZE": "train.batch_size",
    "DATASET.NUM_SHOTS": "data.shots",
    "DATASET.SUBSAMPLE_CLASSES": "data.subsample",
    "SEED": "data.seed",
    "MODEL.BACKBONE.NAME": "backbone.name",
}


def _method_keys(method: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The method's Dassl keys (its registry entry's ``dassl_keys``): ``({KEY of TRAINER.<SECTION>.KEY:
    option}, {whole Dassl key: "options.<option>"})``."""
    keys = get_method(method).dassl_keys if method in list_methods() else {}
    own = {k: v for k, v in keys.items() if "." not in k}
    whole = {k: f"options.{v}" for k, v in keys.items() if "." in k}
    return own, whole


#: keys that change neither the result nor anything vlprompt does differently (logging, speed)
_IGNORED = {
    "TRAIN.PRINT_FREQ",
    "TRAIN.CHECKPOINT_FREQ",
    "TEST.FINAL_MODEL",
    "LOSS.NAME",
    "OUTPUT_DIR",
    "DATALOADER.NUM_WORKERS",  # --num-workers
    "DATALOADER.TEST.BATCH_SIZE",  # evaluation batch: never changes a result
}
#: CLIP's pre-processing as every official config spells it (vlprompt always uses the backbone's own)
_CLIP_INPUT = {
    "INPUT.INTERPOLATION": "bicubic",
    "INPUT.PIXEL_MEAN": [0.48145466, 0.4578275, 0.40821073],
    "INPUT.PIXEL_STD": [0.26862954, 0.26130258, 0.27577711],
    "INPUT.TRANSFORMS": ["random_resized_crop", "random_flip", "normalize"],
}
_PREC = {"fp32": "fp32", "fp16": "auto", "amp": "auto"}


@dataclass
class DasslMapping:
    """What a Dassl config or ``KEY VALUE`` list means in vlprompt: the method and ``--set`` items."""

    method: str | None
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def trainer_to_method(name: str) -> str:
    """vlprompt's method for an official trainer name (case-insensitive); other names pass lower-cased."""
    key = str(name).strip()
    return _trainers().get(_norm(key), key.lower() if key else key)


def is_dassl_config(data: Mapping[str, Any]) -> bool:
    keys = [str(k) for k in data]
    return bool(keys) and all(k.isupper() for k in keys) and any(k in DASSL_SECTIONS for k in keys)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w.+-]+", value) else repr(value)
    return str(value)


def _map_value(dkey: str, ours: str, value: Any, notes: list[str]) -> str | None:
    """``ours=value`` for one mapped key, or None when the value is the preset's own (CTX_INIT: True)."""
    if ours == "backbone.name":
        value = canonical_model_name(str(value))
    elif ours == "train.optimizer" or ours == "train.scheduler" or ours == "train.warmup_type":
        value = str(value).lower()
    elif ours == "data.subsample":
        value = str(value).lower()
    elif ours == "options.ctx_init" and isinstance(value, bool):
        if value:
            notes.append(f"{dkey}: True keeps the method's initialisation words (the preset's ctx_init)")
            return None
        value = ""
    elif ours == "options.text":  # VPT's class template (its CTX_INIT): the class name goes at {}
        value = f"{value} {{}}." if value and "{}" not in str(value) else value
    return f"{ours}={_fmt(value)}"


def map_dassl(
    data: Mapping[str, Any], method: str | None = None, where: str = "Dassl config"
) -> DasslMapping:
    """Map a Dassl config (nested mapping or flat ``{"OPTIM.LR": 0.01}``) to vlprompt ``--set`` items.

    ``method``: from ``--trainer`` / ``--method``; else the single ``TRAINER.<NAME>`` section names it.
    Raises one :class:`VlpromptError` listing every key that cannot be mapped.
    """
    flat = _flatten(data)
    sections = sorted({k.split(".")[1] for k in flat if k.startswith("TRAINER.") and k.count(".") >= 2})
    if method is None and len(sections) == 1:
        method = _trainers().get(_norm(sections[0]))
    method = trainer_to_method(method) if method else None
    own, whole = _method_keys(method)
    out = DasslMapping(method)
    bad: list[str] = []
    for dkey, value in flat.items():
        if dkey in _IGNORED:
            continue
        if dkey in _CLIP_INPUT:
            if value != _CLIP_INPUT[dkey]:
                bad.append(f"{dkey}={value!r}")
            continue
        if dkey == "INPUT.SIZE":
            size = _square(value)
            if size is None:
                bad.append(f"{dkey}={value!r}")
            else:
                out.notes.append(f"{dkey}: the backbone's own resolution is used ({size} expected)")
            continue
        if dkey in _COMMON or dkey in whole:
            ours = _COMMON.get(dkey) or whole[dkey]
            item = _map_value(dkey, ours, value, out.notes)
            if item is not None:
                out.overrides.append(item)
            continue
        m = re.fullmatch(r"TRAINER\.([A-Z0-9_]+)\.([A-Z0-9_]+)", dkey)
        if m and m.group(2) == "PREC":
            prec = _PREC.get(str(value).lower())
            if prec is None:
                bad.append(f"{dkey}={value!r}")
            else:
                out.overrides.append(f"train.precision={prec}")
                if prec == "auto":
                    out.notes.append(
                        f"{dkey}={value}: mapped to precision auto (our choice: bf16/fp16 autocast with fp32 "
                        "prompts on CUDA, fp32 on CPU; the official code casts the frozen CLIP to fp16)"
                    )
            continue
        opt = own.get(m.group(2)) if m else None
        if opt is not None:
            item = _map_value(dkey, f"options.{opt}", value, out.notes)
            if item is not None:
                out.overrides.append(item)
            continue
        bad.append(dkey)
    if bad:
        why = "" if method else " (no --trainer/--method given and no single TRAINER section names one)"
        raise VlpromptError(
            f"{where}: cannot map {', '.join(bad)}{why}; remove these keys or set their vlprompt "
            "equivalents with --set (`vlprompt config show --method M` lists them)"
        )
    return out


def _square(value: Any) -> int | None:
    if isinstance(value, str):
        nums = re.findall(r"\d+", value)
    elif isinstance(value, (list, tuple)):
        nums = [str(v) for v in value]
    else:
        nums = [str(value)]
    if len(nums) in (1, 2) and len(set(nums)) == 1 and nums[0].isdigit():
        return int(nums[0])
    return None


def read_dassl_file(path: str | Path, method: str | None = None) -> DasslMapping | None:
    """The mapping of ``path`` when it is a Dassl trainer config, else None (a vlprompt config file)."""
    data = read_yaml(path)
    if not is_dassl_config(data):
        return None
    if method is None:  # configs/trainers/<Trainer>/<file>.yaml: the folder names the trainer
        method = _trainers().get(_norm(Path(path).parent.name))
    return map_dassl(data, method, where=str(path))


_DASSL_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$|^SEED$")


def dassl_pairs_hint(tokens: list[str]) -> str | None:
    """A one-line hint for trailing Dassl ``KEY VALUE`` pairs (``DATASET.NUM_SHOTS 16``), else None."""
    pairs = []
    i = 0
    while i < len(tokens):
        if _DASSL_KEY.match(tokens[i]) and i + 1 < len(tokens):
            pairs.append((tokens[i], tokens[i + 1]))
            i += 2
        else:
            i += 1
    if not pairs:
        return None
    flags = {"data.shots": "--shots", "data.seed": "--seed", "data.subsample": "--subsample"}
    parts = []
    for k, v in pairs:
        try:
            ours = map_dassl({k: _yaml_value(v)}, _trainer_from(pairs), where="option").overrides
        except VlpromptError:
            parts.append(f"{k} (no vlprompt equivalent)")
            continue
        for o in ours:
            key, val = o.split("=", 1)
            parts.append(f"{flags[key]} {val}" if key in flags else f"--set {o}")
    return "Dassl-style KEY VALUE options are not read; write " + " ".join(parts)


def _trainer_from(pairs: list[tuple[str, str]]) -> str | None:
    names = {k.split(".")[1] for k, _ in pairs if k.startswith("TRAINER.") and k.count(".") == 2}
    return _trainers().get(_norm(next(iter(names)))) if len(names) == 1 else None


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
