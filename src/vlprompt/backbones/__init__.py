"""Backbones: open_clip loading (names, tags, local files), freezing, tokenizer, pre-processing."""

from vlprompt.backbones.backbone import Backbone, TowerDims
from vlprompt.backbones.loading import infer_clip_config, list_architectures, load_backbone, meta_backbone
from vlprompt.backbones.names import ModelEntry, canonical_model_name, list_models

__all__ = [
    "Backbone",
    "ModelEntry",
    "TowerDims",
    "canonical_model_name",
    "infer_clip_config",
    "list_architectures",
    "list_models",
    "load_backbone",
    "meta_backbone",
]
