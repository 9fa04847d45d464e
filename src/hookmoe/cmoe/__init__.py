"""Dense → MoE (CMoE): conversion, router calibration and distillation of the converted experts.
"""

from .calibrate import router_parameters, RANK_TARGETS, FINE_GRAINED_MIN_EXPERTS, resolve_calibration_target, expert_gains, calibrate_routers
from .convert import valid_expert_counts, default_activation_topk, balanced_kmeans, convert_dense, save_converted
from .distill import heldout_kl, FINETUNE_PARTS, finetune_parameters, distill_moe

__all__ = [
    "router_parameters",
    "RANK_TARGETS",
    "FINE_GRAINED_MIN_EXPERTS",
    "resolve_calibration_target",
    "expert_gains",
    "calibrate_routers",
    "valid_expert_counts",
    "default_activation_topk",
    "balanced_kmeans",
    "convert_dense",
    "save_converted",
    "heldout_kl",
    "FINETUNE_PARTS",
    "finetune_parameters",
    "distill_moe",
]
