"""vlprompt: prompt learning for CLIP-style vision-language models.

Public API (lazy-imported so ``import vlprompt`` stays cheap)::

    load_backbone(name, pretrained=...)          # open_clip name+tag, local file, or random init
    create_model(method, backbone, classnames, **options)
    list_methods(), list_datasets(), load_run(path)
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": "vlprompt.backbones",
    "Backbone": "vlprompt.backbones",
    "create_model": "vlprompt.methods",
    "list_methods": "vlprompt.methods",
    "PromptModel": "vlprompt.methods",
    "list_datasets": "vlprompt.data",
    "get_dataset": "vlprompt.data",
    "load_run": "vlprompt.run",
    "VlpromptError": "vlprompt.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlprompt' has no attribute {name!r}")
