"""CLIP-LoRA: low-rank deltas on the frozen attention projections of both towers.

Official code: github.com/MaxZanella/CLIP-LoRA, ``loralib/layers.py`` (``LinearLoRA``,
``PlainMultiheadAttentionLoRA``), ``loralib/utils.py`` (``apply_lora``, ``INDEX_POSITIONS_*``), ``lora.py``
(``run_lora``) and ``main.py`` (Zanella & Ben Ayed, CVPRW 2024).  In every chosen block of the chosen
towers, each chosen projection ``W`` (q, k, v; optionally o) becomes ``W + s · B A`` with ``A`` (r, d)
Kaiming-uniform, ``B`` (d, r) zero (so training starts at zero-shot CLIP) and ``s = alpha / sqrt(r)`` (the
official scaling, not LoRA's ``alpha / r``); dropout 0.25 on the input of each delta while training.  The
prompt is the data set's template, encoded with the adapted text tower every step; the loss is
cross-entropy.  Only ``A`` and ``B`` train and are saved; the engine adds them to the frozen weights
(:mod:`vlprompt.engine.lora`), merged wherever no dropout acts (evaluation), as the official code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlprompt.backbones import Backbone
from vlprompt.engine import TowerPlan
from vlprompt.engine.lora import PROJECTIONS, LowRankAttention
from vlprompt.errors import VlpromptError
from vlprompt.methods.base import MethodConfig, PromptMethod, TextInputs, opt, register_method
from vlprompt.methods.common import ClassPrompts

#: the official ``INDEX_POSITIONS_TEXT`` / ``INDEX_POSITIONS_VISION['ViT-B/16']`` (12-block towers); other
#: depths scale "all" to every block and the named ranges are taken as written
POSITIONS = {
    "top1": [11],
    "top": [11],
    "top2": [10, 11],
    "top3": [9, 10, 11],
    "bottom": [0, 1, 2, 3],
    "mid": [4, 5, 6, 7],
    "up": [8, 9, 10, 11],
    "half-up": [6, 7, 8, 9, 10, 11],
    "half-bottom": [0, 1, 2, 3, 4, 5],
}
ENCODERS = ("text", "vision", "both")


@dataclass
class CLIPLoRAConfig(MethodConfig):
    rank: int = opt(2, "r: rank of each low-rank delta")
    alpha: float = opt(1.0, "LoRA alpha; the delta is scaled by alpha / sqrt(rank) (official)")
    dropout: float = opt(0.25, "dropout on each delta's input while training")
    params: list = opt(["q", "k", "v"], "projections that get a delta: any of q, k, v, o")
    encoder: str = opt("both", "towers that get deltas: text | vision | both")
    position: str = opt(
        "all", "blocks that get deltas: all | bottom | mid | up | half-up | half-bottom | top3 ..."
    )
    text: str = opt("", 'template of the class prompts ("" = the data set\'s)')


def _blocks(position: str, depth: int) -> list[int]:
    if position == "all":
        return list(range(depth))
    if position not in POSITIONS:
        raise VlpromptError(f"unknown position '{position}'; use all, {', '.join(POSITIONS)}")
    blocks = POSITIONS[position]
    if max(blocks) >= depth:
        raise VlpromptError(f"position '{position}' needs {max(blocks) + 1} blocks; this tower has {depth}")
    return blocks


@register_method
class CLIPLoRA(PromptMethod):
    name = "clip-lora"
    display_name = "CLIP-LoRA"
    official_parameters = 184_320  # MaxZanella/CLIP-LoRA defaults on ViT-B/16 (rank 2, q/k/v, both towers)
    Config = CLIPLoRAConfig
    bench_batch_size = 32
    summary = "CLIP-LoRA: rank-2 deltas on q/k/v of every attention block of both towers (base frozen)"

    def __init__(self, cfg: CLIPLoRAConfig, backbone: Backbone):
        super().__init__(cfg, backbone)
        if cfg.rank < 1:
            raise VlpromptError(f"rank={cfg.rank} must be at least 1")
        if not 0 <= cfg.dropout < 1:
            raise VlpromptError(f"dropout={cfg.dropout} must be in [0, 1)")
        bad = [p for p in cfg.params if p not in PROJECTIONS] or ([] if cfg.params else ["(none)"])
        if bad:
            raise VlpromptError(f"params {bad} invalid; choose one or more of {', '.join(PROJECTIONS)}")
        if cfg.encoder not in ENCODERS:
            raise VlpromptError(f"unknown encoder '{cfg.encoder}'; use {', '.join(ENCODERS)}")
        self.scale = cfg.alpha / math.sqrt(cfg.rank)
        self.lora = nn.ParameterDict()
        self.layers: dict[str, list[int]] = {}
        towers = {"text": backbone.text, "vision": backbone.image}
        for tower in ("text", "vision"):
            if cfg.encoder not in (tower, "both"):
                continue
            spec = towers[tower]
            self.layers[tower] = _blocks(cfg.position, spec.layers)
            for i in self.layers[tower]:
                for p in cfg.params:
                    a = torch.empty(cfg.rank, spec.width)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the official init_lora_param
                    self.lora[f"{tower}_{i}_{p}_A"] = nn.Parameter(a)
                    self.lora[f"{tower}_{i}_{p}_B"] = nn.Parameter(torch.zeros(spec.width, cfg.rank))

    def _attention(self, tower: str) -> LowRankAttention | None:
        if tower not in self.layers:
            return None
        deltas = {
            i: {
                p: (self.lora[f"{tower}_{i}_{p}_A"], self.lora[f"{tower}_{i}_{p}_B"]) for p in self.cfg.params
            }
            for i in self.layers[tower]
        }
        return LowRankAttention(deltas, self.scale, self.cfg.dropout, training=self.training)

    def prepare_text(self, backbone: Backbone, classnames: list[str], template: str) -> None:
        self.prompts = ClassPrompts(backbone, classnames, [("text", self.cfg.text or template)])

    def text_inputs(self, image_features: torch.Tensor | None = None) -> TextInputs:
        attn = self._attention("text")
        plan = TowerPlan(attention=attn) if attn is not None else None
        return TextInputs(self.prompts.embeds, self.prompts.eot, plan)

    def image_plan(self) -> TowerPlan | None:
        attn = self._attention("vision")
        return TowerPlan(attention=attn) if attn is not None else None
