"""The typed run configuration's tree: :class:`RunConfig` and its sections, each key declared once.

::

    RunConfig
      method: str                 the registered method
      options: <method>.Config    the method's own dataclass (official recipe as defaults)
      train: TrainConfig          optimiser, schedule, epochs, precision (+ execution-only keys)
      data: DataConfig            data set, root, shots, seed, subsample, loader settings
      backbone: BackboneConfig    open_clip name, pretrained tag or local weights file
      model: ModelOptions         execution options of the model (text caching, attention ...)
      protocol: str | None        base2new | cross-dataset | dg | fewshot | None (a single run)

Every key -- of the sections and of every method's options -- is declared with the one descriptor
``vlprompt.options.option`` (type, default, range or choices, help; ``vlprompt config show [--method
M]`` prints them) and checked once, when its section is built.  ``to_dict()`` is what a run writes as
``config.yaml`` (:func:`dump_yaml`); ``RunConfig.but(train={...})`` derives a changed copy (checked
again).  How a command's request becomes this tree is ``config.py`` (:func:`~vlprompt.train.config.resolve`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from vlprompt.errors import VlpromptError, unknown_name
from vlprompt.methods import build_config, get_method
from vlprompt.methods.model import ModelOptions
from vlprompt.options import Options, option, plain

PROTOCOLS: tuple[str, ...] = ("base2new", "cross-dataset", "dg", "fewshot")
SECTIONS: tuple[str, ...] = ("method", "options", "train", "data", "backbone", "model", "protocol")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULERS: tuple[str, ...] = ("cosine", "constant")
WARMUP_TYPES: tuple[str, ...] = ("constant", "linear", "none")
FEATURE_CACHE_MODES: tuple[str, ...] = ("off", "eval", "train")
SUBSAMPLES: tuple[str, ...] = ("all", "base", "new")


_plain = plain


#: train keys added after runs were fingerprinted, with their defaults: they enter a run's identity and
#: resume key only when set away from the default (so earlier runs keep their fingerprints and resume)
ADDED_LATER = {"eps": 1.0e-8}


@dataclass
class TrainConfig(Options):
    """How the prompts are trained (Dassl/CoOp defaults; the method's preset sets its recipe)."""

    section = "train"

    optimizer: str = option("sgd", "optimiser", choices=OPTIMIZERS)
    lr: float = option(0.002, "learning rate after warm-up", above=0, maximum=10)
    momentum: float = option(0.9, "SGD momentum", minimum=0, below=1)
    weight_decay: float = option(0.0005, "weight decay", minimum=0, maximum=1)
    eps: float = option(1.0e-8, "Adam/AdamW epsilon (Tip-Adapter-F: 1e-4)", above=0, maximum=1)
    batch_size: int = option(32, "training images per optimisation step (global batch under DDP)", minimum=1)
    epochs: int = option(5, "training epochs", minimum=1)
    epochs_by_shots: dict[int, int] | None = option(
        None,
        "epochs per shots K, e.g. {1: 50, 16: 200} (CoOp); applies unless train.epochs is set",
        minimum=1,
    )
    epochs_by_dataset: dict[str, int] | None = option(
        None, "epochs per data set, e.g. {imagenet: 50}; applies unless train.epochs is set", minimum=1
    )
    warmup_epochs: int = option(1, "epochs at the warm-up learning rate", minimum=0)
    warmup_lr: float = option(1.0e-5, "learning rate during warm-up", minimum=0, maximum=10)
    warmup_type: str = option("constant", "warm-up shape", choices=WARMUP_TYPES)
    scheduler: str = option("cosine", "learning-rate schedule after warm-up", choices=SCHEDULERS)
    precision: str = option(
        "auto", "autocast precision (auto: fp32 on CPU, bf16/fp16 on CUDA)", choices=PRECISIONS
    )
    image_features_cache: str = option(
        "off",
        "frozen image features: off | eval (exact: cache at evaluation) | train (also training, "
        "augmentation OFF -- changes the result)",
        choices=FEATURE_CACHE_MODES,
    )
    # execution only: never change what is computed
    eval_batch_size: int = option(100, "evaluation batch size", minimum=1, execution=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", execution=True)
    eval_every_epoch: bool = option(False, "also evaluate after every epoch (slower)", execution=True)
    log_every: int = option(1, "write a step record to log.jsonl every N steps", minimum=1, execution=True)
    shard_text: bool = option(False, "DDP: split the class prompts' text encoding over ranks", execution=True)
    attention: str = option(
        "auto",
        "attention implementation (exact alike, rounding differs): auto (measured once per machine and "
        "shape, recorded in env.json, reused on resume) | sdpa | plain (fixed: same on every machine)",
        choices=("auto", "sdpa", "plain"),
        execution=True,
    )


@dataclass
class DataConfig(Options):
    """Which data a run trains on."""

    section = "data"

    dataset: str | None = option(None, "data set name (`vlprompt data list`), folder:PATH or csv:PATH")
    root: str | None = option(
        None, "folder holding the data set folders (CoOp's $DATA; env VLPROMPT_DATA)", execution=True
    )
    shots: int = option(16, "training images per class (0 = the full training split)", minimum=0)
    seed: int = option(1, "seed of the few-shot picks and of training", minimum=0)
    subsample: str = option("all", "classes trained on: all | base | new", choices=SUBSAMPLES)
    skip_bad: bool = option(False, "drop unreadable images (logged with a count) instead of failing")
    listing: str = option(
        "sorted",
        "order of ImageNet's class folders: sorted (default) | os (unsorted os.listdir, as the reference "
        "toolkit; filesystem-dependent)",
        choices=("sorted", "os"),
    )
    num_workers: int = option(
        0, "data-loader worker processes (0 = load in the main process)", minimum=0, execution=True
    )
    descriptions: str | None = option(
        None,
        "class descriptions file (JSON class -> sentences, or CSV class,sentence) for methods that read "
        "them (CoPrompt); its sha256, not its path, is in the run identity",
        execution=True,
    )
    max_image_pixels: int = option(
        178_956_970,
        "largest image (width x height) that is decoded; larger files are refused as decompression "
        "bombs (skipped with skip_bad); 0 = no limit",
        minimum=0,
    )


@dataclass
class BackboneConfig(Options):
    """The frozen CLIP: an open_clip architecture with a pretrained tag, a local file, or random init."""

    section = "backbone"

    name: str | None = option("ViT-B-16", "open_clip architecture (inferred from --weights when omitted)")
    pretrained: str | None = option(
        None, "open_clip pretrained tag, e.g. openai (needs the cache or a network)"
    )
    weights: str | None = option(
        None, "local weights file: OpenAI .pt, open_clip .pt/.bin, .safetensors", execution=True
    )


SECTION_TYPES: dict[str, type[Options]] = {
    "train": TrainConfig,
    "data": DataConfig,
    "backbone": BackboneConfig,
    "model": ModelOptions,
}


@dataclass
class RunConfig(Options):
    """A fully resolved run; the object that flows from the CLI through protocols to the trainer."""

    method: str = "zeroshot"
    options: Any = None  # the method's Config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelOptions = field(default_factory=ModelOptions)
    protocol: str | None = None

    _sections: ClassVar[tuple[str, ...]] = SECTIONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": _plain(self.options) if self.options is not None else {},
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
            "backbone": self.backbone.to_dict(),
            "model": self.model.to_dict(),
            "protocol": self.protocol,
        }

    def copy(self) -> RunConfig:
        return copy.deepcopy(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config", *, partial: bool = False) -> RunConfig:
        """A validated RunConfig from a dict (a YAML file); unknown keys and bad values are errors.

        ``partial``: sections may leave out what a run needs (a data set, a backbone) -- e.g. the
        configuration of ``fit()`` on in-memory data; every value given is still checked."""
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
        return cfg if partial else validate_config(cfg)

    def but(self, **sections: Mapping[str, Any]) -> RunConfig:
        """A copy with some keys of some sections changed, e.g. ``cfg.but(train={"epochs": 2})``."""
        out = self.copy()
        for name, values in sections.items():
            if name not in ("options", *SECTION_TYPES):
                raise unknown_name("section", name, ("options", *SECTION_TYPES))
            current = getattr(out, name)
            setattr(out, name, type(current).build({**current.to_dict(), **values}, name))
        return out


# ----------------------------------------------------------------------------------------- values
def build_section(typ: type[Options], values: Mapping[str, Any], section: str) -> Any:
    """A section dataclass from ``values`` (defaults for missing keys), each value checked once."""
    return typ.build(values, section)


def build_options(method: str, options: Mapping[str, Any]) -> Any:
    """The method's Config dataclass from ``options``: unknown keys and bad values are one-line errors."""
    cls = get_method(method)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        options = _plain(options)
    if not isinstance(options, Mapping):
        raise VlpromptError(f"options must be a mapping of method '{method}' option names to values")
    try:
        return build_config(cls, dict(options))  # unknown names: one line listing the valid ones
    except (TypeError, ValueError) as e:
        raise VlpromptError(f"options for method '{method}' are invalid ({e})") from None


def describe_keys(method: str | None = None) -> list[dict[str, Any]]:
    """Every config key: ``{key, type, default, help, execution}`` (with the method's options when given)."""
    rows = [row for typ in SECTION_TYPES.values() for row in typ.describe()]
    if method is not None:
        rows += get_method(method).Config.describe("options")
    return rows


_DEFAULT_TRAIN = TrainConfig().to_dict()
#: the generic recipe as a plain dict (read-only view for scripts and tests)
DEFAULT_TRAIN: dict[str, Any] = dict(_DEFAULT_TRAIN)
DEFAULT_DATA: dict[str, Any] = DataConfig().to_dict()
DEFAULT_BACKBONE: dict[str, Any] = BackboneConfig().to_dict()


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


def dump_yaml(cfg: RunConfig | Mapping[str, Any]) -> str:
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
