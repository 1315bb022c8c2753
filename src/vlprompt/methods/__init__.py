"""Methods: each a small registered module describing its prompts (see ``base.PromptMethod``)."""

from vlprompt.methods.base import (
    MethodConfig,
    PromptMethod,
    TextInputs,
    build_config,
    get_method,
    list_methods,
    register_method,
)
from vlprompt.methods.model import DEFAULT_TEMPLATE, ModelOptions, PromptModel, create_model

__all__ = [
    "DEFAULT_TEMPLATE",
    "MethodConfig",
    "ModelOptions",
    "PromptMethod",
    "PromptModel",
    "TextInputs",
    "build_config",
    "create_model",
    "get_method",
    "list_methods",
    "register_method",
]
