"""The method contract and registry.

A method is a small registered module: a config dataclass (defaults = the official recipe), its
learnable parameters, and functions returning the prompt *plan* for each tower.  It contains no
transformer code, no training loop and no data handling; methods never import each other (shared
pieces live in :mod:`vlprompt.methods.common`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import TowerPlan
from vlprompt.errors import VlpromptError, unknown_name

_REGISTRY: dict[str, type[PromptMethod]] = {}


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A method option: its default (the official recipe) and a one-line help string.

    ``vlprompt config show --method M`` prints the help; use it for every field of a method's Config.
    Mutable defaults (lists, dicts) are wrapped in a ``default_factory``.
    """
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def option_help(cls: type[MethodConfig]) -> dict[str, str]:
    """``{field: help}`` of a method's Config (empty help where a field has none)."""
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


@dataclass
class MethodConfig:
    """Base of every method's options; subclasses add fields with the official defaults."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TextInputs:
    """What the text tower runs: layer-0 embeddings (N, L, d), end-of-text positions (N,) and a plan."""

    embeds: torch.Tensor
    eot: torch.Tensor
    plan: TowerPlan | None = None


class PromptMethod(nn.Module):
    """Base class: learnable prompts + the plans that tell the engine where they go.

    Subclasses set ``name``, ``Config`` and (for CoCoOp-like methods) ``image_conditioned_text``,
    build their parameters in ``__init__`` from the backbone's dimensions, and implement
    :meth:`prepare_text`, :meth:`text_inputs` and (when they prompt the image tower) :meth:`image_plan`.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    image_conditioned_text: ClassVar[bool] = False  # text side depends on the image (CoCoOp)
    summary: ClassVar[str] = ""
    # a one-line provenance note when the method is our reading rather than published code (DPL): the
    # run layer writes ``reconstructed: true`` + this note into every artefact of such a method
    reconstruction_note: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg

    # --- text tower ---------------------------------------------------------------------------
    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        """Tokenize the class prompts for ``classnames`` (called again whenever the classes change)."""
        raise NotImplementedError

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        """Layer-0 embeddings and plan for the text tower (``image_features``: (B, e), normalised)."""
        raise NotImplementedError

    # --- image tower --------------------------------------------------------------------------
    def image_plan(self) -> TowerPlan | None:
        """Prompt plan for the image tower; ``None`` runs frozen CLIP (features may then be cached)."""
        return None

    @property
    def prompts_image(self) -> bool:
        return type(self).image_plan is not PromptMethod.image_plan

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"method": self.name, "config": self.cfg.to_dict(), "trainable_parameters": n}


def register_method(cls: type[PromptMethod]) -> type[PromptMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    reserved = {"method", "backbone", "classnames", "template"} & {
        f.name for f in dataclasses.fields(cls.Config)
    }
    if reserved:  # these are create_model()'s own arguments; an option of that name could never be passed
        raise ValueError(f"{cls.__name__}.Config uses reserved option name(s) {sorted(reserved)}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import importlib
    import pkgutil

    import vlprompt.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in {"base", "common", "model"} and not mod.name.startswith("_"):
            importlib.import_module(f"vlprompt.methods.{mod.name}")


def list_methods() -> list[str]:
    """Names of every registered method."""
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[PromptMethod]:
    _load_all()
    if name not in _REGISTRY:
        raise unknown_name("method", name, _REGISTRY)
    return _REGISTRY[name]


def build_config(cls: type[PromptMethod], options: dict[str, Any]) -> MethodConfig:
    """The method's config from ``options``; unknown keys are an error naming the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    bad = [k for k in options if k not in fields]
    if bad:
        valid = ", ".join(sorted(fields)) or "none"
        raise VlpromptError(
            f"unknown option(s) {', '.join(bad)} for method '{cls.name}'; valid options: {valid}"
        )
    return cls.Config(**options)
