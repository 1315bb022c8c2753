"""vlprompt: prompt learning for CLIP-style vision-language models.

Public API (``__all__``; typed: IDEs and type checkers read the imports below)::

    load_backbone(name, pretrained=...)          # open_clip name+tag, local file, or random init
    create_model(method, backbone, classnames, **options)
    load_prompt(path, backbone=..., weights=...) # a trained run, an export or an imported prompt
    model.predict(images, classnames)            # -> Prediction: class names + probabilities
    list_models(), list_methods(), list_datasets(), get_dataset(name, root)
    resolve_config(method, dataset, ...)         # the typed run configuration
    train_run(cfg, out_dir)                      # train into a run directory (fingerprinted, resumable)
    evaluate_run(run_dir, dataset)               # evaluate a run on a data set, recorded in the run

Training in Python (the same as ``vlprompt train``)::

    import vlprompt
    cfg = vlprompt.resolve_config("coop", "caltech101", root="data", shots=16, model="ViT-B-16")
    result = vlprompt.train_run(cfg, "runs/coop-caltech")
    model = vlprompt.load_prompt("runs/coop-caltech")
    print(model.predict(["cat.jpg"]).top())

One way to load a prompt (``load_prompt``).  Training and evaluation have two levels on purpose:
``train_run`` / ``evaluate_run`` work on run directories (fingerprint, lock, resume, metrics.json), while
``fit`` / ``evaluate`` train and score any ``PromptModel`` on your own Dataset or DataLoader and write no
run directory (what ``train_run`` and ``evaluate_run`` call inside; ``fit(model, data, cfg,
vlprompt.run.RunDir(folder))`` keeps its log and resume checkpoint in a folder).

The names are imported on first use, not with ``import vlprompt``: the package root runs before every
``vlprompt`` command, and importing torch would make ``vlprompt --help`` take seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlprompt.errors import VlpromptError
from vlprompt.version import __version__

if TYPE_CHECKING:  # the same names as _API, for IDEs and type checkers
    from vlprompt.backbones import Backbone, list_models, load_backbone
    from vlprompt.data import get_dataset, list_datasets
    from vlprompt.methods import PromptModel, create_model, list_methods
    from vlprompt.methods.model import Prediction
    from vlprompt.run import evaluate_run, load_prompt, train_run
    from vlprompt.train import evaluate, fit
    from vlprompt.train.config import resolve_config

#: public name -> the module it is imported from on first use
_API = {
    "load_backbone": "vlprompt.backbones",
    "Backbone": "vlprompt.backbones",
    "list_models": "vlprompt.backbones",
    "create_model": "vlprompt.methods",
    "list_methods": "vlprompt.methods",
    "PromptModel": "vlprompt.methods",
    "Prediction": "vlprompt.methods.model",
    "list_datasets": "vlprompt.data",
    "get_dataset": "vlprompt.data",
    "train_run": "vlprompt.run",
    "evaluate_run": "vlprompt.run",
    "load_prompt": "vlprompt.run",
    "resolve_config": "vlprompt.train.config",
    "fit": "vlprompt.train",
    "evaluate": "vlprompt.train",
}

__all__ = [
    "Backbone",
    "Prediction",
    "PromptModel",
    "VlpromptError",
    "__version__",
    "create_model",
    "evaluate",
    "evaluate_run",
    "fit",
    "get_dataset",
    "list_datasets",
    "list_methods",
    "list_models",
    "load_backbone",
    "load_prompt",
    "resolve_config",
    "train_run",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (names imported on first use included), not the module's own imports."""
    return list(__all__)
