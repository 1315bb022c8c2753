"""Training: presets and config resolution, the reference schedule, the loop, checkpoints, evaluation."""

from vlprompt.train.config import (
    DEFAULT_TRAIN,
    PROTOCOLS,
    RunRequest,
    apply_overrides,
    load_preset,
    resolve,
    resolve_config,
    validate_config,
)
from vlprompt.train.evaluate import evaluate
from vlprompt.train.files import TrainerFiles
from vlprompt.train.placement import Placement, resolve_placement
from vlprompt.train.precision import Precision, resolve_device, resolve_precision
from vlprompt.train.schedule import EpochSchedule, build_optimizer, epoch_lr, lr_sequence
from vlprompt.train.trainer import fit

__all__ = [
    "DEFAULT_TRAIN",
    "PROTOCOLS",
    "EpochSchedule",
    "Placement",
    "Precision",
    "RunRequest",
    "TrainerFiles",
    "apply_overrides",
    "build_optimizer",
    "epoch_lr",
    "evaluate",
    "fit",
    "load_preset",
    "lr_sequence",
    "resolve",
    "resolve_config",
    "resolve_device",
    "resolve_placement",
    "resolve_precision",
    "validate_config",
]
