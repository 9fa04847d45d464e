"""Quality under a plan: perplexity, multiple choice, lm-evaluation-harness tasks, with Act per layer.
"""

# hookmoe.eval.lm_eval_model (the registered `hookmoe` lm-eval model) is imported on demand: lm-eval is optional.
from .lm_eval import PRESETS, parse_tasks, task_manager, lm_eval_tasks
from .mc import mc_requests, loglikelihoods, multiple_choice, load_mc_source
from .perplexity import default_forward, perplexity_core, perplexity
from .run import METRICS, evaluate, relative_drop
from .scope import needs_calibration, hook_info, hook_signature, finish_result

__all__ = [
    "PRESETS",
    "parse_tasks",
    "task_manager",
    "lm_eval_tasks",
    "mc_requests",
    "loglikelihoods",
    "multiple_choice",
    "load_mc_source",
    "default_forward",
    "perplexity_core",
    "perplexity",
    "METRICS",
    "evaluate",
    "relative_drop",
    "needs_calibration",
    "hook_info",
    "hook_signature",
    "finish_result",
]
