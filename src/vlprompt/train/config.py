"""The typed run configuration: one tree of dataclasses, validated once, passed down as an object.

::

    RunConfig
      method: str                 the registered method
      options: <method>.Config    the method's own dataclass (official recipe as defaults)
      train: TrainConfig          optimiser, schedule, epochs, precision (+ execution-only keys)
      data: DataConfig            data set, root, shots, seed, subsample, loader settings
      backbone: BackboneConfig    open_clip name, pretrained tag or local weights file
      protocol: str | None        base2new | cross-dataset | dg | fewshot | None (a single run)

Every key has a type, a default and a help string (``vlprompt config show [--method M]`` prints
them).  Resolution order: the defaults below < the method's preset file < the preset's
``protocols[<protocol>]`` section < ``--config FILE.yaml`` < ``--set key=value`` <
``epochs_by_shots`` / ``epochs_by_dataset`` (unless ``train.epochs`` was set explicitly) < explicit
flags (``--epochs``, ``--device``).  Values are checked when parsed (types, ranges, finite floats)
with one-line errors naming the key.  ``to_dict()`` is what a run writes as ``config.yaml``.

The dataclasses also answer ``cfg["train"]["lr"]``-style reads (and writes) so scripts written
against the former dict config keep working; library code uses attributes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from vlprompt.errors import VlpromptError, unknown_name
from vlprompt.methods import build_config, get_method

PRESET_DIR = Path(__file__).resolve().parents[1] / "methods" / "presets"
PROTOCOLS: tuple[str, ...] = ("base2new", "cross-dataset", "dg", "fewshot")
SECTIONS: tuple[str, ...] = ("method", "options", "train", "data", "backbone", "protocol")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULERS: tuple[str, ...] = ("cosine", "constant")
WARMUP_TYPES: tuple[str, ...] = ("constant", "linear", "none")
FEATURE_CACHE_MODES: tuple[str, ...] = ("off", "eval", "train")
SUBSAMPLES: tuple[str, ...] = ("all", "base", "new")


def key(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    strict: bool = False,
    execution: bool = False,
) -> Any:
    """A config key: default, help, optional choices / lower bound; ``execution`` keys never change a
    result (device, logging, batch size of evaluation), so they are left out of the run's fingerprint."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "strict": strict, "execution": execution}
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Dict-style access for scripts written against the former dict config (``cfg["lr"]``)."""

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        value = getattr(self, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, _Section):
            return _OptionsView(value)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in self.keys():
            raise KeyError(name)
        setattr(self, name, value)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.keys() else default

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        return {k: _plain(getattr(self, k)) for k in self.keys()}


class _OptionsView:
    """``cfg["options"]["n_ctx"]`` over a method's Config dataclass."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getitem__(self, name: str) -> Any:
        return getattr(self._obj, name)

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self._obj, name, value)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self._obj, name, default)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self._obj)]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self._obj, k)) for k in self.keys()]

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __eq__(self, other: object) -> bool:
        return dict(self.items()) == (dict(other.items()) if hasattr(other, "items") else other)


def _plain(v: Any) -> Any:
    if isinstance(v, _Section):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class TrainConfig(_Section):
    """How the prompts are trained (Dassl/CoOp defaults; the method's preset sets its recipe)."""

    optimizer: str = key("sgd", "optimiser", choices=OPTIMIZERS)
    lr: float = key(0.002, "learning rate after warm-up", minimum=0, strict=True)
    momentum: float = key(0.9, "SGD momentum", minimum=0)
    weight_decay: float = key(0.0005, "weight decay", minimum=0)
    batch_size: int = key(32, "training images per optimisation step (global batch under DDP)", minimum=1)
    epochs: int = key(5, "training epochs", minimum=1)
    epochs_by_shots: dict[int, int] | None = key(
        None, "epochs per shots K, e.g. {1: 50, 16: 200} (CoOp); applies unless train.epochs is set"
    )
    epochs_by_dataset: dict[str, int] | None = key(
        None, "epochs per data set, e.g. {imagenet: 50}; applies unless train.epochs is set"
    )
    warmup_epochs: int = key(1, "epochs at the warm-up learning rate", minimum=0)
    warmup_lr: float = key(1.0e-5, "learning rate during warm-up", minimum=0)
    warmup_type: str = key("constant", "warm-up shape", choices=WARMUP_TYPES)
    scheduler: str = key("cosine", "learning-rate schedule after warm-up", choices=SCHEDULERS)
    precision: str = key(
        "auto", "autocast precision (auto: fp32 on CPU, bf16/fp16 on CUDA)", choices=PRECISIONS
    )
    image_features_cache: str = key(
        "off",
        "frozen image features: off | eval (exact: cache at evaluation) | train (also training, "
        "augmentation OFF -- changes the result)",
        choices=FEATURE_CACHE_MODES,
    )
    # execution only: never change what is computed
    eval_batch_size: int = key(100, "evaluation batch size", minimum=1, execution=True)
    device: str = key("auto", "auto, cpu, cuda or cuda:N", execution=True)
    eval_every_epoch: bool = key(False, "also evaluate after every epoch (slower)", execution=True)
    log_every: int = key(1, "write a step record to log.jsonl every N steps", minimum=1, execution=True)
    shard_text: bool = key(False, "DDP: split the class prompts' text encoding over ranks", execution=True)
    attention: str = key(
        "auto",
        "attention implementation (exact alike, rounding differs): auto (measured once per machine and "
        "shape, recorded in env.json, reused on resume) | sdpa | plain (fixed: same on every machine)",
        choices=("auto", "sdpa", "plain"),
        execution=True,
    )


@dataclass
class DataConfig(_Section):
    """Which data a run trains on."""

    dataset: str | None = key(None, "data set name (`vlprompt data list`), folder:PATH or csv:PATH")
    root: str | None = key(
        None, "folder holding the data set folders (CoOp's $DATA; env VLPROMPT_DATA)", execution=True
    )
    shots: int = key(16, "training images per class (0 = the full training split)", minimum=0)
    seed: int = key(1, "seed of the few-shot picks and of training", minimum=0)
    subsample: str = key("all", "classes trained on: all | base | new", choices=SUBSAMPLES)
    skip_bad: bool = key(False, "drop unreadable images (logged with a count) instead of failing")
    listing: str = key(
        "sorted",
        "order of ImageNet's class folders: sorted (default) | os (unsorted os.listdir, as the reference "
        "toolkit; filesystem-dependent)",
        choices=("sorted", "os"),
    )
    num_workers: int = key(
        0, "data-loader worker processes (0 = load in the main process)", minimum=0, execution=True
    )
    max_image_pixels: int = key(
        178_956_970,
        "largest image (width x height) that is decoded; larger files are refused as decompression "
        "bombs (skipped with skip_bad); 0 = no limit",
        minimum=0,
    )


@dataclass
class BackboneConfig(_Section):
    """The frozen CLIP: an open_clip architecture with a pretrained tag, a local file, or random init."""

    name: str | None = key("ViT-B-16", "open_clip architecture (inferred from --weights when omitted)")
    pretrained: str | None = key(None, "open_clip pretrained tag, e.g. openai (needs the cache or a network)")
    weights: str | None = key(
        None, "local weights file: OpenAI .pt, open_clip .pt/.bin, .safetensors", execution=True
    )


SECTION_TYPES: dict[str, type[_Section]] = {
    "train": TrainConfig,
    "data": DataConfig,
    "backbone": BackboneConfig,
}


@dataclass
class RunConfig(_Section):
    """A fully resolved run; the object that flows from the CLI through protocols to the trainer."""

    method: str = "zeroshot"
    options: Any = None  # the method's Config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    protocol: str | None = None

    _sections: ClassVar[tuple[str, ...]] = SECTIONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": _plain(self.options) if self.options is not None else {},
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
            "backbone": self.backbone.to_dict(),
            "protocol": self.protocol,
        }

    def copy(self) -> RunConfig:
        return copy.deepcopy(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config") -> RunConfig:
        """A validated RunConfig from a (possibly partial) dict; unknown keys and bad values are errors."""
        if isinstance(raw, RunConfig):
            return raw.copy()
        if not isinstance(raw, Mapping):
            raise VlpromptError(f"{where} must be a mapping of sections ({', '.join(SECTIONS)})")
        bad = sorted(set(raw) - set(SECTIONS))
        if bad:
            raise VlpromptError(
                f"{where}: unknown section(s) {', '.join(map(str, bad))}; valid: {', '.join(SECTIONS)}"
            )
        method = raw.get("method") or "zeroshot"
        if not isinstance(method, str):
            raise VlpromptError(f"{where}: method={method!r} must be a method name")
        cfg = cls(method=method, protocol=raw.get("protocol"))
        if cfg.protocol is not None and cfg.protocol not in PROTOCOLS:
            raise unknown_name("protocol", str(cfg.protocol), PROTOCOLS)
        for name, typ in SECTION_TYPES.items():
            section = raw.get(name) or {}
            if not isinstance(section, Mapping):
                raise VlpromptError(f"{where}: section '{name}' must be a mapping of keys, got {section!r}")
            setattr(cfg, name, build_section(typ, section, name))
        cfg.options = build_options(method, raw.get("options") or {})
        validate_config(cfg)
        return cfg


# ----------------------------------------------------------------------------------------- values
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping {{{_type_name(k)}: {_type_name(v)}}}"
    if origin in (list, tuple):
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked (and, where lossless, converted) against the annotation ``tp``."""

    def bad() -> VlpromptError:
        return VlpromptError(f"{name}={value!r} is invalid; it must be {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, name)
            except VlpromptError:
                continue
        raise bad()
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise bad()
        return {coerce(k, kt, f"{name} key"): coerce(v, vt, f"{name}[{k}]") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        (et,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, et, name) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value_f = float(value.strip())
            except ValueError:
                raise bad() from None
        elif isinstance(value, (int, float)):
            value_f = float(value)
        else:
            raise bad()
        if not math.isfinite(value_f):
            raise VlpromptError(f"{name}={value!r} is invalid; it must be a finite number")
        return value_f
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad()
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_section(typ: type[_Section], values: Mapping[str, Any], section: str) -> Any:
    """A section dataclass from ``values`` (defaults for missing keys), each value type-checked."""
    fields = {f.name: f for f in dataclasses.fields(typ)}
    bad = [k for k in values if k not in fields]
    if bad:
        raise unknown_name(f"{section} key", str(bad[0]), fields)
    hints = _hints(typ)
    out = {}
    for k, raw in values.items():
        f = fields[k]
        name = f"{section}.{k}"
        v = coerce(raw, hints[k], name)
        meta = f.metadata
        if meta.get("choices") and v not in meta["choices"]:
            raise VlpromptError(f"{name}={raw!r} is invalid; choose one of: {', '.join(meta['choices'])}")
        lo = meta.get("minimum")
        if lo is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
            if (v <= lo) if meta.get("strict") else (v < lo):
                rel = ">" if meta.get("strict") else ">="
                kind = "an integer" if hints[k] is int else "a number"
                raise VlpromptError(f"{name}={raw!r} is invalid; it must be {kind} {rel} {lo:g}")
        out[k] = v
    return typ(**out)


def build_options(method: str, options: Mapping[str, Any]) -> Any:
    """The method's Config dataclass from ``options``: unknown keys and bad types are one-line errors."""

    cls = get_method(method)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = _plain(options)
    if isinstance(options, _OptionsView):
        options = dict(options.items())
    if not isinstance(options, Mapping):
        raise VlpromptError(f"options must be a mapping of method '{method}' option names to values")

    hints = _hints(cls.Config)
    values = {k: coerce(v, hints[k], f"options.{k}") if k in hints else v for k, v in options.items()}
    try:
        return build_config(cls, values)  # unknown names: one line listing the valid ones
    except (TypeError, ValueError) as e:
        raise VlpromptError(f"options for method '{method}' are invalid ({e})") from None


def describe_keys(method: str | None = None) -> list[dict[str, Any]]:
    """Every config key: ``{key, type, default, help}`` (with the method's options when given)."""
    rows = []
    for section, typ in SECTION_TYPES.items():
        hints = _hints(typ)
        for f in dataclasses.fields(typ):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_ = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_ += f" [{' | '.join(f.metadata['choices'])}]"
            rows.append(
                {
                    "key": f"{section}.{f.name}",
                    "type": _type_name(hints[f.name]),
                    "default": default,
                    "help": help_,
                    "execution": bool(f.metadata.get("execution")),
                }
            )
    if method is not None:
        cls = get_method(method)
        hints = _hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append(
                {
                    "key": f"options.{f.name}",
                    "type": _type_name(hints.get(f.name, Any)),
                    "default": default,
                    "help": f.metadata.get("help", ""),
                    "execution": False,
                }
            )
    return rows


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


_DEFAULT_TRAIN = TrainConfig().to_dict()
#: the generic recipe as a plain dict (read-only view for scripts and tests)
DEFAULT_TRAIN: dict[str, Any] = dict(_DEFAULT_TRAIN)
DEFAULT_DATA: dict[str, Any] = DataConfig().to_dict()
DEFAULT_BACKBONE: dict[str, Any] = BackboneConfig().to_dict()


def load_preset(method: str, protocol: str | None = None) -> dict[str, Any]:
    """The method's official recipe ``{method, options, train}``, with ``protocols[protocol]`` merged in.

    Reads ``methods/presets/<method>.yaml``; a method without a preset file gets the generic
    train defaults and its Config defaults (empty ``options``).
    """

    get_method(method)  # unknown method -> one-line error with close names
    if protocol is not None and protocol not in PROTOCOLS:
        raise unknown_name("protocol", protocol, PROTOCOLS)
    path = PRESET_DIR / f"{method}.yaml"
    raw = read_yaml(path, "preset") if path.is_file() else {}
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


def resolve_config(
    method: str,
    dataset: str | None,
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
    config_file: str | Path | None = None,
) -> RunConfig:
    """The fully resolved, validated :class:`RunConfig` (see the module docstring for the order).

    ``subsample`` defaults to ``base`` under the base2new protocol and ``all`` otherwise;
    ``shots=None``/``0`` trains on the full training split.  ``config_file`` is a YAML file with any
    of the sections (``train:``, ``options:``, ``data:``, ``backbone:``), applied before ``--set``.
    """
    overrides = list(overrides)
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


def validate_config(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    """One-line errors for settings that cannot work (before any data or weights are loaded)."""
    if not isinstance(cfg, RunConfig):
        return RunConfig.from_dict(cfg)
    d, b = cfg.data, cfg.backbone
    if not d.dataset:
        raise VlpromptError("no data set given; pass --dataset NAME (see `vlprompt data list`)")
    if not 0 <= d.seed < 2**32:
        raise VlpromptError(f"data.seed={d.seed!r} is invalid; use an integer >= 0 such as 1, 2, 3")
    if b.pretrained and b.weights:
        raise VlpromptError("pass either a pretrained tag or a weights file, not both")
    if not b.name and not b.weights:
        raise VlpromptError("no backbone given; pass --model NAME (e.g. ViT-B-16) or --weights PATH")
    if cfg.train.warmup_epochs > cfg.train.epochs and cfg.train.warmup_type != "none":
        pass  # allowed by the reference schedule (the whole run is warm-up); kept as is
    return cfg


def as_run_config(cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``cfg`` as a validated RunConfig (a dict from an older script or a YAML file is converted)."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg)


def train_settings(cfg: Any) -> TrainConfig:
    """The TrainConfig of a RunConfig, a full dict config, or a bare ``train`` dict (defaults filled in)."""
    if isinstance(cfg, RunConfig):
        return cfg.train
    if isinstance(cfg, TrainConfig):
        return cfg
    section = cfg.get("train") if isinstance(cfg, Mapping) and isinstance(cfg.get("train"), Mapping) else cfg
    if isinstance(section, TrainConfig):
        return section
    return build_section(TrainConfig, dict(section or {}), "train")


def data_settings(cfg: Any) -> DataConfig:
    """The DataConfig of a RunConfig or a dict config (defaults when absent)."""
    if isinstance(cfg, RunConfig):
        return cfg.data
    section = cfg.get("data") if isinstance(cfg, Mapping) else None
    if isinstance(section, DataConfig):
        return section
    section = {k: v for k, v in dict(section or {}).items()}
    return build_section(DataConfig, section, "data")


def dump_yaml(cfg: RunConfig | Mapping[str, Any]) -> str:
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
