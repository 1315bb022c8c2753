"""DPL -- Decoupled Prompt Learning **[reconstructed from the paper's abstract]**.

No public source describes the method beyond its abstract.  What is taken from the abstract: attention
over ``[instances; prompts]`` is decoupled into four sub-processes (I->I, I->P, P->I, P->P) that are
then strengthened; prompts are language-conditioned on the text side; training uses plain
cross-entropy with no auxiliary loss or extra data.  Everything else here is *our* reconstruction
(see docs/dpl.md), each piece a config switch:

- image tower: ``n_prompts_image`` prompts appended at layer 0 (before ``ln_pre``, or after it with
  ``image_insert="after_ln_pre"``) and renewed at layers 1..J-1; every prompted layer uses decoupled
  attention (:mod:`vlprompt.engine.decoupled`); the last prompts are carried on through blocks >= J,
  each of which reads them through a gate of its own (``after_depth="remove"``: all prompts are
  removed before block J, so blocks >= J are frozen CLIP over the instances);
- text tower: the hand-crafted template is the instance stream, unchanged (causal, same positions);
  ``n_prompts_text`` prompts form a separate appended stream that reads every instance token up to
  end-of-text non-causally (P->I, conditioned on the class name); instances read prompts only
  through the gated I->P term, so a closed gate gives zero-shot CLIP's text feature exactly;
- A1 ``mode="gated"``: learnable gate ``alpha = sigmoid(a)`` per layer (``gate="layer"``) or head,
  ``alpha_init`` 0.05; ``mode="exact"`` uses the data-dependent gate (= standard attention);
- A2 ``carry``: ``P_{l+1} = beta * O_p^l + (1 - beta) * P_new`` (beta 0.01, optionally learnable);
- A3 ``drop_pp``: prompts attend only to instances;
- ``prompts_first``: instance rows read the prompts as updated in the same layer; ``init="uniform"``:
  ProVP's U(-v, v) init; ``alpha_init="auto"``: gates start at the measured exact share.

The ProVP-style recipe (the authors' earlier code: 16 prompts on all 12 layers after ``ln_pre``,
uniform init, SGD lr 0.1, batch 32) is ``methods/presets/dpl-provp.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.backbones.backbone import TowerDims
from vlprompt.engine import ALL, LayerOps, TowerPlan
from vlprompt.engine.decoupled import AUTO, GATES, MODES, DecoupledAttention
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts, normal_prompts, validate_depth

RECONSTRUCTED = "reconstructed from the paper's abstract"


INSERTS = ("before_ln_pre", "after_ln_pre")
AFTER_DEPTH = ("remove", "keep")
INITS = ("normal", "uniform")


@dataclass
class _DecoupledOptions(MethodConfig):
    """Options shared by dpl, dpl-visual and dpl-text.  All defaults are ours (reconstruction)."""

    mode: str = opt(
        "gated",
        "A1 (ours): 'gated' = learnable gate alpha on I->P; 'exact' = standard attention",
        choices=MODES,
    )
    gate: str = opt(
        "layer",
        "A1 gate granularity (ours): one alpha per prompted layer, or per head ('head')",
        choices=GATES,
    )
    alpha_init: float | str = opt(
        0.05,
        "initial alpha = sigmoid(a) (ours: small, near zero-shot CLIP); 'auto' = each layer's mean exact "
        "I->P share on the first batch the model sees",
    )
    gate_closed: bool = opt(False, "alpha = 0 exactly: instances never read prompts (diagnostic)")
    carry: bool = opt(True, "A2 (ours): P_l = beta * O_p^(l-1) + (1 - beta) * P_new_l at renewed layers")
    beta: float = opt(0.01, "A2 blend weight (ProVP's value for the same blend)")
    beta_learnable: bool = opt(False, "learn beta = sigmoid(b) per tower, initialised at beta")
    drop_pp: bool = opt(False, "A3 (ours): prompts attend only to instances (no P->P)")
    prompts_first: bool = opt(
        False,
        "our reading: prompt rows are updated first and instance rows read the updated prompts in the "
        "same layer (P->I reaches the instances without the carry); false = one joint update",
    )
    after_depth: str = opt(
        "keep",
        "our reading: after the last prompted layer 'keep' the prompts (carried on, read through a gate of "
        "their own at every later layer, as VPT-deep/MaPLe/ProVP keep theirs) or 'remove' them all "
        "(later blocks = frozen CLIP)",
        choices=AFTER_DEPTH,
    )
    init: str = opt(
        "normal", "our reading: 'normal' N(0, init_std^2) or 'uniform' U(-v, v) as ProVP/VPT", choices=INITS
    )
    init_std: float = opt(0.02, "std of the 'normal' prompt init (ours)", above=0)
    text: str = opt("", "text instance stream; '' = the data set's hand-crafted template")


@dataclass
class DPLVisualConfig(_DecoupledOptions):
    n_prompts_image: int = opt(4, "visual prompts per prompted layer (ours)")
    depth_image: int = opt(9, "prompted image layers J, 1..all layers (ours; ProVP prompts all 12)")
    image_insert: str = opt(
        "before_ln_pre",
        "our reading: layer-0 image prompts enter 'before_ln_pre' (normalised with the patches, as "
        "MaPLe/MPL) or 'after_ln_pre' (as ProVP's code)",
        choices=INSERTS,
    )


@dataclass
class DPLTextConfig(_DecoupledOptions):
    n_prompts_text: int = opt(4, "text prompts per prompted layer (ours)")
    depth_text: int = opt(9, "prompted text layers J, 1..all layers (ours)")


@dataclass
class DPLConfig(DPLVisualConfig, DPLTextConfig):
    pass


def _check(cfg: _DecoupledOptions) -> None:
    """What the options' descriptors cannot say: checks across options."""
    if cfg.alpha_init == AUTO:
        if cfg.mode != "gated":
            raise VlpromptError("alpha_init='auto' needs mode='gated'; mode 'exact' has no gate")
    elif isinstance(cfg.alpha_init, bool) or not isinstance(cfg.alpha_init, (int, float)):
        raise VlpromptError(f"alpha_init={cfg.alpha_init!r} is not a number; e.g. 0.05 or 'auto'")
    elif not 0.0 < cfg.alpha_init < 1.0:
        raise VlpromptError(f"alpha_init={cfg.alpha_init} must lie strictly between 0 and 1; e.g. 0.05")
    lo_ok = cfg.beta > 0.0 if cfg.beta_learnable else cfg.beta >= 0.0
    hi_ok = cfg.beta < 1.0 if cfg.beta_learnable else cfg.beta <= 1.0
    if not (lo_ok and hi_ok):
        raise VlpromptError(
            f"beta={cfg.beta} is outside {'(0, 1)' if cfg.beta_learnable else '[0, 1]'}; e.g. 0.01"
        )


def uniform_bound(patch: int, width: int) -> float:
    """ProVP's/VPT's prompt init bound ``v = sqrt(6 / (3 * patch^2 + width))``."""
    return math.sqrt(6.0 / (3 * patch * patch + width))


class DecoupledPromptStream(nn.Module):
    """One tower's DPL prompts: ``depth`` layers x ``n`` prompts, one gate per layer, optional beta.

    :meth:`plan` returns the tower plan: layer-0 prompts (before ``ln_pre`` as ``shallow``, or after it
    as a layer-0 append), renewal (A2 blend or plain replacement) at layers 1..depth-1, every prompted
    layer with its own decoupled attention, then either removal of all prompts before block ``depth``
    (the remaining blocks are frozen CLIP) or, with ``after_depth="keep"``, the prompts carried on
    through the remaining blocks, each with a gate of its own.
    """

    def __init__(
        self,
        cfg: _DecoupledOptions,
        n: int,
        depth: int,
        dims: TowerDims,
        tower: str,
        *,
        after_ln_pre: bool = False,
        patch: int | None = None,
    ):
        super().__init__()
        validate_depth(depth, dims.layers, tower)
        if n < 1:
            raise VlpromptError(f"the {tower} tower needs at least 1 prompt per layer, got {n}")
        self.depth, self.n_layers = depth, dims.layers
        self.carry, self.keep, self.after_ln_pre = cfg.carry, cfg.after_depth == "keep", after_ln_pre
        if cfg.init == "uniform":
            v = uniform_bound(int(patch or 16), dims.width)
            self.prompts = nn.Parameter(torch.empty(depth, n, dims.width).uniform_(-v, v))
        else:
            self.prompts = normal_prompts(depth, n, dims.width, std=cfg.init_std)
        n_gates = dims.layers if self.keep else depth
        self.gates = nn.ModuleList(
            DecoupledAttention(
                dims.heads,
                mode=cfg.mode,
                gate=cfg.gate,
                alpha_init=cfg.alpha_init,
                gate_closed=cfg.gate_closed,
                drop_pp=cfg.drop_pp,
                prompts_first=cfg.prompts_first,
            )
            for _ in range(n_gates)
        )
        self.beta_fixed = float(cfg.beta)
        if cfg.carry and cfg.beta_learnable and depth > 1:
            self.beta_logit = nn.Parameter(torch.tensor([math.log(cfg.beta / (1.0 - cfg.beta))]))
        else:
            self.register_parameter("beta_logit", None)

    @property
    def beta(self) -> float | torch.Tensor:
        return self.beta_fixed if self.beta_logit is None else torch.sigmoid(self.beta_logit)

    def plan(self) -> TowerPlan:
        blend = self.beta if self.carry else None
        if self.after_ln_pre:  # appended before block 0, i.e. after ln_pre
            layers = {0: LayerOps(append=self.prompts[0], attention=self.gates[0])}
            shallow = None
        else:
            layers = {0: LayerOps(attention=self.gates[0])}
            shallow = self.prompts[0]
        for layer in range(1, self.depth):
            layers[layer] = LayerOps(
                remove=ALL, append=self.prompts[layer], blend=blend, attention=self.gates[layer]
            )
        for layer in range(self.depth, self.n_layers):
            if self.keep:  # the last prompts' outputs go on through the remaining blocks
                layers[layer] = LayerOps(attention=self.gates[layer])
            elif layer == self.depth:
                layers[layer] = LayerOps(remove=ALL)
        return TowerPlan(shallow=shallow, layers=layers)


class _DPLBase(PromptMethod):
    """Shared body: the text instance stream is the hand-crafted template; streams per config."""

    reconstruction_note = f"DPL is {RECONSTRUCTED}"

    def __init__(self, cfg: _DecoupledOptions, backbone: Backbone):
        super().__init__(cfg, backbone)
        _check(cfg)
        self.visual: DecoupledPromptStream | None = None
        self.textual: DecoupledPromptStream | None = None
        if isinstance(cfg, DPLVisualConfig):
            patch = None
            if cfg.init == "uniform":
                patch = int(backbone.clip.visual.conv1.kernel_size[0])
            self.visual = DecoupledPromptStream(
                cfg,
                cfg.n_prompts_image,
                cfg.depth_image,
                backbone.image,
                "image",
                after_ln_pre=cfg.image_insert == "after_ln_pre",
                patch=patch,
            )
        if isinstance(cfg, DPLTextConfig):
            patch = None
            if cfg.init == "uniform":  # the formula's patch is the image tower's for both towers (ours)
                patch = int(backbone.clip.visual.conv1.kernel_size[0])
            self.textual = DecoupledPromptStream(
                cfg, cfg.n_prompts_text, cfg.depth_text, backbone.text, "text", patch=patch
            )

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.classes = ClassPrompts(backbone, classnames, [("text", self.cfg.text or template)])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        plan = self.textual.plan() if self.textual is not None else None
        return TextInputs(self.classes.embeds, self.classes.eot, plan)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reconstructed": True, "note": self.reconstruction_note}


def _image_plan(self: _DPLBase) -> TowerPlan | None:
    return self.visual.plan()


@register_method
class DPL(_DPLBase):
    name = "dpl"
    display_name = f"DPL ({RECONSTRUCTED})"
    bench_batch_size = 4
    Config = DPLConfig
    summary = (
        f"DPL [{RECONSTRUCTED}]: decoupled attention with gated visual prompts and "
        "language-conditioned text prompts (ours: 4 prompts, depth 9, alpha 0.05, carry beta 0.01, kept)"
    )
    image_plan = _image_plan


@register_method
class DPLVisual(_DPLBase):
    name = "dpl-visual"
    display_name = f"DPL-visual ({RECONSTRUCTED})"
    Config = DPLVisualConfig
    summary = f"DPL visual prompts only [{RECONSTRUCTED}]; text = the hand-crafted template"
    image_plan = _image_plan


@register_method
class DPLText(_DPLBase):
    name = "dpl-text"
    display_name = f"DPL-text ({RECONSTRUCTED})"
    Config = DPLTextConfig
    summary = f"DPL language-conditioned text prompts only [{RECONSTRUCTED}]; image tower = frozen CLIP"
