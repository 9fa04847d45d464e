"""The Hook (HookMoE) and the other compensators (router deltas, output corrections): the modules, its injection before a layer's router, the artifact directory (PEFT-style), and
export of a model with its plan and Hooks.
"""

from .artifact import WEIGHTS_NAME, CONFIG_NAME, base_model_info, read_manifest, read_weights
from .export import EXPORT_FORMAT, EXPORT_NAME, export_model, load_export, load
from .compensators import KINDS, PARTS, DEFAULT_KIND, RouterDelta, OutputLowRank, parse_kind, parse_budget, size_for_budget
from .inject import SUBMODULE, HookSet, parse_layers, insert_hooks, insert_compensators, remove_hooks, get_hooks, attach_hooks
from .module import HOOK_FORMAT, INITS, DEFAULT_INIT, R_INIT, Hook

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "base_model_info",
    "read_manifest",
    "read_weights",
    "EXPORT_FORMAT",
    "EXPORT_NAME",
    "export_model",
    "load_export",
    "load",
    "SUBMODULE",
    "HookSet",
    "parse_layers",
    "insert_hooks",
    "insert_compensators",
    "KINDS",
    "PARTS",
    "DEFAULT_KIND",
    "RouterDelta",
    "OutputLowRank",
    "parse_kind",
    "parse_budget",
    "size_for_budget",
    "remove_hooks",
    "get_hooks",
    "attach_hooks",
    "HOOK_FORMAT",
    "INITS",
    "DEFAULT_INIT",
    "R_INIT",
    "Hook",
]
