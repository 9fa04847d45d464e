"""Evaluation: perplexity, multiple-choice accuracy and the lm-evaluation-harness bridge.

Every evaluation runs on one loaded :class:`~hookmoe.models.MoEModel` under a routing plan (applied and
removed around the evaluation, so several plans are scored without re-loading the model; ``plan=None``
means the plan already in force, else ``native``) and with whatever Hooks are attached. Every result is a
JSON-able dict with the same core fields::

    metric            "ppl" | "mc" | "lm-eval"
    score             the headline number (perplexity, accuracy, or the mean of the task scores)
    higher_is_better  False for perplexity
    plan / rules      the plan (its description and JSON) and the rule in force in every MoE layer
    act / act_per_layer   activated routed experts per token, overall and per MoE layer (measured)
    params            accounting.param_counts with the measured per-layer Act (active vs total)
    hook              the hooked layers (or None)

plus the metric's own fields (``ppl``, ``nll``, ``tokens``; ``acc``, ``acc_norm``, ``items``; ``tasks``).

Perplexity (:func:`perplexity`) scores token blocks from :func:`hookmoe.data.make_blocks` (non-overlapping
windows; a block that starts with BOS keeps it as unscored context, and with ``window``/``stride`` every
sliding window is re-prefixed with BOS, as Gemma needs). Multiple choice (:func:`multiple_choice`) ranks
the choices by the log-likelihood of ``context + continuation`` (``acc``) and by that log-likelihood per
character of the choice text (``acc_norm``, exactly as lm-eval does). :func:`lm_eval_tasks` wraps the loaded
model in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate`` (optional extra ``hookmoe[eval]``).
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
