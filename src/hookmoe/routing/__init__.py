"""Routing plans (per-layer top-k and dynamic rules), the one patch point on the routers, Act statistics, and
the calibration of dynamic rules to a target Act.
"""

from .calibrate import DYNAMIC_KINDS, LayerRouterStats, collect_router_stats, measure_act, plan_from_rules, entropy_thresholds, calibrate_plan
from .partial import run_partial
from .patch import RoutingPatch, apply_plan, routing_scope, eval_mode
from .plan import RENORM_MODES, Native, TopK, Dynamic, Rule, Plan
from .rules import router_probs, entropy, keep_sorted, make_selector
from .stats import RoutingStats

__all__ = [
    "DYNAMIC_KINDS",
    "LayerRouterStats",
    "collect_router_stats",
    "measure_act",
    "plan_from_rules",
    "entropy_thresholds",
    "calibrate_plan",
    "run_partial",
    "RoutingPatch",
    "apply_plan",
    "routing_scope",
    "eval_mode",
    "RENORM_MODES",
    "Native",
    "TopK",
    "Dynamic",
    "Rule",
    "Plan",
    "router_probs",
    "entropy",
    "keep_sorted",
    "make_selector",
    "RoutingStats",
]
