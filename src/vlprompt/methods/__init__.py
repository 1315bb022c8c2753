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
from vlprompt.methods.model import DEFAULT_TEMPLATE, ModelOptions, PromptModel, TextStrategy, create_model
from vlprompt.methods.output import FROZEN_NEEDS, ModelOutput

__all__ = [
    "DEFAULT_TEMPLATE",
    "FROZEN_NEEDS",
    "MethodConfig",
    "ModelOutput",
    "ModelOptions",
    "PromptMethod",
    "PromptModel",
    "TextInputs",
    "TextStrategy",
    "build_config",
    "create_model",
    "get_method",
    "list_methods",
    "register_method",
]
