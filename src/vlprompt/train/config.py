"""Run configuration: method presets (official recipes), protocol overrides, ``--set`` overrides.

A fully resolved run config is a plain dict, written verbatim as the run's ``config.yaml``::

    {method, options{...}, train{...}, data{dataset, root, shots, seed, subsample, num_workers},
     backbone{name, pretrained, weights}, protocol}

Resolution order: generic train defaults < preset file < ``protocols[<protocol>]`` of the preset <
``--set`` overrides < ``epochs_by_shots`` (unless ``--set train.epochs``) < explicit flags
(``--epochs``, ``--device``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vlprompt.errors import VlpromptError, unknown_name

PRESET_DIR = Path(__file__).resolve().parents[1] / "methods" / "presets"
PROTOCOLS: tuple[str, ...] = ("base2new", "cross-dataset", "dg", "fewshot")
SECTIONS: tuple[str, ...] = ("method", "options", "train", "data", "backbone", "protocol")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULERS: tuple[str, ...] = ("cosine", "constant")
WARMUP_TYPES: tuple[str, ...] = ("constant", "linear", "none")

# Dassl/CoOp defaults; a method without a preset file trains with these.
DEFAULT_TRAIN: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.002,
    "momentum": 0.9,
    "weight_decay": 0.0005,
    "batch_size": 32,
    "eval_batch_size": 100,
    "epochs": 5,
    "epochs_by_shots": None,
    "epochs_by_dataset": None,
    "warmup_epochs": 1,
    "warmup_lr": 1.0e-5,
    "warmup_type": "constant",
    "scheduler": "cosine",
    "precision": "auto",
    # execution (not part of any recipe)
    "device": "auto",
    "eval_every_epoch": False,
    "log_every": 1,
    "shard_text": False,  # DDP: split the class prompts' text encoding over ranks (train/distributed.py)
}
DEFAULT_DATA: dict[str, Any] = {
    "dataset": None,
    "root": None,
    "shots": 16,
    "seed": 1,
    "subsample": "all",
    "num_workers": 0,
    "skip_bad": False,  # drop unreadable images (with a logged count) instead of failing
}
DEFAULT_BACKBONE: dict[str, Any] = {"name": "ViT-B-16", "pretrained": None, "weights": None}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VlpromptError(f"preset {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise VlpromptError(f"preset {path} must hold a mapping (method/options/train/protocols)")
    return data


def load_preset(method: str, protocol: str | None = None) -> dict[str, Any]:
    """The method's official recipe ``{method, options, train}``, with ``protocols[protocol]`` merged in.

    Reads ``methods/presets/<method>.yaml``; a method without a preset file gets the generic
    ``DEFAULT_TRAIN`` and its Config defaults (empty ``options``).
    """
    from vlprompt.methods import get_method

    get_method(method)  # unknown method -> one-line error with close names
    if protocol is not None and protocol not in PROTOCOLS:
        raise unknown_name("protocol", protocol, PROTOCOLS)
    path = PRESET_DIR / f"{method}.yaml"
    raw = _read_yaml(path) if path.is_file() else {}
    bad = sorted(set(raw) - {"method", "options", "train", "protocols"})
    if bad:
        raise VlpromptError(
            f"preset {path} has unknown section(s) {', '.join(bad)}; valid: method, options, train, protocols"
        )
    if raw.get("method", method) != method:
        raise VlpromptError(
            f"preset {path} is for method '{raw['method']}', not '{method}'; fix its 'method:' line"
        )
    protocols = raw.get("protocols") or {}
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise VlpromptError(
            f"preset {path} overrides unknown protocol(s) {', '.join(unknown)}; valid: {', '.join(PROTOCOLS)}"
        )
    preset = {
        "method": method,
        "options": dict(raw.get("options") or {}),
        "train": deep_merge(DEFAULT_TRAIN, raw.get("train") or {}),
    }
    if protocol is not None and protocols.get(protocol):
        over = protocols[protocol]
        bad = sorted(set(over) - {"options", "train"})
        if bad:
            raise VlpromptError(
                f"preset {path}: protocol '{protocol}' may override only options and train, not {bad}"
            )
        preset = deep_merge(preset, over)
    return preset


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); the value is parsed as YAML (numbers, lists...)."""
    if "=" not in item:
        raise VlpromptError(f"--set '{item}' is not KEY=VALUE; write e.g. --set train.lr=0.01")
    key, _, text = item.partition("=")
    keys = [k for k in key.strip().split(".")]
    if not key.strip() or any(not k for k in keys):
        raise VlpromptError(f"--set '{item}' has an empty key; write e.g. --set options.depth=3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return keys, value


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``cfg`` with ``--set key=value`` overrides applied (``train.lr=0.01``, ``options.depth=3``).

    Unknown top-level sections, and unknown keys of ``train``/``data``/``backbone``, are errors naming the
    valid ones (``options`` keys are checked against the method's Config when the model is built).
    """
    out = copy.deepcopy(cfg)
    known = {"train": DEFAULT_TRAIN, "data": DEFAULT_DATA, "backbone": DEFAULT_BACKBONE}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in SECTIONS:
            raise VlpromptError(
                f"--set {item}: unknown section '{keys[0]}'; valid sections: {', '.join(SECTIONS)}"
            )
        if keys[0] in ("method", "protocol"):
            if len(keys) != 1:
                raise VlpromptError(
                    f"--set {item}: '{keys[0]}' is a single value; write --set {keys[0]}=NAME"
                )
            out[keys[0]] = value
            continue
        if len(keys) == 1:
            raise VlpromptError(
                f"--set {item}: name a key inside '{keys[0]}', e.g. --set {keys[0]}.KEY=VALUE"
            )
        if keys[0] in known and keys[1] not in known[keys[0]]:
            raise unknown_name(f"{keys[0]} key", keys[1], known[keys[0]])
        node = out.setdefault(keys[0], {})
        for k in keys[1:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return out


def _epochs_for_shots(by_shots: Any, shots: int | None) -> int | None:
    if not by_shots or not shots:
        return None
    table = {int(k): int(v) for k, v in dict(by_shots).items()}
    if shots in table:
        return table[shots]
    lower = [k for k in table if k <= shots]
    return table[max(lower)] if lower else table[min(table)]


def resolve_config(
    method: str,
    dataset: str,
    *,
    root: str | None = None,
    shots: int | None = 16,
    seed: int = 1,
    subsample: str | None = None,
    protocol: str | None = None,
    model: str | None = "ViT-B-16",
    pretrained: str | None = None,
    weights: str | None = None,
    overrides: Iterable[str] = (),
    epochs: int | None = None,
    device: str | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """The fully resolved run config (see module docstring); validated, ready for ``train_run``.

    ``subsample`` defaults to ``base`` under the base2new protocol and ``all`` otherwise;
    ``shots=None``/``0`` trains on the full training split.
    """
    overrides = list(overrides)
    preset = load_preset(method, protocol)
    if subsample is None:
        subsample = "base" if protocol == "base2new" else "all"
    cfg: dict[str, Any] = {
        "method": method,
        "options": preset["options"],
        "train": preset["train"],
        "data": deep_merge(
            DEFAULT_DATA,
            {
                "dataset": dataset,
                "root": str(root) if root is not None else None,
                "shots": int(shots) if shots else 0,
                "seed": int(seed),
                "subsample": subsample,
                "num_workers": int(num_workers),
            },
        ),
        "backbone": {"name": model, "pretrained": pretrained, "weights": str(weights) if weights else None},
        "protocol": protocol,
    }
    cfg = apply_overrides(cfg, overrides)
    epochs_set = any(o.split("=", 1)[0].strip() == "train.epochs" for o in overrides)
    by_shots = _epochs_for_shots(cfg["train"].get("epochs_by_shots"), cfg["data"]["shots"])
    if by_shots is not None and not epochs_set:
        cfg["train"]["epochs"] = by_shots
    by_dataset = cfg["train"].get("epochs_by_dataset") or {}
    ds_key = str(dataset).lower().replace("-", "").replace("_", "")
    for name, n in dict(by_dataset).items():  # e.g. CoOp: ImageNet trains 50 epochs at every K
        if str(name).lower().replace("-", "").replace("_", "") == ds_key and not epochs_set:
            cfg["train"]["epochs"] = int(n)
    if cfg["method"] != method or cfg["protocol"] != protocol:
        raise VlpromptError(
            "--set cannot change method or protocol (their presets differ); use --method / --protocol"
        )
    if epochs is not None:
        cfg["train"]["epochs"] = int(epochs)
    if device is not None:
        cfg["train"]["device"] = device
    validate_config(cfg)
    return cfg


def validate_config(cfg: Mapping[str, Any]) -> None:
    """One-line errors for settings that cannot work (before any data or weights are loaded)."""
    t = cfg["train"]

    def number(key: str, kind: type, minimum: float, strict: bool = False) -> None:
        v = t.get(key)
        ok = (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and (v > minimum if strict else v >= minimum)
        )
        if kind is int:
            ok = ok and float(v).is_integer()
        if not ok:
            rel = ">" if strict else ">="
            raise VlpromptError(f"train.{key}={v!r} is invalid; it must be a {kind.__name__} {rel} {minimum}")

    number("lr", float, 0, strict=True)
    number("momentum", float, 0)
    number("weight_decay", float, 0)
    number("batch_size", int, 1)
    number("eval_batch_size", int, 1)
    number("epochs", int, 1)
    number("warmup_epochs", int, 0)
    number("warmup_lr", float, 0)
    number("log_every", int, 1)
    for key, valid in (
        ("precision", PRECISIONS),
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
        ("warmup_type", WARMUP_TYPES),
    ):
        if t.get(key) not in valid:
            raise VlpromptError(f"train.{key}={t.get(key)!r} is invalid; choose one of: {', '.join(valid)}")
    d = cfg["data"]
    if not d.get("dataset"):
        raise VlpromptError("no data set given; pass --dataset NAME (see `vlprompt data list`)")
    if d.get("subsample") not in ("all", "base", "new"):
        raise VlpromptError(
            f"data.subsample={d.get('subsample')!r} is invalid; choose one of: all, base, new"
        )
    if not isinstance(d.get("shots"), int) or d["shots"] < 0:
        raise VlpromptError(f"data.shots={d.get('shots')!r} is invalid; use 0 (full split) or 1, 2, 4, 8, 16")
    if not isinstance(d.get("seed"), int) or not 0 <= d["seed"] < 2**32:
        raise VlpromptError(f"data.seed={d.get('seed')!r} is invalid; use an integer >= 0 such as 1, 2, 3")
    nw = d.get("num_workers", 0)
    if not isinstance(nw, int) or isinstance(nw, bool) or nw < 0:
        raise VlpromptError(f"data.num_workers={nw!r} is invalid; use 0 (load in the main process) or more")
    if not isinstance(cfg.get("options"), Mapping):
        raise VlpromptError("options must be a mapping of the method's Config fields")
    b = cfg["backbone"]
    if b.get("pretrained") and b.get("weights"):
        raise VlpromptError("pass either a pretrained tag or a weights file, not both")
    if not b.get("name") and not b.get("weights"):
        raise VlpromptError("no backbone given; pass --model NAME (e.g. ViT-B-16) or --weights PATH")


def train_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The train settings completed with defaults, from a full run config or its ``train`` section."""
    section = cfg["train"] if isinstance(cfg.get("train"), Mapping) else cfg
    return deep_merge(DEFAULT_TRAIN, section or {})


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
