"""DPL -- Decoupled Prompt Learning **[reconstructed from the paper's abstract]**.

The paper's method section is not available offline.  What is taken from its abstract: attention
over ``[instances; prompts]`` is decoupled into four sub-processes (I->I, I->P, P->I, P->P) that are
then strengthened; prompts are language-conditioned on the text side; training uses plain
cross-entropy with no auxiliary loss or extra data.  Everything else here is *our* reconstruction
(see docs/dpl.md), each piece a config switch:

- image tower: ``n_prompts_image`` prompts appended at layer 0 (before ``ln_pre``) and renewed at
  layers 1..J-1; every prompted layer uses decoupled attention (:mod:`vlprompt.engine.decoupled`);
  all prompts are removed before block J, so blocks >= J are frozen CLIP over the instances;
- text tower: the hand-crafted template is the instance stream, unchanged (causal, same positions);
  ``n_prompts_text`` prompts form a separate appended stream that reads every instance token up to
  end-of-text non-causally (P->I, conditioned on the class name); instances read prompts only
  through the gated I->P term, so a closed gate gives zero-shot CLIP's text feature exactly;
- A1 ``mode="gated"``: learnable gate ``alpha = sigmoid(a)`` per layer (``gate="layer"``) or head,
  ``alpha_init`` 0.05; ``mode="exact"`` uses the data-dependent gate (= standard attention);
- A2 ``carry``: ``P_{l+1} = beta * O_p^l + (1 - beta) * P_new`` (beta 0.01, optionally learnable);
- A3 ``drop_pp``: prompts attend only to instances.
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
from vlprompt.engine.decoupled import GATES, MODES, DecoupledAttention
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, register_method
from vlprompt.methods.common import ClassPrompts, normal_prompts, validate_depth

RECONSTRUCTED = "reconstructed from the paper's abstract"


@dataclass
class _DecoupledOptions(MethodConfig):
    """Options shared by dpl, dpl-visual and dpl-text.  All defaults are ours (reconstruction)."""

    mode: str = "gated"  # "gated" (A1: learnable gate alpha) | "exact" (data-dependent gate = standard attn)
    gate: str = "layer"  # A1 gate granularity: one alpha per layer, or per head ("head")
    alpha_init: float = 0.05  # initial alpha = sigmoid(a); small so training starts near zero-shot CLIP
    gate_closed: bool = False  # alpha = 0 exactly: instances never read prompts (diagnostic / ablation)
    carry: bool = True  # A2: blend the previous layer's prompt outputs into the new prompts
    beta: float = 0.01  # A2 blend weight (ProVP's value)
    beta_learnable: bool = False  # learn beta = sigmoid(b) per tower, initialised at ``beta``
    drop_pp: bool = False  # A3: prompts attend only to instances (no P->P)
    init_std: float = 0.02  # prompts ~ N(0, init_std^2)
    text: str = ""  # text instance stream; "" = the data set's hand-crafted template


@dataclass
class DPLVisualConfig(_DecoupledOptions):
    n_prompts_image: int = 4  # visual prompts per prompted layer (ours)
    depth_image: int = 9  # prompted image layers J (ours)


@dataclass
class DPLTextConfig(_DecoupledOptions):
    n_prompts_text: int = 4  # text prompts per prompted layer (ours)
    depth_text: int = 9  # prompted text layers J (ours)


@dataclass
class DPLConfig(DPLVisualConfig, DPLTextConfig):
    pass


def _check(cfg: _DecoupledOptions) -> None:
    if cfg.mode not in MODES:
        raise VlpromptError(f"unknown DPL mode '{cfg.mode}'; use one of {', '.join(MODES)}")
    if cfg.gate not in GATES:
        raise VlpromptError(f"unknown DPL gate '{cfg.gate}'; use one of {', '.join(GATES)}")
    if not 0.0 < cfg.alpha_init < 1.0:
        raise VlpromptError(f"alpha_init={cfg.alpha_init} must lie strictly between 0 and 1; e.g. 0.05")
    lo_ok = cfg.beta > 0.0 if cfg.beta_learnable else cfg.beta >= 0.0
    hi_ok = cfg.beta < 1.0 if cfg.beta_learnable else cfg.beta <= 1.0
    if not (lo_ok and hi_ok):
        raise VlpromptError(
            f"beta={cfg.beta} is outside {'(0, 1)' if cfg.beta_learnable else '[0, 1]'}; e.g. 0.01"
        )
    if cfg.init_std <= 0:
        raise VlpromptError(f"init_std={cfg.init_std} must be positive; e.g. 0.02")


class DecoupledPromptStream(nn.Module):
    """One tower's DPL prompts: ``depth`` layers x ``n`` prompts, one gate per layer, optional beta.

    :meth:`plan` returns the tower plan: shallow prompts before block 0, renewal (A2 blend or plain
    replacement) at layers 1..depth-1, every prompted layer with its own decoupled attention, and
    removal of all prompts before block ``depth`` so the remaining blocks are frozen CLIP.
    """

    def __init__(self, cfg: _DecoupledOptions, n: int, depth: int, dims: TowerDims, tower: str):
        super().__init__()
        validate_depth(depth, dims.layers, tower)
        if n < 1:
            raise VlpromptError(f"the {tower} tower needs at least 1 prompt per layer, got {n}")
        self.depth, self.n_layers = depth, dims.layers
        self.carry = cfg.carry
        self.prompts = normal_prompts(depth, n, dims.width, std=cfg.init_std)
        self.gates = nn.ModuleList(
            DecoupledAttention(
                dims.heads,
                mode=cfg.mode,
                gate=cfg.gate,
                alpha_init=cfg.alpha_init,
                gate_closed=cfg.gate_closed,
                drop_pp=cfg.drop_pp,
            )
            for _ in range(depth)
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
        layers = {0: LayerOps(attention=self.gates[0])}
        for layer in range(1, self.depth):
            layers[layer] = LayerOps(
                remove=ALL, append=self.prompts[layer], blend=blend, attention=self.gates[layer]
            )
        if self.depth < self.n_layers:
            layers[self.depth] = LayerOps(remove=ALL)
        return TowerPlan(shallow=self.prompts[0], layers=layers)


class _DPLBase(PromptMethod):
    """Shared body: the text instance stream is the hand-crafted template; streams per config."""

    reconstruction_note = f"DPL is {RECONSTRUCTED}"

    def __init__(self, cfg: _DecoupledOptions, backbone: Backbone):
        super().__init__(cfg, backbone)
        _check(cfg)
        self.visual: DecoupledPromptStream | None = None
        self.textual: DecoupledPromptStream | None = None
        if isinstance(cfg, DPLVisualConfig):
            self.visual = DecoupledPromptStream(
                cfg, cfg.n_prompts_image, cfg.depth_image, backbone.image, "image"
            )
        if isinstance(cfg, DPLTextConfig):
            self.textual = DecoupledPromptStream(
                cfg, cfg.n_prompts_text, cfg.depth_text, backbone.text, "text"
            )

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.classes = ClassPrompts(backbone, classnames, [("text", self.cfg.text or template)])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        plan = self.textual.plan() if self.textual is not None else None
        return TextInputs(self.classes.embeds, self.classes.eot, plan)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "reconstructed": True, "note": f"DPL is {RECONSTRUCTED}"}


def _image_plan(self: _DPLBase) -> TowerPlan | None:
    return self.visual.plan()


@register_method
class DPL(_DPLBase):
    name = "dpl"
    Config = DPLConfig
    summary = (
        f"DPL [{RECONSTRUCTED}]: decoupled attention with gated visual prompts and "
        "language-conditioned text prompts (ours: 4 prompts, depth 9, alpha 0.05, carry beta 0.01)"
    )
    image_plan = _image_plan


@register_method
class DPLVisual(_DPLBase):
    name = "dpl-visual"
    Config = DPLVisualConfig
    summary = f"DPL visual prompts only [{RECONSTRUCTED}]; text = the hand-crafted template"
    image_plan = _image_plan


@register_method
class DPLText(_DPLBase):
    name = "dpl-text"
    Config = DPLTextConfig
    summary = f"DPL language-conditioned text prompts only [{RECONSTRUCTED}]; image tower = frozen CLIP"
