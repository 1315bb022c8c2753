"""Backbones: open_clip loading (names, tags, local files), freezing, tokenizer, pre-processing."""

from vlprompt.backbones.backbone import Backbone, TowerDims
from vlprompt.backbones.loading import infer_clip_config, list_architectures, load_backbone, meta_backbone

__all__ = [
    "Backbone",
    "TowerDims",
    "infer_clip_config",
    "list_architectures",
    "load_backbone",
    "meta_backbone",
]
