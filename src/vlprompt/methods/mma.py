"""MMA: multi-modal adapters between the blocks of both towers, joined by a shared projection.

Official code: github.com/ZjjConan/Multi-Modal-Adapter, ``trainers/mmadapter.py`` (``AdapterLearner``)
and ``clip/model.py`` (``ModifiedResidualAttentionBlock``) (Yang et al., CVPR 2024).  For each block
``k`` from ``adapter_start`` to ``adapter_end`` (1-based, both towers), a side branch reads the block's
normalised input ``h = ln_1(x)`` (every token: text tokens, or CLS + patches) and adds to the block's
output

    scale * up_k(shared_k(down_k(h))),   down_k = ReLU(Linear(d -> r)),  shared_k = ReLU(Linear(r -> r)),
                                          up_k = Linear(r -> d)

with ``down_k`` / ``up_k`` per tower and ``shared_k`` the *same* module for the two towers (the
shared projection); ``r = adapter_dim`` (32), ``scale = adapter_scale`` (0.001).  The official block
wraps the branch in gradient-scale layers (identity forward; backward ``x`` ``x scale`` on the branch
input and ``x 1/scale`` on its output), so the branch's input gradient is the true one while its
weights receive ``1/scale`` times theirs -- reproduced here.  Linear weights Kaiming-normal
(``fan_out``, ReLU), biases zero.  The class prompts are ``"a photo of a {class}."`` (``ctx_init``),
fixed; the loss is cross-entropy.  CLIP stays frozen; only the adapters train and are saved, under
the official names (``text_adapter.<k>.down.0.weight`` ...).  ViT-B/16 at the defaults: 674,560
trainable parameters.

Ours (stated): the official code also accepts ``ADAPTER_START = 0`` (an adapter on the token
embeddings / after ``ln_pre``, without gradient scaling); it is refused here (``adapter_start >= 1``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import LayerOps, TowerPlan
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts
from vlprompt.methods.official import OfficialLayout, Signature, map_mma


@dataclass
class MMAConfig(MethodConfig):
    adapter_start: int = opt(5, "first block with an adapter, 1-based (official ADAPTER_START)", minimum=1)
    adapter_end: int = opt(12, "last block with an adapter, 1-based, inclusive (ADAPTER_END)", minimum=1)
    adapter_dim: int = opt(32, "r: width of the down-projection and of the shared projection", minimum=1)
    adapter_scale: float = opt(0.001, "scale of the adapters' output (ADAPTER_SCALE)", above=0)
    ctx_init: str = opt("a photo of a", "words before the class name: '<ctx_init> <class>.' (TEXT_CTX_INIT)")


class _GradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (the official branch's
    gradient-scale layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.scale, None


def _linear(x: torch.Tensor, m: nn.Linear) -> torch.Tensor:
    return F.linear(x, m.weight.to(x.dtype), m.bias.to(x.dtype))


class _Branch:
    """One block's side branch ``scale * up(shared(down(h)))`` (a plan's ``LayerOps.adapter``)."""

    def __init__(self, own: nn.Module, shared: nn.Module, scale: float):
        self.own, self.shared, self.scale = own, shared, scale

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        s = self.scale
        y = F.relu(_linear(_GradScale.apply(h, s), self.own.down[0]))
        y = F.relu(_linear(y, self.shared[0]))
        y = _linear(y, self.own.up) * s
        return _GradScale.apply(y, 1.0 / s)


def _init(m: nn.Module) -> nn.Module:
    for lin in m.modules():
        if isinstance(lin, nn.Linear):
            nn.init.kaiming_normal_(lin.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(lin.bias)
    return m


def _tower_adapters(blocks: list[int], d: int, r: int) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            str(k): _init(
                nn.Sequential(OrderedDict(down=nn.Sequential(nn.Linear(d, r), nn.ReLU()), up=nn.Linear(r, d)))
            )
            for k in blocks
        }
    )


@register_method
class MMA(PromptMethod):
    name = "mma"
    display_name = "MMA"
    paper_name = "MMA"
    official_parameters = 674_560  # ZjjConan/Multi-Modal-Adapter vit_b16_ep5 on ViT-B/16 (blocks 5-12, r 32)
    bench_batch_size = 16
    Config = MMAConfig
    summary = "MMA: per-tower down/up adapters + a shared projection between the top blocks of both towers"
    official = OfficialLayout(
        "ZjjConan/Multi-Modal-Adapter",
        "adapter_learner",
        Signature(has_prefix=("text_adapter.", "visual_adapter.", "shared_adapter.")),
        map_mma,
        notes=("adapter_scale is not stored in the checkpoint: the official default 0.001 is assumed",),
    )

    def __init__(self, cfg: MMAConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        layers = min(backbone.text.layers, backbone.image.layers)
        if not cfg.adapter_start <= cfg.adapter_end <= layers:
            raise VlpromptError(
                f"adapter blocks {cfg.adapter_start}..{cfg.adapter_end} must satisfy 1 <= adapter_start <= "
                f"adapter_end <= {layers} (the towers' blocks); set options.adapter_start / adapter_end"
            )
        d_txt, d_img, r = backbone.text.width, backbone.image.width, cfg.adapter_dim
        if r in (d_txt, d_img):
            raise VlpromptError(
                f"adapter_dim={r} equals a tower's width; MMA's adapter down-projects: use a smaller one"
            )
        self.blocks = list(range(cfg.adapter_start, cfg.adapter_end + 1))
        self.text_adapter = _tower_adapters(self.blocks, d_txt, r)
        self.visual_adapter = _tower_adapters(self.blocks, d_img, r)
        self.shared_adapter = nn.ModuleDict(
            {str(k): _init(nn.Sequential(nn.Linear(r, r), nn.ReLU())) for k in self.blocks}
        )

    def _plan(self, adapters: nn.ModuleDict) -> TowerPlan:
        s = self.cfg.adapter_scale
        return TowerPlan(
            layers={
                k - 1: LayerOps(adapter=_Branch(adapters[str(k)], self.shared_adapter[str(k)], s))
                for k in self.blocks
            }
        )

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        text = f"{self.cfg.ctx_init} {{}}." if self.cfg.ctx_init else "{}."
        self.prompts = ClassPrompts(backbone, classnames, [("text", text)])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        return TextInputs(self.prompts.embeds, self.prompts.eot, self._plan(self.text_adapter))

    def image_plan(self) -> TowerPlan | None:
        return self._plan(self.visual_adapter)
