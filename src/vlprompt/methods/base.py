"""The method contract and registry.

A method is a small registered module: a config dataclass (defaults = the official recipe), its
learnable parameters, and functions returning the prompt *plan* for each tower.  Optionally it
defines its training **objective** over the model's typed output (default: cross-entropy), the
frozen-CLIP entries that objective ``needs``, and **training hooks**: a custom ``backward`` (e.g.
gradient projection), ``on_epoch_end`` (e.g. prompt aggregation) and the hook state that makes
resume exact.  The trainer calls these and knows no method by name.  A method contains no
transformer code, no training loop and no data handling; methods never import each other (shared
pieces live in :mod:`vlprompt.methods.common`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import TowerPlan
from vlprompt.errors import VlpromptError, unknown_name
from vlprompt.methods.common import ClassPrompts
from vlprompt.methods.output import FROZEN_NEEDS, ModelOutput, TextInputs

#: ``backprop(loss, retain_graph=False)``: the trainer's backward (loss scaling + DDP gradient reduction)
Backprop = Callable[..., None]

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
    # frozen-CLIP entries of ModelOutput the objective reads (subset of output.FROZEN_NEEDS)
    needs: ClassVar[frozenset[str]] = frozenset()

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

    # --- frozen reference (for regularised objectives) -------------------------------------
    def frozen_templates(self, template: str) -> Sequence[str]:
        """Hand-crafted templates whose frozen CLIP text features the objective compares against
        (default: the data set's template; several are averaged, see ``PromptModel.frozen_text_features``)."""
        return [template]

    def frozen_prompts(self, backbone: Backbone, classnames: list[str], template: str) -> TextInputs:
        """Token embeddings of ``template`` filled with each class name (frozen CLIP, no prompts)."""
        p = ClassPrompts(backbone, classnames, [("text", template)]).to(backbone.device)
        return TextInputs(p.embeds, p.eot)

    # --- objective and training hooks ---------------------------------------------------------
    def objective(
        self, out: ModelOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to minimise, {term: value})``; every term is logged per step.  Default: cross-entropy."""
        ce = F.cross_entropy(out.logits.float(), labels)
        return ce, {"ce": ce}

    def backward(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        params: list[nn.Parameter],
        backprop: Backprop,
    ) -> None:
        """Fill ``p.grad`` of ``params`` (the trainer zeroed them and steps the optimizer afterwards).

        ``backprop(t, retain_graph=False)`` back-propagates ``t`` with the trainer's loss scaling and
        DDP gradient reduction.  Default: ``backprop(loss)``; ProGrad projects one gradient on another."""
        backprop(loss)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called after the last step of epoch ``epoch`` (1-based) of ``epochs``, before evaluation and
        the checkpoint (PromptSRC accumulates its prompt aggregate here)."""

    def hook_state_dict(self) -> dict[str, Any]:
        """State the hooks carry between epochs (tensors and JSON-able values only): checkpointed so
        that a resumed run continues exactly."""
        return {}

    def load_hook_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`hook_state_dict` (on resume)."""
        if state:
            raise VlpromptError(
                f"checkpoint carries training-hook state {sorted(state)[:3]} that method '{self.name}' does "
                "not define; resume with the method that wrote it"
            )

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"method": self.name, "config": self.cfg.to_dict(), "trainable_parameters": n}


def register_method(cls: type[PromptMethod]) -> type[PromptMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    bad_needs = set(cls.needs) - FROZEN_NEEDS
    if bad_needs:
        raise ValueError(
            f"{cls.__name__}.needs has unknown entries {sorted(bad_needs)}; use {sorted(FROZEN_NEEDS)}"
        )
    reserved = {"method", "backbone", "classnames", "template"} & {
        f.name for f in dataclasses.fields(cls.Config)
    }
    if reserved:  # these are create_model()'s own arguments; an option of that name could never be passed
        raise ValueError(f"{cls.__name__}.Config uses reserved option name(s) {sorted(reserved)}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import vlprompt.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in {"base", "common", "model", "output"} and not mod.name.startswith("_"):
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
