"""Published numbers (from the methods' papers) shown beside ours by ``vlprompt report --reference``.

All are top-1 accuracy (%) with CLIP ViT-B/16 *pretrained* weights, 16 shots, mean of seeds 1-3, as
printed in the CoOp / CoCoOp / KgCoOp / ProGrad / MaPLe / PromptSRC / MPL papers. They are data,
never computed, and are always labelled :data:`LABEL` so they cannot be mistaken for this package's results.
"""

from __future__ import annotations

from vlprompt.errors import VlpromptError
from vlprompt.methods import get_method

LABEL = "published, ViT-B/16, pretrained CLIP"
#: shots per class of every published number here (base-to-new, cross-dataset, DG)
PUBLISHED_SHOTS = 16

#: base-to-new averages over the 11 data sets: (Base, New, HM)
BASE2NEW_AVERAGE: dict[str, tuple[float, float, float]] = {
    "CLIP": (69.34, 74.22, 71.70),
    "CoOp": (82.69, 63.22, 71.66),
    "CoCoOp": (80.47, 71.69, 75.83),
    "KgCoOp": (80.73, 73.60, 77.00),
    "ProGrad": (82.48, 70.75, 76.16),
    "IVLP": (84.21, 71.79, 77.51),
    "MaPLe": (82.28, 75.14, 78.55),
    "PromptSRC": (84.26, 76.10, 79.97),
}

#: base-to-new HM per data set (our registry names)
BASE2NEW_HM: dict[str, dict[str, float]] = {
    "CLIP": {
        "imagenet": 70.22, "caltech101": 95.40, "oxford_pets": 94.12, "stanford_cars": 68.65,
        "oxford_flowers": 74.83, "food101": 90.66, "fgvc_aircraft": 31.09, "sun397": 72.23,
        "dtd": 56.37, "eurosat": 60.03, "ucf101": 73.85,
    },
    "CoOp": {
        "imagenet": 71.92, "caltech101": 93.73, "oxford_pets": 94.47, "stanford_cars": 68.13,
        "oxford_flowers": 74.06, "food101": 85.19, "fgvc_aircraft": 28.75, "sun397": 72.51,
        "dtd": 54.24, "eurosat": 68.69, "ucf101": 67.46,
    },
    "CoCoOp": {
        "imagenet": 73.10, "caltech101": 95.84, "oxford_pets": 96.43, "stanford_cars": 72.01,
        "oxford_flowers": 81.71, "food101": 90.99, "fgvc_aircraft": 27.74, "sun397": 78.27,
        "dtd": 64.85, "eurosat": 71.21, "ucf101": 77.64,
    },
    "MaPLe": {
        "imagenet": 73.47, "caltech101": 96.02, "oxford_pets": 96.58, "stanford_cars": 73.47,
        "oxford_flowers": 82.56, "food101": 91.38, "fgvc_aircraft": 36.50, "sun397": 79.75,
        "dtd": 68.16, "eurosat": 82.35, "ucf101": 80.77,
    },
}  # fmt: skip

#: base-to-new (Base, New) per data set, where the papers give them
BASE2NEW_BN: dict[str, dict[str, tuple[float, float]]] = {
    "CLIP": {"caltech101": (96.84, 94.00)},
    "CoOp": {"caltech101": (98.00, 89.81)},
    "CoCoOp": {"caltech101": (97.96, 93.81)},
    "MaPLe": {"caltech101": (97.74, 94.36)},
}

#: cross-dataset average over the 10 targets (MPL's is approximate: "≈ 66.25" in its paper)
CROSS_DATASET_AVERAGE: dict[str, float] = {
    "CoOp": 63.88,
    "CoCoOp": 65.74,
    "MaPLe": 66.30,
    "PromptSRC": 65.81,
    "MPL": 66.25,
}

#: domain-generalisation average over ImageNet-V2 / -Sketch / -A / -R
DG_AVERAGE: dict[str, float] = {
    "CLIP": 57.18,
    "CoOp": 59.28,
    "CoCoOp": 59.91,
    "MaPLe": 60.28,
    "PromptSRC": 60.65,
}


def paper_name(method: str) -> str | None:
    """The papers' name for one of our methods (its registry entry's ``paper_name``, else its display
    name), or None when the method is unknown here or the tables hold no number under that name."""
    try:
        cls = get_method(method)
    except VlpromptError:
        return None
    name = cls.paper_name or cls.label()
    tables = (BASE2NEW_AVERAGE, BASE2NEW_HM, BASE2NEW_BN, CROSS_DATASET_AVERAGE, DG_AVERAGE)
    return name if any(name in t for t in tables) else None
