"""The scorer that sweep, search and compare share: one metric on fixed data, cached per plan."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hookmoe.eval.scope import hook_signature
from hookmoe.errors import EvalError
from hookmoe.eval.run import evaluate, relative_drop
from hookmoe.routing.plan import Plan




class Scorer:
    """Scores plans on fixed data with one metric; remembers every result (keyed by the resolved rules and
    the attached Hooks), so a plan is never evaluated twice."""

    def __init__(self, mm, metric: str = "ppl", *, blocks: torch.Tensor | None = None, items: Sequence | None = None,
                 tasks: Any = None, batch_size: int = 8, eval_kw: dict | None = None):
        if metric == "ppl" and blocks is None:
            raise EvalError("perplexity scoring needs token blocks")
        if metric == "mc" and not items:
            raise EvalError("multiple-choice scoring needs items")
        self.mm, self.metric = mm, metric
        self.blocks, self.items, self.tasks = blocks, items, tasks
        self.batch_size = batch_size
        self.eval_kw = dict(eval_kw or {})
        self.memo: dict[str, dict] = {}
        self.evals = 0

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "ppl"

    def key(self, plan: Any) -> str:
        rules = Plan.parse(plan).resolve(self.mm)
        return ";".join(f"{i}={r.describe()}" for i, r in sorted(rules.items())) + "|" + hook_signature(self.mm)

    def cached(self, plan: Any) -> dict | None:
        return self.memo.get(self.key(plan))

    def remember(self, plan: Any, result: dict) -> None:
        self.memo[self.key(plan)] = result

    def fresh(self, plan: Any, *, progress: bool = False) -> dict:
        """Evaluate ``plan`` now (no memo)."""
        self.evals += 1
        return evaluate(self.mm, plan, metric=self.metric, blocks=self.blocks, items=self.items, tasks=self.tasks,
                        batch_size=self.batch_size, progress=progress, **self.eval_kw)

    def __call__(self, plan: Any, *, progress: bool = False) -> dict:
        k = self.key(plan)
        if k not in self.memo:
            self.memo[k] = self.fresh(plan, progress=progress)
        return self.memo[k]

    def drop(self, base: float, value: float) -> float:
        return relative_drop(base, value, self.higher_is_better)


def _scorer_for(mm, metric: str, data: str, *, n_blocks: int, block_len: int, seed: int, split: str,
                batch_size: int, tasks: Any = None, n_items: int | None = None, progress: bool = True,
                include_path: Any = None, limit: Any = None) -> Scorer:
    from hookmoe.eval.run import METRICS, _eval_blocks
    from hookmoe.eval.mc import load_mc_source

    if metric not in METRICS:
        raise EvalError(f"unknown metric '{metric}' (use one of: {', '.join(METRICS)})")
    if metric == "ppl":
        return Scorer(mm, "ppl", blocks=_eval_blocks(mm, data, n_blocks, block_len, seed, split, progress),
                      batch_size=batch_size)
    if metric == "mc":
        return Scorer(mm, "mc", items=load_mc_source(data, n_items=n_items, seed=seed), batch_size=batch_size)
    return Scorer(mm, "lm-eval", tasks=tasks, batch_size=batch_size,
                  eval_kw={"include_path": include_path, "limit": limit})
