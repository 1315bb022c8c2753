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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.data import MultiView, build_transform
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
    # text prompts computed from frozen CLIP's text features of the classes (TCP's class-aware tokens):
    # the model hands those features to :meth:`condition_on_classes` whenever the classes change
    class_conditioned_text: ClassVar[bool] = False
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
    # the official recipe's batch size when the preset names none; a method with one is timed by
    # ``vlprompt bench --full``, ``bench suite`` and the GPU check (None: only when asked for by name)
    bench_batch_size: ClassVar[int | None] = None
    # the official (Dassl) trainer names that mean this method (``--trainer MaPLe``, the folder of
    # ``configs/trainers/MaPLe/*.yaml``; matched without case, '-' or '_')
    dassl_trainers: ClassVar[tuple[str, ...]] = ()
    # the official trainer config's keys -> this method's options: ``N_CTX`` stands for
    # ``TRAINER.<SECTION>.N_CTX``; a key with a dot (ProGrad's ``LOSS.LAMBDA``) is that whole Dassl key
    dassl_keys: ClassVar[Mapping[str, str]] = {}
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
    # the output head and objective read the *unnormalised* features (DePT's linear probe): the model
    # then hands them in (``ModelOutput.raw_*``), and cached normalised image features cannot stand in
    raw_features: ClassVar[bool] = False
    # views of each training image the loader gives (each under its own ``view_transform``); the
    # learned features come from view 0, ``frozen_image_features`` from view ``frozen_image_view``
    views: ClassVar[int] = 1
    frozen_image_view: ClassVar[int] = 0
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

    def condition_on_classes(self, frozen_text_features: torch.Tensor) -> None:
        """Receive frozen CLIP's normalised text features (C, e) of the current classes under
        :meth:`frozen_templates` (called by the model after :meth:`prepare_text`,
        for ``class_conditioned_text`` methods only); the method keeps them for :meth:`text_inputs`."""
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

    @property
    def takes_cached_image_features(self) -> bool:
        """Cached frozen (normalised) image features give exactly what this method computes from images."""
        return not self.prompts_image and not self.raw_features

    # --- feature adapters: after the encoders, on the method's own features only ---------------
    def adapt_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The method's image features after its adapter (default: unchanged).

        Receives the L2-normalised features ``(B, e)`` of the (prompted) image tower -- or the cached
        frozen features, which are the same values for a method without image prompts, so feature
        caching stays exact -- and returns features the model L2-normalises again.  Never applied to
        frozen CLIP's features (``frozen_image_features``, zero-shot logits)."""
        return features

    def adapt_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """The method's text features after its adapter (default: unchanged): normalised ``(C, e)``
        (``(B, C, e)`` for image-conditioned text) in, features the model L2-normalises again out."""
        return features

    @property
    def adapts_image(self) -> bool:
        return type(self).adapt_image_features is not PromptMethod.adapt_image_features

    @property
    def adapts_text(self) -> bool:
        return type(self).adapt_text_features is not PromptMethod.adapt_text_features

    # --- training data --------------------------------------------------------------------------
    def view_transform(self, view: int, preprocess_cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
        """The training transform of view ``view`` (0-based; PIL image -> tensor); default: the
        backbone's train transform (RandomResizedCrop + flip) for every view."""
        return build_transform(True, **preprocess_cfg)

    def train_transform(self, preprocess_cfg: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
        """What the training loader applies to each image: one view, or ``views`` stacked as
        ``(V, 3, H, W)`` (the loader then gives ``(B, V, 3, H, W)`` batches)."""
        if self.views == 1:
            return self.view_transform(0, preprocess_cfg)
        return MultiView([self.view_transform(v, preprocess_cfg) for v in range(self.views)])

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

    def lr_multipliers(self) -> dict[str, float]:
        """``{parameter name: factor of train.lr}`` for parameters that learn at another rate (DePT's head,
        Dassl's ``STAGED_LR``); default none.  The warm-up lr is not scaled (Dassl's constant warm-up)."""
        return {}

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

        ``logits`` = ``logit_scale * image_features @ text_features.T``; the features are normalised
        (unnormalised when the method sets ``raw_features``).
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
            composed = cls.__dict__.get("Plug") is not None  # a base+plugin entry (see PlugIn)
            _PRESETS[cls] = composed_preset(cls) if composed else _read_preset(cls)
        return copy.deepcopy(_PRESETS[cls])

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"method": self.name, "config": self.cfg.to_dict(), "trainable_parameters": n}


PRESET_SECTIONS = ("method", "options", "train", "protocols")
_PRESETS: dict[type[PromptMethod], dict[str, Any]] = {}


def _read_preset(cls: type[PromptMethod]) -> dict[str, Any]:
    sections = PRESET_SECTIONS + tuple(getattr(cls, "extra_preset_sections", ()))
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
    bad = sorted(set(raw) - set(sections))
    if bad:
        raise VlpromptError(
            f"preset {path} has unknown section(s) {', '.join(map(str, bad))}; valid: {', '.join(sections)}"
        )
    if raw.get("method", cls.name) != cls.name:
        raise VlpromptError(
            f"preset {path} is for method '{raw['method']}', not '{cls.name}'; fix its 'method:' line"
        )
    for sec in ("options", "train", "protocols", *sections[len(PRESET_SECTIONS) :]):
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
    if cls.views < 1 or not 0 <= cls.frozen_image_view < cls.views:
        raise ValueError(f"{cls.__name__}: views must be >= 1 and frozen_image_view one of them")
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
    """The methods ``vlprompt bench --full``, ``vlprompt bench suite`` and the GPU check time: those whose
    entry names a bench batch size (plain ``vlprompt bench`` times CoOp, MaPLe and MPL, whose speed-ups
    have targets: ``bench/config.py``)."""
    return [c.name for c in _REGISTRY.values() if c.bench_batch_size]


def get_method(name: str) -> type[PromptMethod]:
    """The registered method ``name``; ``base+plugin`` names a plug-in over a base (see :class:`PlugIn`)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if PLUGIN_SEPARATOR in name:
        return compose(name)
    raise unknown_name("method", name, _REGISTRY)


# --- plug-ins: a method file that adds to another method -------------------------------------------
#: ``--method coop+dept``: a base method and the plug-ins stacked on it, in order
PLUGIN_SEPARATOR = "+"
_PLUGINS: dict[str, type[PlugIn]] = {}
_COMPOSED: dict[str, type[PromptMethod]] = {}


class PlugIn(PromptMethod):
    """A plug-in: adds parameters, objective terms and an output head to a *base* method (DePT).

    A plug-in is its own registered file (:func:`register_plugin`); ``base+plugin`` composes the two
    into one method class whose MRO is ``(plug-in, base)``: the base keeps its prompts, parameter
    names and hooks, the plug-in's overrides reach the base through ``super()``.  The composed entry:
    name ``coop+dept``, display ``"CoOp + DePT"``, options = the base's + the plug-in's (names must
    not clash), preset = the base's top level < the plug-in's top level < the plug-in's
    ``bases: {base: ...}`` section (the plug-in's recipe replaces the base paper's protocol sections).
    Subclasses set ``name`` (the plug-in's own), ``display_name``, ``Config`` (the plug-in's options
    only), ``supports`` (base names; empty: any) and may set ``official_added(embed_dim, classes)``.
    """

    supports: ClassVar[frozenset[str]] = frozenset()
    #: the official trainer of ``base+plugin`` is this prefix + the base's (DePT: ExtrasLinearProbeCoOp)
    dassl_trainer_prefix: ClassVar[str] = ""
    extra_preset_sections: ClassVar[tuple[str, ...]] = ("bases",)
    #: the base this composition stands on (set on the composed class)
    Base: ClassVar[type[PromptMethod] | None] = None
    #: the plug-in class of a composed entry (set on the composed class)
    Plug: ClassVar[type[PlugIn] | None] = None

    @classmethod
    def official_added(cls, embed_dim: int, n_classes: int) -> int | None:
        """Parameters the plug-in adds in its official code (the battery's ViT-B/16 count); None: unknown."""
        return None

    @classmethod
    def official_layout(cls, base: type[PromptMethod]) -> OfficialLayout | None:
        """The official checkpoint layout of ``base`` + this plug-in (``vlprompt import``); None: none."""
        return None


def register_plugin(cls: type[PlugIn]) -> type[PlugIn]:
    """Class decorator adding a plug-in (used as ``base+<name>``); it is no method on its own."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _PLUGINS[cls.name] = cls
    _PRESETS.pop(cls, None)
    for key in [k for k in _COMPOSED if k.split(PLUGIN_SEPARATOR)[-1] == cls.name]:
        del _COMPOSED[key]
    return cls


def list_plugins() -> list[str]:
    return sorted(_PLUGINS)


def get_plugin(name: str) -> type[PlugIn]:
    if name not in _PLUGINS:
        raise unknown_name("plug-in", name, _PLUGINS)
    return _PLUGINS[name]


def compose(name: str) -> type[PromptMethod]:
    """The method class of ``base+plugin[+plugin...]`` (built once per name; one-line errors)."""
    if name in _COMPOSED:
        return _COMPOSED[name]
    parts = name.split(PLUGIN_SEPARATOR)
    if any(not p for p in parts):
        raise VlpromptError(f"method '{name}' has an empty part; write BASE+PLUGIN, e.g. coop+dept")
    head, plug_name = PLUGIN_SEPARATOR.join(parts[:-1]), parts[-1]
    if plug_name not in _PLUGINS:
        if plug_name in _REGISTRY:
            raise VlpromptError(
                f"'{plug_name}' in method '{name}' is a method, not a plug-in; plug-ins: "
                f"{', '.join(list_plugins()) or 'none'}"
            )
        raise unknown_name("plug-in", plug_name, _PLUGINS)
    if head in _PLUGINS:
        raise VlpromptError(f"method '{name}' has no base method; write BASE+{head}, e.g. coop+{head}")
    base = get_method(head)
    plug = _PLUGINS[plug_name]
    base_name = base.name.split(PLUGIN_SEPARATOR)[0]
    if plug.supports and base_name not in plug.supports:
        raise VlpromptError(
            f"plug-in '{plug_name}' does not support base method '{head}' (its official combinations: "
            f"{', '.join(sorted(plug.supports))}); use e.g. {min(plug.supports)}+{plug_name}"
        )
    clash = {f.name for f in dataclasses.fields(base.Config)} & {
        f.name for f in dataclasses.fields(plug.Config)
    }
    if clash:
        raise VlpromptError(f"'{name}': options {sorted(clash)} exist in both '{head}' and '{plug_name}'")
    # built at run time, so pickled (to a grid's worker processes) by the composed name, not by class
    reduce = {"__reduce__": lambda self: (composed_config, (name, dataclasses.asdict(self)))}
    config_name = f"{base.Config.__name__}{plug.Config.__name__}"
    config = dataclass(type(config_name, (plug.Config, base.Config), reduce))
    added = plug.official_added(512, 2)
    attrs: dict[str, Any] = {
        "__module__": plug.__module__,
        "__qualname__": f"{base.__name__}{plug.__name__}",
        "name": f"{base.name}{PLUGIN_SEPARATOR}{plug.name}",
        "display_name": f"{base.label()} + {plug.label()}",
        "paper_name": "",
        "Config": config,
        "summary": f"{base.label()} + {plug.summary}",
        "Base": base,
        "Plug": plug,
        "official": plug.official_layout(base),
        "official_parameters": (
            None if base.official_parameters is None or added is None else base.official_parameters + added
        ),
        "bench_batch_size": None,
        "preset_file": "",
        "dassl_trainers": tuple(plug.dassl_trainer_prefix + t for t in base.dassl_trainers)
        if plug.dassl_trainer_prefix
        else (),
    }
    cls = type(attrs["__qualname__"], (plug, base), attrs)
    _COMPOSED[name] = cls
    if cls.name != name:  # e.g. an alias of the base: cache under both
        _COMPOSED[cls.name] = cls
    return cls


def composed_config(name: str, values: dict[str, Any]) -> MethodConfig:
    """The options of composed method ``name`` from their values (how such options are unpickled)."""
    return compose(name).Config(**values)


def composed_preset(cls: type[PromptMethod]) -> dict[str, Any]:
    """A composed entry's preset: base top level < plug-in top level < plug-in ``bases[base]``."""
    base, plug = cls.Base, cls.Plug  # type: ignore[attr-defined]
    b, p = base.preset(), plug.preset()
    own = (p.get("bases") or {}).get(base.name) or {}
    out: dict[str, Any] = {"method": cls.name}
    for sec in ("options", "train"):
        out[sec] = {**(b.get(sec) or {}), **(p.get(sec) or {}), **(own.get(sec) or {})}
    protocols = own.get("protocols", p.get("protocols")) or {}
    out["protocols"] = copy.deepcopy(protocols)
    return out


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
