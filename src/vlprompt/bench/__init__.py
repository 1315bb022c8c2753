"""Benchmarks (and, re-exported for convenience, the frozen image-feature cache).

:mod:`vlprompt.bench.harness` times training steps, evaluation and the towers against the reference
computation (``vlprompt bench``); :mod:`vlprompt.bench.flops` counts transformer FLOPs from the
loaded architecture.  The frozen CLIP image-feature cache lives in :mod:`vlprompt.train.features`
(the trainer uses it; bench sits above train and only re-exports it).
"""

from vlprompt.bench.flops import TowerFlops, block_flops, image_tower_flops, text_tower_flops
from vlprompt.train.features import (
    FeatureCache,
    backbone_fingerprint,
    feature_dataset,
    frozen_image_features,
    image_features,
)

__all__ = [
    "FeatureCache",
    "TowerFlops",
    "backbone_fingerprint",
    "feature_dataset",
    "block_flops",
    "frozen_image_features",
    "image_features",
    "image_tower_flops",
    "text_tower_flops",
]
