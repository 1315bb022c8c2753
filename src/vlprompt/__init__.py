"""vlprompt: prompt learning for CLIP-style vision-language models.

Public API (loaded on first use, so ``import vlprompt`` stays cheap; ``dir(vlprompt)`` lists it)::

    load_backbone(name, pretrained=...)          # open_clip name+tag, local file, or random init
    create_model(method, backbone, classnames, **options)
    load_prompt(path_or_run, backbone=...)       # a trained run, an export or an imported prompt
    model.predict(images, classnames)            # -> Prediction: class names + probabilities
    list_methods(), list_datasets(), resolve_config(...), train_run(cfg, out_dir)

Training in Python (the same as ``vlprompt train``)::

    import vlprompt
    cfg = vlprompt.resolve_config("coop", "caltech101", root="data", shots=16, model="ViT-B-16")
    result = vlprompt.train_run(cfg, "runs/coop-caltech")
    model = vlprompt.load_prompt("runs/coop-caltech")
    print(model.predict(["cat.jpg"]).top())
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": "vlprompt.backbones",
    "Backbone": "vlprompt.backbones",
    "create_model": "vlprompt.methods",
    "list_methods": "vlprompt.methods",
    "PromptModel": "vlprompt.methods",
    "Prediction": "vlprompt.methods.model",
    "list_datasets": "vlprompt.data",
    "get_dataset": "vlprompt.data",
    "load_run": "vlprompt.run",
    "train_run": "vlprompt.run",
    "evaluate_run": "vlprompt.run",
    "resolve_config": "vlprompt.train.config",
    "fit": "vlprompt.train",
    "evaluate": "vlprompt.train",
    "VlpromptError": "vlprompt.errors",
}

#: entry points ("module:function") of packages that add generated data sets to ``vlprompt.data``'s
#: registry without ``data`` importing them (called on the first look-up; see data/registry.py)
DATASET_ENTRY_POINTS: list[str] = ["vlprompt.world.sets:register_world_sets"]

__all__ = sorted([*_LAZY, "load_prompt", "__version__"])


def load_prompt(path_or_run: str | os.PathLike, backbone: Any = None, device: Any = None):
    """The PromptModel of a run directory, an export, a ``prompt.safetensors`` or an imported prompt.

    ``backbone``: a loaded :class:`Backbone` (or an open_clip name / weights file) to use instead of
    the one the manifest records -- e.g. the same CLIP weights stored elsewhere.
    """
    from vlprompt.run import load_run

    if isinstance(backbone, (str, os.PathLike)):
        from vlprompt.backbones import load_backbone

        backbone = load_backbone(str(backbone), device=device)
    return load_run(path_or_run, backbone=backbone, device=device)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (lazily loaded names included), not the module's own imports."""
    return list(__all__)
