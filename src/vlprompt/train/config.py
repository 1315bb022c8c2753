"""The run configuration of a command: ``RunRequest`` -> :func:`resolve` -> ``RunConfig``.

A command's wishes travel as one :class:`RunRequest`; :func:`resolve` turns it into the typed tree
(:class:`~vlprompt.train.runconfig.RunConfig` and its sections, declared in ``runconfig.py`` and
importable from here too), validated once.

Resolution order: the sections' defaults < the method's preset file < the preset's
``protocols[<protocol>]`` section < ``--config FILE.yaml`` < ``--set key=value`` <
``epochs_by_shots`` / ``epochs_by_dataset`` (unless ``train.epochs`` was set explicitly) < explicit
flags (``--epochs``, ``--device``).  Values are checked when parsed (types, ranges, finite floats)
with one-line errors naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlprompt.errors import VlpromptError, unknown_name
from vlprompt.methods import get_method
from vlprompt.train.runconfig import (
    ADDED_LATER,
    DEFAULT_BACKBONE,
    DEFAULT_DATA,
    DEFAULT_TRAIN,
    FEATURE_CACHE_MODES,
    OPTIMIZERS,
    PRECISIONS,
    PROTOCOLS,
    SCHEDULERS,
    SECTION_TYPES,
    SECTIONS,
    SUBSAMPLES,
    WARMUP_TYPES,
    BackboneConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    build_options,
    build_section,
    describe_keys,
    dump_yaml,
    validate_config,
)


# ----------------------------------------------------------------------------------------- dicts
def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe loader: no Python objects), with one-line errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VlpromptError(f"{what} not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VlpromptError(f"cannot read {what} {path} ({type(e).__name__}); check the file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VlpromptError(f"{what} {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise VlpromptError(f"{what} {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def load_preset(method: str, protocol: str | None = None) -> dict[str, Any]:
    """The method's official recipe ``{method, options, train}``, with ``protocols[protocol]`` merged in.

    The preset is the method's registry entry (``PromptMethod.preset()``: read and checked once); a
    method without a preset file gets the generic train defaults and its Config defaults.
    """

    cls = get_method(method)  # unknown method -> one-line error with close names
    if protocol is not None and protocol not in PROTOCOLS:
        raise unknown_name("protocol", protocol, PROTOCOLS)
    raw = cls.preset()
    path = cls.preset_path()
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


def preset_protocols(method: str) -> list[str]:
    """The protocols the method's preset has its own section for."""
    return list(get_method(method).preset().get("protocols") or {})


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); the value is parsed as YAML (numbers, lists...)."""
    if "=" not in item:
        raise VlpromptError(f"--set '{item}' is not KEY=VALUE; write e.g. --set train.lr=0.01")
    key_, _, text = item.partition("=")
    keys = [k.strip() for k in key_.strip().split(".")]
    if not key_.strip() or any(not k for k in keys):
        raise VlpromptError(f"--set '{item}' has an empty key; write e.g. --set options.depth=3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return keys, value


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the dict ``cfg`` with ``--set key=value`` overrides applied.

    Unknown sections and unknown keys of ``train``/``data``/``backbone`` are errors naming the valid
    ones (``options`` keys are checked against the method's Config when the config is built).
    """
    out = copy.deepcopy(dict(cfg))
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
        if len(keys) > 2:
            raise VlpromptError(f"--set {item}: keys are SECTION.KEY (two levels), e.g. --set train.lr=0.01")
        if keys[0] in SECTION_TYPES and keys[1] not in {
            f.name for f in dataclasses.fields(SECTION_TYPES[keys[0]])
        }:
            raise unknown_name(
                f"{keys[0]} key", keys[1], [f.name for f in dataclasses.fields(SECTION_TYPES[keys[0]])]
            )
        node = out.setdefault(keys[0], {})
        if not isinstance(node, dict):
            node = out[keys[0]] = dict(node)
        node[keys[1]] = value
    return out


def _epochs_for_shots(by_shots: Mapping[int, int] | None, shots: int | None) -> int | None:
    if not by_shots or not shots:
        return None
    table = {int(k): int(v) for k, v in dict(by_shots).items()}
    if shots in table:
        return table[shots]
    lower = [k for k in table if k <= shots]
    return table[max(lower)] if lower else table[min(table)]


def _norm_ds(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


@dataclass(frozen=True)
class RunRequest:
    """What a command asks for, before presets, files and ``--set`` are applied (see :func:`resolve`).

    ``subsample`` defaults to ``base`` under the base2new protocol and ``all`` otherwise;
    ``shots=None``/``0`` trains on the full training split.  ``config_file`` is a YAML file with any
    of the sections (``train:``, ``options:``, ``data:``, ``backbone:``), applied before ``overrides``
    (``--set KEY=VALUE``); ``epochs`` and ``device`` are the explicit flags, applied last.
    """

    method: str
    dataset: str | None = None
    root: str | None = None
    shots: int | None = 16
    seed: int = 1
    subsample: str | None = None
    protocol: str | None = None
    model: str | None = "ViT-B-16"
    pretrained: str | None = None
    weights: str | None = None
    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    device: str | None = None
    num_workers: int = 0
    config_file: str | Path | None = None
    descriptions: str | Path | None = None

    def but(self, **changes: Any) -> RunRequest:
        """A copy with ``changes`` (a protocol grid derives one request per run from one template)."""
        if "overrides" in changes:
            changes["overrides"] = tuple(changes["overrides"])
        return dataclasses.replace(self, **changes)


def resolve_config(method: str, dataset: str | None = None, **request: Any) -> RunConfig:
    """:func:`resolve` of ``RunRequest(method, dataset, **request)`` (for scripts and tests)."""
    if "overrides" in request:
        request["overrides"] = tuple(request["overrides"])
    return resolve(RunRequest(method, dataset, **request))


def resolve(request: RunRequest) -> RunConfig:
    """The fully resolved, validated :class:`RunConfig` of ``request`` (see the module docstring)."""
    r = request
    method, dataset, protocol, config_file = r.method, r.dataset, r.protocol, r.config_file
    root, shots, seed, subsample, num_workers = r.root, r.shots, r.seed, r.subsample, r.num_workers
    model, pretrained, weights, epochs, device = r.model, r.pretrained, r.weights, r.epochs, r.device
    overrides = list(r.overrides)
    preset = load_preset(method, protocol)
    if subsample is None:
        subsample = "base" if protocol == "base2new" else "all"
    raw: dict[str, Any] = {
        "method": method,
        "options": preset["options"],
        "train": preset["train"],
        "data": {
            "dataset": dataset,
            "root": str(root) if root is not None else None,
            "shots": shots if shots else 0,
            "seed": seed,
            "subsample": subsample,
            "num_workers": num_workers,
            "descriptions": str(r.descriptions) if r.descriptions else None,
        },
        "backbone": {"name": model, "pretrained": pretrained, "weights": str(weights) if weights else None},
        "protocol": protocol,
    }
    explicit_epochs = False
    if config_file is not None:
        extra = read_yaml(config_file)
        bad = sorted(set(extra) - set(SECTIONS))
        if bad:
            raise VlpromptError(
                f"config file {config_file}: unknown section(s) {', '.join(map(str, bad))}; "
                f"valid: {', '.join(SECTIONS)}"
            )
        for sec in ("method", "protocol"):
            if sec in extra and extra[sec] != raw[sec]:
                raise VlpromptError(
                    f"config file {config_file} sets {sec}={extra[sec]!r}; pass --{sec} instead"
                )
        extra = {k: v for k, v in extra.items() if k not in ("method", "protocol")}
        for sec, values in extra.items():
            if not isinstance(values, Mapping):
                raise VlpromptError(f"config file {config_file}: section '{sec}' must be a mapping of keys")
            if sec in SECTION_TYPES:
                valid = {f.name for f in dataclasses.fields(SECTION_TYPES[sec])}
                unknown = [k for k in values if k not in valid]
                if unknown:
                    raise VlpromptError(
                        f"{config_file}: {unknown_name(f'{sec} key', str(unknown[0]), valid)}"
                    )
        explicit_epochs = "epochs" in (extra.get("train") or {})
        raw = deep_merge(raw, extra)
    raw = apply_overrides(raw, overrides)
    explicit_epochs = explicit_epochs or any(o.split("=", 1)[0].strip() == "train.epochs" for o in overrides)
    if raw.get("method") != method or raw.get("protocol") != protocol:
        raise VlpromptError(
            "--set cannot change method or protocol (their presets differ); use --method / --protocol"
        )
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    if device is not None:
        raw["train"]["device"] = device
    cfg = RunConfig.from_dict(raw, where="run config")
    if not explicit_epochs and epochs is None:
        by_shots = _epochs_for_shots(cfg.train.epochs_by_shots, cfg.data.shots)
        if by_shots is not None:
            cfg.train.epochs = by_shots
        for name, n in (cfg.train.epochs_by_dataset or {}).items():  # CoOp: ImageNet trains 50 epochs
            if cfg.data.dataset and _norm_ds(name) == _norm_ds(cfg.data.dataset):
                cfg.train.epochs = int(n)
    validate_config(cfg)
    return cfg


__all__ = [
    "ADDED_LATER",
    "BackboneConfig",
    "DEFAULT_BACKBONE",
    "DEFAULT_DATA",
    "DEFAULT_TRAIN",
    "DataConfig",
    "FEATURE_CACHE_MODES",
    "OPTIMIZERS",
    "PRECISIONS",
    "PROTOCOLS",
    "RunConfig",
    "RunRequest",
    "SCHEDULERS",
    "SECTIONS",
    "SECTION_TYPES",
    "SUBSAMPLES",
    "TrainConfig",
    "WARMUP_TYPES",
    "apply_overrides",
    "build_options",
    "build_section",
    "deep_merge",
    "describe_keys",
    "dump_yaml",
    "load_preset",
    "parse_override",
    "preset_protocols",
    "read_yaml",
    "resolve",
    "resolve_config",
    "validate_config",
]
