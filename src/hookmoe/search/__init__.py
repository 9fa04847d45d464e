"""Sensitivity sweep, TLNLE search, Hook-layer selection, dynamic-k calibration, method comparison, pipeline.

* :func:`calibrate_plan` fits the thresholds of dynamic rules on calibration data — ``naee`` (β_l = median
  of p2/p1 per layer, optionally scaled to a target Act), ``entropy`` (per-layer thresholds at entropy
  quantiles so each layer hits the target Act), ``topp`` / ``ratio`` (bisection on τ, or on a shift of a
  depth schedule ``topp:A..B``, until the measured Act hits the target) — and returns a concrete,
  JSON-able :class:`~hookmoe.routing.Plan` with one entry per MoE layer.
* :func:`sweep` scores ``tlnle:k=K,l=l,r=r`` for every range of layer groups (the paper's Fig. 1). For
  perplexity the hidden states entering layer ``l`` are computed once (under the base plan) and shared by
  every plan with that ``l``; only layers ``l..`` run per plan (:func:`run_partial`).
* :func:`search` is the paper's §3.3: lower the uniform k while the score stays within the tolerance,
  then lower l (TLNLE), then choose the Hook layer by binary search over candidates (a small Hook trained
  and scored at each probed layer).
* :func:`compare` puts native, uniform top-k, TLNLE, the calibrated dynamic rules, Hook and Hook+TLNLE at
  a matched Act into one table; :func:`run_pipeline` is ``hookmoe run``.

Each command's options are one dataclass (:mod:`hookmoe.options`): ``XSettings`` holds what the library function
takes (its keyword arguments and their defaults), ``XOptions`` adds the model, data and outputs of the command, and
``hookmoe X``'s flags are generated from it.
"""

from .allocators import SENSITIVITY_FORMAT, budget_for_act, plan_from_ks, plan_ks, default_ks, measure_sensitivity, weight_sensitivity, knapsack, greedy_allocate, Allocator, DPAllocator, RefinedDPAllocator, GreedyAllocator, WeightsAllocator, TLNLEAllocator, allocate_within_tolerance, ALLOCATORS, DEFAULT_ALLOCATOR, get_allocator, allocate
from .compare import CompareOptions, CompareSettings, METHODS, compare, compare_markdown, write_compare
from .frontier import FrontierOptions, FrontierSettings, DYNAMIC_RULES, DEFAULT_DYNAMIC, FRONTIER_HOOK_LR, hook_compensator, COMPENSATORS, parse_acts, pareto, best_rows, frontier_markdown, write_frontier, frontier_plot  # frontier(): hookmoe.search.frontier.frontier
from .paper import SearchOptions, SearchSettings, QUICK_HOOK_LR, train_hook_at, tlnle_for_act, search, select_hook_layer, search_plan, default_hook_layer
from .pipeline import PipelineSettings, RunOptions, run_pipeline
from .scorer import BatchOptions, ScoreOptions, Scorer
from .sweep import SweepOptions, SweepSettings, layer_groups, sweep_plans, sweep, write_sweep

__all__ = [
    "BatchOptions",
    "ScoreOptions",
    "SweepSettings",
    "SweepOptions",
    "SearchSettings",
    "SearchOptions",
    "CompareSettings",
    "CompareOptions",
    "PipelineSettings",
    "RunOptions",
    "FrontierSettings",
    "FrontierOptions",
    "SENSITIVITY_FORMAT",
    "budget_for_act",
    "plan_from_ks",
    "plan_ks",
    "default_ks",
    "measure_sensitivity",
    "weight_sensitivity",
    "knapsack",
    "greedy_allocate",
    "Allocator",
    "DPAllocator",
    "RefinedDPAllocator",
    "GreedyAllocator",
    "WeightsAllocator",
    "TLNLEAllocator",
    "allocate_within_tolerance",
    "ALLOCATORS",
    "DEFAULT_ALLOCATOR",
    "get_allocator",
    "allocate",
    "METHODS",
    "compare",
    "compare_markdown",
    "write_compare",
    "DYNAMIC_RULES",
    "DEFAULT_DYNAMIC",
    "FRONTIER_HOOK_LR",
    "hook_compensator",
    "COMPENSATORS",
    "parse_acts",
    "pareto",
    "best_rows",
    "frontier_markdown",
    "write_frontier",
    "frontier_plot",
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
