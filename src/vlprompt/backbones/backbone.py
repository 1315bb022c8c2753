"""The frozen CLIP backbone: the open_clip model plus what the engine and methods read from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from torch import nn

from vlprompt.errors import VlpromptError
from vlprompt.utils import atomic_write

#: safetensors metadata key holding a CLIP file's architecture (open_clip model config as JSON)
METADATA_KEY = "vlprompt_clip_config"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TowerDims:
    width: int
    layers: int
    heads: int


class Backbone(nn.Module):
    """A frozen open_clip CLIP model with its dimensions, tokenizer and pre-processing.

    Widths, depths and head counts are read from the loaded modules, never assumed.  The CLIP
    weights are frozen (``requires_grad=False``) and the module stays in eval mode even when a
    parent calls ``.train()``: prompt learning never updates or re-normalises CLIP.
    """

    def __init__(self, clip: nn.Module, *, name: str | None, pretrained: str | None, meta: dict[str, Any]):
        super().__init__()
        self.clip = clip
        self.name = name
        self.pretrained = pretrained
        self.meta = meta
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        self._check_supported()
        self._tokenizer = None

    # frozen: ignore train() from parents
    def train(self, mode: bool = True) -> Backbone:  # noqa: D401
        return super().train(False)

    def _check_supported(self) -> None:
        visual = getattr(self.clip, "visual", None)
        if visual is None or not hasattr(visual, "conv1") or not hasattr(self.clip, "token_embedding"):
            raise VlpromptError(
                f"backbone {self.name or self.meta.get('source')} is not a ViT CLIP with an OpenAI-style "
                "text "
                "tower; vlprompt supports open_clip ViT CLIP models (e.g. ViT-B-16, ViT-B-32)"
            )
        for tower in (visual.transformer, self.clip.transformer):
            blk = tower.resblocks[0]
            if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) or hasattr(blk, "ln_attn"):
                raise VlpromptError(
                    "backbone uses a custom attention block; vlprompt supports the standard "
                    "ResidualAttentionBlock of open_clip CLIP models"
                )
        if getattr(visual, "attn_pool", None) is not None:
            raise VlpromptError("attention-pooled vision towers (CoCa) are not supported; use a CLIP ViT")

    # ------------------------------------------------------------------ dimensions
    @property
    def text(self) -> TowerDims:
        blocks = self.clip.transformer.resblocks
        return TowerDims(self.clip.transformer.width, len(blocks), blocks[0].attn.num_heads)

    @property
    def image(self) -> TowerDims:
        blocks = self.clip.visual.transformer.resblocks
        return TowerDims(self.clip.visual.transformer.width, len(blocks), blocks[0].attn.num_heads)

    @property
    def embed_dim(self) -> int:
        tp = self.clip.text_projection
        return tp.out_features if isinstance(tp, nn.Linear) else tp.shape[1]

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    @property
    def num_image_tokens(self) -> int:
        """CLS + patch tokens: the image tower's instance tokens."""
        return int(self.clip.visual.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    # ------------------------------------------------------------------ text side
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer

    @property
    def sot_id(self) -> int:
        return self.tokenizer.sot_token_id

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_token_id

    def encode_words(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens (CLIP's cleaning and lower-casing applied)."""
        return self.tokenizer.encode(text)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def token_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(ids.to(self.device))

    # ------------------------------------------------------------------ pre-processing
    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """Image size, mean, std and interpolation the data layer's transforms should use."""
        size = self.clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(self.clip.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(self.clip.visual, "image_std", None) or OPENAI_STD
        cfg = {"size": int(size), "mean": tuple(mean), "std": tuple(std), "interpolation": "bicubic"}
        if self.meta.get("train_crop_scale"):  # a bundled backbone's own choice (vlp-world: docs/world.md)
            cfg["scale"] = tuple(self.meta["train_crop_scale"])
        return cfg

    # ------------------------------------------------------------------ provenance / export
    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "source": self.meta.get("source"),
            "quick_gelu": self.meta.get("quick_gelu"),
            "text": vars(self.text),
            "image": vars(self.image),
            "embed_dim": self.embed_dim,
        }

    def save_safetensors(self, path: str) -> None:
        """Write the CLIP weights as ``.safetensors`` with the architecture in the metadata."""

        sd = {k: v.contiguous() for k, v in self.clip.state_dict().items() if k != "attn_mask"}
        meta = {METADATA_KEY: json.dumps(self.meta.get("config") or {})}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
