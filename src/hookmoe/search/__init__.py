"""Choosing a plan: the TLNLE sensitivity sweep, the paper's §3.3 search, comparison of methods at a matched Act,
and the whole ``hookmoe run`` pipeline.
"""

from .compare import METHODS, compare, compare_markdown, write_compare
from .paper import QUICK_HOOK_LR, train_hook_at, tlnle_for_act, search, select_hook_layer, search_plan, default_hook_layer
from .pipeline import run_pipeline
from .scorer import Scorer
from .sweep import layer_groups, sweep_plans, sweep, write_sweep

__all__ = [
    "METHODS",
    "compare",
    "compare_markdown",
    "write_compare",
    "QUICK_HOOK_LR",
    "train_hook_at",
    "tlnle_for_act",
    "search",
    "select_hook_layer",
    "search_plan",
    "default_hook_layer",
    "run_pipeline",
    "Scorer",
    "layer_groups",
    "sweep_plans",
    "sweep",
    "write_sweep",
]
