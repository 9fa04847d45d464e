"""One entry for every metric (:func:`evaluate`) and the relative drop used by the search."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from hookmoe.errors import EvalError
from hookmoe.eval.lm_eval import lm_eval_tasks
from hookmoe.eval.mc import multiple_choice
from hookmoe.eval.perplexity import perplexity



METRICS = ("ppl", "mc", "lm-eval")


def evaluate(mm, plan: Any = None, *, metric: str = "ppl", blocks: torch.Tensor | None = None,
             items: Sequence | None = None, tasks: Any = None, batch_size: int = 8, progress: bool = False,
             **kw) -> dict:
    """Dispatch to :func:`perplexity`, :func:`multiple_choice` or :func:`lm_eval_tasks`."""
    if metric == "ppl":
        if blocks is None:
            raise EvalError("perplexity needs token blocks")
        return perplexity(mm, blocks, plan=plan, batch_size=batch_size, progress=progress,
                          window=kw.get("window"), stride=kw.get("stride"))
    if metric == "mc":
        if items is None:
            raise EvalError("multiple-choice evaluation needs items")
        return multiple_choice(mm, items, plan=plan, batch_size=batch_size, progress=progress)
    if metric == "lm-eval":
        if tasks is None:
            raise EvalError("lm-eval evaluation needs --tasks")
        return lm_eval_tasks(mm, tasks, plan=plan, batch_size=batch_size, progress=progress,
                             num_fewshot=kw.get("num_fewshot"), limit=kw.get("limit"),
                             include_path=kw.get("include_path"), seed=kw.get("seed", 0))
    raise EvalError(f"unknown metric '{metric}' (use one of: {', '.join(METRICS)})")


def relative_drop(base: float, value: float, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``base``, as a fraction (perplexity: relative increase)."""
    if base == 0 or not math.isfinite(base):
        return float("inf") if value != base else 0.0
    if higher_is_better:
        return (base - value) / abs(base)
    return (value - base) / abs(base)


def _eval_blocks(mm, src: str, n_blocks: int, block_len: int, seed: int, split: str, progress: bool):
    from hookmoe.data.blocks import make_blocks

    if mm.tokenizer is None:
        raise EvalError("this model has no tokenizer, so text data cannot be tokenised")
    return make_blocks(mm.tokenizer, src, n_blocks, block_len, seed=seed, split=split, progress=progress)
