"""Published numbers (from the methods' papers) shown beside ours by ``vlprompt report --reference``.

All are top-1 accuracy (%) with CLIP ViT-B/16 *pretrained* weights, 16 shots, mean of seeds 1-3, as
printed in the CoOp / CoCoOp / KgCoOp / ProGrad / MaPLe / PromptSRC / MPL / MMA / TCP / CoPrompt papers
(CoPrompt's average: as printed in the README of github.com/ShuvenduRoy/CoPrompt, ICLR 2024); "X + DePT"
from the DePT paper (Zhang et al., CVPR 2024, Table 1 base-to-new, Table 2 cross-dataset; the same tables
are github.com/Koorye/DePT examples/base_to_new_performance.png and cross_dataset_performance.png).
They are data, never computed, and are always labelled :data:`LABEL` so they cannot be mistaken for this
package's results.
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
    "MMA": (83.20, 76.80, 79.87),  # MMA paper Table 1 (CVPR 2024) = ZjjConan/Multi-Modal-Adapter README
    "TCP": (84.13, 75.36, 79.51),  # TCP (Yao et al., CVPR 2024), its base-to-new table
    "CoPrompt": (84.00, 77.23, 80.48),
    # DePT paper, Table 1 (its own runs of the base methods differ from the rows above)
    "CoOp + DePT": (83.66, 71.82, 77.29),
    "CoCoOp + DePT": (83.80, 72.89, 77.97),
    "KgCoOp + DePT": (83.62, 75.04, 79.10),
    "MaPLe + DePT": (84.85, 74.82, 79.52),
    # PromptKD (Li et al., CVPR 2024, Table 1 = images/exp_results.png of github.com/zhengli97/PromptKD):
    # TRANSDUCTIVE -- see PUBLISHED_NOTES
    "PromptKD": (86.96, 80.73, 83.73),
}

#: what a published row computed that the table's columns do not say (shown beside its numbers)
PUBLISHED_NOTES: dict[str, str] = {
    "PromptKD": (
        "transductive: distilled from a ViT-L/14 PromptSRC teacher on the unlabelled training images of "
        "base AND new classes (the full train split, not 16 shots); not comparable to inductive rows"
    ),
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
    "CoOp + DePT": {
        "imagenet": 73.45, "caltech101": 96.29, "oxford_pets": 96.14, "stanford_cars": 75.86,
        "oxford_flowers": 83.08, "food101": 90.88, "fgvc_aircraft": 29.46, "sun397": 78.55,
        "dtd": 67.04, "eurosat": 75.70, "ucf101": 78.24,
    },
    "CoCoOp + DePT": {
        "imagenet": 73.53, "caltech101": 96.06, "oxford_pets": 95.59, "stanford_cars": 76.46,
        "oxford_flowers": 83.51, "food101": 90.80, "fgvc_aircraft": 36.25, "sun397": 79.37,
        "dtd": 66.37, "eurosat": 76.82, "ucf101": 78.73,
    },
    "KgCoOp + DePT": {
        "imagenet": 73.42, "caltech101": 96.41, "oxford_pets": 95.76, "stanford_cars": 77.26,
        "oxford_flowers": 85.84, "food101": 91.05, "fgvc_aircraft": 38.57, "sun397": 80.00,
        "dtd": 68.78, "eurosat": 79.04, "ucf101": 81.29,
    },
    "MaPLe + DePT": {
        "imagenet": 73.85, "caltech101": 96.75, "oxford_pets": 96.41, "stanford_cars": 76.06,
        "oxford_flowers": 83.79, "food101": 90.93, "fgvc_aircraft": 37.78, "sun397": 79.52,
        "dtd": 69.91, "eurosat": 84.36, "ucf101": 82.25,
    },
}  # fmt: skip

#: base-to-new (Base, New) per data set, where the papers give them
BASE2NEW_BN: dict[str, dict[str, tuple[float, float]]] = {
    "CLIP": {"caltech101": (96.84, 94.00)},
    "CoOp": {"caltech101": (98.00, 89.81)},
    "CoCoOp": {"caltech101": (97.96, 93.81)},
    "MaPLe": {"caltech101": (97.74, 94.36)},
    "CoOp + DePT": {"caltech101": (98.33, 94.33)},
    "CoCoOp + DePT": {"caltech101": (98.37, 93.87)},
    "KgCoOp + DePT": {"caltech101": (98.30, 94.60)},
    "MaPLe + DePT": {"caltech101": (98.53, 95.03)},
}

#: cross-dataset average over the 10 targets (MPL's is approximate: "≈ 66.25" in its paper)
CROSS_DATASET_AVERAGE: dict[str, float] = {
    "CoOp": 63.88,
    "CoCoOp": 65.74,
    "MaPLe": 66.30,
    "PromptSRC": 65.81,
    "MPL": 66.25,
    "CoOp + DePT": 65.02,
    "CoCoOp + DePT": 65.88,
    "KgCoOp + DePT": 65.55,
    "MaPLe + DePT": 64.56,
}

#: domain-generalisation average over ImageNet-V2 / -Sketch / -A / -R
DG_AVERAGE: dict[str, float] = {
    "CLIP": 57.18,
    "CoOp": 59.28,
    "CoCoOp": 59.91,
    "MaPLe": 60.28,
    "PromptSRC": 60.65,
    # DePT's additional_results/domain_generalization.md gives the four targets only: their mean here
    "CoOp + DePT": 60.61,  # 64.13, 49.40, 77.33, 51.57
    "CoCoOp + DePT": 60.39,  # 63.97, 49.83, 76.87, 50.90
    "KgCoOp + DePT": 59.99,  # 63.70, 48.90, 76.57, 50.77
    "MaPLe + DePT": 60.18,  # 64.33, 49.33, 77.37, 49.70
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
