"""Methods: each a small registered module describing its prompts (see ``base.PromptMethod``).

The registration list below is the one place that names the package's methods: importing a method's
module registers it (``@register_method``), in this order (the order of the bench and the papers).
A new method is one module, one preset (``presets/<name>.yaml``) and one line here.
"""

from vlprompt.methods.base import (
    MethodConfig,
    PlugIn,
    PromptMethod,
    TextInputs,
    bench_methods,
    build_config,
    compose,
    get_method,
    get_plugin,
    list_methods,
    list_plugins,
    register_method,
    register_plugin,
    registered,
    registered_methods,
    unregister_method,
)
from vlprompt.methods.model import DEFAULT_TEMPLATE, ModelOptions, PromptModel, TextStrategy, create_model
from vlprompt.methods.output import FROZEN_NEEDS, ModelOutput

# --- the registration list: one line per method -------------------------------------------------
# isort: off
from vlprompt.methods import zeroshot  # noqa: E402, F401
from vlprompt.methods import coop  # noqa: E402, F401
from vlprompt.methods import cocoop  # noqa: E402, F401
from vlprompt.methods import ivlp  # noqa: E402, F401
from vlprompt.methods import vpt  # noqa: E402, F401
from vlprompt.methods import maple  # noqa: E402, F401
from vlprompt.methods import mpl  # noqa: E402, F401
from vlprompt.methods import dpl  # noqa: E402, F401  (dpl, dpl-visual, dpl-text)
from vlprompt.methods import kgcoop  # noqa: E402, F401
from vlprompt.methods import prograd  # noqa: E402, F401
from vlprompt.methods import promptsrc  # noqa: E402, F401
from vlprompt.methods import tipadapter  # noqa: E402, F401  (tip-adapter, tip-adapter-f)
from vlprompt.methods import cliplora  # noqa: E402, F401
from vlprompt.methods import mma  # noqa: E402, F401
from vlprompt.methods import tcp  # noqa: E402, F401
from vlprompt.methods import dept  # noqa: E402, F401  (plug-in: coop+dept, cocoop+dept, kgcoop+dept, maple+dept)
from vlprompt.methods import coprompt  # noqa: E402, F401
from vlprompt.methods import promptkd  # noqa: E402, F401
# isort: on

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
    "bench_methods",
    "build_config",
    "create_model",
    "PlugIn",
    "compose",
    "get_method",
    "get_plugin",
    "list_methods",
    "list_plugins",
    "register_plugin",
    "register_method",
    "registered",
    "registered_methods",
    "unregister_method",
]
