"""The scorer that sweep, search and compare share: one metric on fixed data, cached per plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch

from hookmoe.eval.scope import hook_signature
from hookmoe.errors import EvalError
from hookmoe.eval.run import METRICS, evaluate, relative_drop
from hookmoe.options import Options, option
from hookmoe.routing.plan import Plan


@dataclass(kw_only=True)
class BatchOptions(Options):
    """Batch size and seed, shared by every search command (``sweep``, ``search``, ``compare``, ``run``,
    ``frontier``)."""

    batch_size: int = option(8, "blocks (or multiple-choice items) per forward pass when scoring", min=1)
    seed: int = option(0, "random seed (data sampling, tiny:<arch> weights, Hook initialisation)")


@dataclass(kw_only=True)
class ScoreOptions(BatchOptions):
    """How ``sweep``, ``search`` and ``compare`` score a plan: one metric on fixed data (a :class:`Scorer`)."""

    error: ClassVar[type] = EvalError

    data: str = option(help="text source (ppl) or MC file / builtin-mc (mc)")
    metric: str = option("ppl", "ppl | mc | lm-eval", choices=METRICS)
    tasks: Optional[str] = option(None, "lm-eval tasks (with --metric lm-eval)")
    include_path: Optional[Path] = option(None, "folder with local lm-eval task YAMLs")
    limit: Optional[int] = option(None, "lm-eval: examples per task")
    n_blocks: int = option(16, "scoring blocks (ppl)", min=1)
    block_len: int = option(256, "tokens per block", min=2)
    split: str = option("heldout", "split of --data that is scored")
    n_items: Optional[int] = option(None, "mc: items to score (default: all)")

    def check(self) -> None:
        super().check()
        if self.metric == "lm-eval" and not self.tasks:
            raise EvalError("--metric lm-eval needs --tasks")

    def scorer(self, mm, progress: bool = True) -> "Scorer":
        """The :class:`Scorer` these options describe, on model ``mm``."""
        return _scorer_for(mm, self.metric, self.data, n_blocks=self.n_blocks, block_len=self.block_len,
                           seed=self.seed, split=self.split, batch_size=self.batch_size, tasks=self.tasks,
                           n_items=self.n_items, progress=progress, include_path=self.include_path, limit=self.limit)

    def train_source(self, calib: Optional[str]) -> str:
        """Text for calibration / Hook training: ``calib``, else ``--data`` for ppl (its train split), else builtin."""
        return calib or (self.data if self.metric == "ppl" else "builtin")


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
    from hookmoe.eval.run import _eval_blocks
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
