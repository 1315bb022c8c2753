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

import contextlib
import copy
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import TowerPlan
from vlprompt.errors import VlpromptError, unknown_name
from vlprompt.methods.common import ClassPrompts
from vlprompt.methods.official import OfficialLayout
from vlprompt.methods.output import FROZEN_NEEDS, ModelOutput, TextInputs
from vlprompt.options import Options, option

#: ``backprop(loss, retain_graph=False)``: the trainer's backward (loss scaling + DDP gradient reduction)
Backprop = Callable[..., None]

_REGISTRY: dict[str, type[PromptMethod]] = {}


#: a method option: the same descriptor as every configuration key (type, default, range or choices,
#: help); ``vlprompt config show --method M`` prints the help.  Use it for every field of a Config.
opt = option


def option_help(cls: type[MethodConfig]) -> dict[str, str]:
    """``{field: help}`` of a method's Config (empty help where a field has none)."""
    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


@dataclass
class MethodConfig(Options):
    """Base of every method's options; subclasses add fields with the official defaults.

    Values are checked when the config is built (types, ranges, choices: see ``vlprompt.options``);
    a method checks in ``__init__`` only what depends on the backbone or on several options at once.
    """

    section: ClassVar[str] = "options"


class PromptMethod(nn.Module):
    """Base class: learnable prompts + the plans that tell the engine where they go.

    Subclasses set ``name``, ``Config`` and (for CoCoOp-like methods) ``image_conditioned_text``,
    build their parameters in ``__init__`` from the backbone's dimensions, and implement
    :meth:`prepare_text`, :meth:`text_inputs` and (when they prompt the image tower) :meth:`image_plan`.
    """

    # --- the registry entry: everything the rest of the package knows about a method ---------------
    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    image_conditioned_text: ClassVar[bool] = False  # text side depends on the image (CoCoOp)
    # text side depends on no parameter (fixed class prompts: Tip-Adapter): its features are computed
    # once per class set, in training too (exact)
    static_text: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    # the name tables, plots and reports show (default: ``name``); a reconstruction says so in it
    display_name: ClassVar[str] = ""
    # the name the methods' papers print in their tables (protocols.reference); default display_name
    paper_name: ClassVar[str] = ""
    # trainable parameters of the official code at ViT-B/16 with the default options (None: no
    # official code to count, e.g. a reconstruction); the method battery checks ours against it
    official_parameters: ClassVar[int | None] = None
    # a one-line provenance note when the method is our reading rather than published code (DPL): the
    # run layer writes ``reconstructed: true`` + this note into every artefact of such a method
    reconstruction_note: ClassVar[str] = ""
    # a one-line note when training sees unlabelled images of the classes it is tested on: the run
    # layer writes ``transductive: true`` + this note into every artefact of such a method
    transductive_note: ClassVar[str] = ""
    # the official recipe's batch size when ``vlprompt bench`` times this method by default (None: the
    # bench leaves it out unless asked for by name; it then uses the preset's batch size)
    bench_batch_size: ClassVar[int | None] = None
    # the preset file, relative to the folder of the module defining the method; default
    # ``presets/<name>.yaml`` (a method without one trains with the generic recipe)
    preset_file: ClassVar[str] = ""
    # a one-line note when the trainable count depends on the training set (a cache built from it):
    # ``vlprompt methods --count`` prints it beside the count of the unbuilt method
    trainable_note: ClassVar[str] = ""
    # frozen-CLIP entries of ModelOutput the objective reads (subset of output.FROZEN_NEEDS)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the official checkpoint's layout and its mapping to this method's parameters (``vlprompt import``)
    official: ClassVar[OfficialLayout | None] = None
    # the class features are the frozen teacher's text features (PromptKD's pre-stored teacher text):
    # the method runs no text tower of its own and needs a teacher (PromptModel.set_teacher)
    text_from_teacher: ClassVar[bool] = False

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
        return type(self).image_plan is not PromptMethod.image_plan or self.has_image_head

    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        """The learned image features from the image tower's raw output ``(B, e)``, before
        normalisation (PromptKD's projector into the teacher's width).  Default: unchanged; never
        applied to the frozen-CLIP features."""
        return features

    @property
    def has_image_head(self) -> bool:
        return type(self).image_head is not PromptMethod.image_head

    # --- a second frozen model: the teacher ------------------------------------------------------
    @classmethod
    def teacher_source(cls, cfg: MethodConfig) -> str:
        """The saved prompt (run directory, ``prompt.safetensors``, export, ``hf-hub:`` reference) of
        the frozen teacher this method learns from, ``""`` for none.  The run layer loads it with
        ``load_prompt`` (its own backbone, e.g. ViT-L/14), freezes it and hands it to
        :meth:`PromptModel.set_teacher`; its file's sha256 enters the run's fingerprint."""
        return ""

    def check_teacher(self, teacher: Any) -> None:
        """Refuse, in one line, a teacher (a PromptModel) this method cannot learn from (e.g. another
        feature width than its projector's).  Default: any."""

    @property
    def needs_teacher(self) -> bool:
        return self.text_from_teacher or "teacher_logits" in self.needs

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

    # --- feature-level head and construction from the training set ---------------------------------
    def output_head(
        self, logits: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """Logits after a head on the features (cache model, adapter); default: unchanged.

        ``logits`` = ``logit_scale * image_features @ text_features.T``; the features are normalised.
        Applied by :meth:`PromptModel.run` and ``forward`` alike, never to the frozen zero-shot logits."""
        return logits

    def build(self, model: Any, loader: Iterable[Any]) -> None:
        """Fill the method's state from the training set before any optimisation (Tip-Adapter's cache).

        The trainer calls it once, under ``no_grad``, with the training set **in order** under the
        training transform (each pass over ``loader`` draws new augmentations); a method whose
        parameters are all built here and none trained by SGD has no trainable parameters after it,
        and the trainer then runs no epochs (a training-free method)."""

    @property
    def builds_from_data(self) -> bool:
        return type(self).build is not PromptMethod.build

    # --- registry entry, read by the run layer, protocols, reports and the bench -------------------
    @classmethod
    def label(cls) -> str:
        """The display name (``name`` when the method sets none)."""
        return cls.display_name or cls.name

    @classmethod
    def provenance(cls) -> dict[str, Any]:
        """What every artefact of a run of this method carries: ``reconstructed`` / ``transductive`` notes."""
        out: dict[str, Any] = {}
        if cls.reconstruction_note:
            out.update({"reconstructed": True, "note": cls.reconstruction_note})
        if cls.transductive_note:
            out.update({"transductive": True, "transductive_note": cls.transductive_note})
        return out

    @property
    def transductive(self) -> bool:
        """Training sees unlabelled images of the classes it is tested on (which ones: the protocol's
        rule, ``vlprompt.data.subsample.unlabelled_pool``)."""
        return bool(type(self).transductive_note)

    @classmethod
    def preset_path(cls) -> Path:
        """Where the method's preset lives (beside the module that defines it)."""
        module = sys.modules[cls.__module__]
        folder = Path(str(module.__file__)).resolve().parent
        return folder / (cls.preset_file or f"presets/{cls.name}.yaml")

    @classmethod
    def preset(cls) -> dict[str, Any]:
        """The preset file's sections (``method``, ``options``, ``train``, ``protocols``), read once and
        checked once; ``{}`` when the method has no preset.  Callers get a copy."""
        if cls not in _PRESETS:
            _PRESETS[cls] = _read_preset(cls)
        return copy.deepcopy(_PRESETS[cls])

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"method": self.name, "config": self.cfg.to_dict(), "trainable_parameters": n}


PRESET_SECTIONS = ("method", "options", "train", "protocols")
_PRESETS: dict[type[PromptMethod], dict[str, Any]] = {}


def _read_preset(cls: type[PromptMethod]) -> dict[str, Any]:
    path = cls.preset_path()
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise VlpromptError(f"cannot read preset {path} ({type(e).__name__}); check the file") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VlpromptError(f"preset {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(raw, dict):
        raise VlpromptError(f"preset {path} must hold a mapping of sections, not {type(raw).__name__}")
    bad = sorted(set(raw) - set(PRESET_SECTIONS))
    if bad:
        raise VlpromptError(
            f"preset {path} has unknown section(s) {', '.join(map(str, bad))}; "
            f"valid: {', '.join(PRESET_SECTIONS)}"
        )
    if raw.get("method", cls.name) != cls.name:
        raise VlpromptError(
            f"preset {path} is for method '{raw['method']}', not '{cls.name}'; fix its 'method:' line"
        )
    for sec in ("options", "train", "protocols"):
        if not isinstance(raw.get(sec) or {}, dict):
            raise VlpromptError(f"preset {path}: section '{sec}' must be a mapping of keys")
    return raw


def register_method(cls: type[PromptMethod]) -> type[PromptMethod]:
    """Class decorator adding a method to the registry under ``cls.name``.

    The package's own methods are registered by the import list in ``vlprompt/methods/__init__.py``;
    a method defined elsewhere (a script, a plug-in, a test) is registered by importing its module.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    bad_needs = set(cls.needs) - FROZEN_NEEDS
    if bad_needs:
        raise ValueError(
            f"{cls.__name__}.needs has unknown entries {sorted(bad_needs)}; use {sorted(FROZEN_NEEDS)}"
        )
    reserved = {"method", "backbone", "classnames", "template", "model"} & {
        f.name for f in dataclasses.fields(cls.Config)
    }
    if reserved:  # these are create_model()'s own arguments; an option of that name could never be passed
        raise ValueError(f"{cls.__name__}.Config uses reserved option name(s) {sorted(reserved)}")
    _REGISTRY[cls.name] = cls
    _PRESETS.pop(cls, None)
    return cls


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (a method registered for the duration of a test or a script)."""
    cls = _REGISTRY.pop(name, None)
    _PRESETS.pop(cls, None)  # type: ignore[arg-type]


@contextlib.contextmanager
def registered(cls: type[PromptMethod]) -> Iterator[type[PromptMethod]]:
    """``cls`` registered for the duration of the block (and the former entry of its name restored)."""
    before = _REGISTRY.get(cls.name)
    register_method(cls)
    try:
        yield cls
    finally:
        unregister_method(cls.name)
        if before is not None:
            _REGISTRY[before.name] = before


def list_methods() -> list[str]:
    """Names of every registered method (sorted)."""
    return sorted(_REGISTRY)


def registered_methods() -> list[type[PromptMethod]]:
    """Every registered method class, in registration order (the package's list first)."""
    return list(_REGISTRY.values())


def bench_methods() -> list[str]:
    """The methods ``vlprompt bench`` times by default: those whose entry names a bench batch size."""
    return [c.name for c in _REGISTRY.values() if c.bench_batch_size]


def get_method(name: str) -> type[PromptMethod]:
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
