"""One entry for every metric (:func:`evaluate`), the ``hookmoe eval`` run (:class:`EvalOptions`, :func:`run_eval`)
and the relative drop used by the search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from hookmoe.errors import EvalError
from hookmoe.eval.lm_eval import lm_eval_tasks
from hookmoe.eval.mc import load_mc_source, multiple_choice
from hookmoe.eval.perplexity import perplexity
from hookmoe.eval.scope import _has_dynamic, needs_calibration
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import argument, option
from hookmoe.routing.plan import PLAN_HELP, Plan



METRICS = ("ppl", "mc", "lm-eval")


SPLITS = ("heldout", "train", "all")  # hookmoe.data.sources.SPLITS, in the order the help names them


@dataclass(kw_only=True)
class EvalOptions(LoadOptions):
    """``hookmoe eval``: the model, the plans to compare, the metric and its data (one source for the command's
    flags, its ``--config`` keys and :func:`run_eval`)."""

    error: ClassVar[type] = EvalError

    model: str = argument(MODEL_HELP)
    plan: Optional[list[str]] = option(None, PLAN_HELP + " (repeat to compare plans on one loaded model; default "
                                       "native)", flags=("--plan",))
    hook: Optional[Path] = option(None, "hook artifact directory to attach")
    data: Optional[str] = option(None, "ppl: text source (builtin, c4, math, hf:ID, file or folder); mc: a .jsonl / "
                                 "JSON list / BIG-bench task.json, or builtin-mc[:N]")
    metric: str = option("ppl", "ppl | mc | lm-eval (implied by --tasks)", choices=METRICS)
    tasks: Optional[str] = option(None, "lm-eval tasks: paper-general, paper-math, or names (comma-separated, "
                                  "name:SHOTS for few-shot)")
    include_path: Optional[Path] = option(None, "folder with local lm-eval task YAMLs")
    limit: Optional[float] = option(None, "lm-eval: at most this many examples per task (below 1: that fraction "
                                    "of each task)", min=0, min_open=True)
    num_fewshot: Optional[int] = option(None, "lm-eval: few-shot count for tasks without one", min=0)
    n_blocks: int = option(16, "ppl: number of token blocks", min=1)
    block_len: int = option(256, "ppl: tokens per block", min=2)
    window: Optional[int] = option(None, "ppl: sliding-window length (default: the block)", min=2)
    stride: Optional[int] = option(None, "ppl: sliding-window stride (default: the window)", min=1)
    split: str = option("heldout", "ppl data split", choices=SPLITS)
    n_items: Optional[int] = option(None, "mc: use at most this many items", min=1)
    calib: Optional[str] = option(None, "text source to calibrate naee / entropy / --act on (train split; default: "
                                  "--data for ppl, builtin otherwise)")
    calib_blocks: int = option(8, "calibration blocks", min=1)
    act: Optional[float] = option(None, "calibrate dynamic plans to this Act (experts per token)", min=0,
                                  min_open=True)
    batch_size: int = option(8, "sequences per forward pass", min=1)
    seed: int = option(0, "random seed (data sampling, tiny:<arch> weights)")
    as_json: Optional[Path] = option(None, "write the results here ('-' = stdout only)", flags=("--json",))

    def check(self) -> None:
        if self.tasks:
            self.metric = "lm-eval"
        if self.metric in ("ppl", "mc") and not self.data:
            raise EvalError(f"--data is required for --metric {self.metric}")
        if self.metric == "lm-eval" and not self.tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        self.plan = list(self.plan or [])
        for p in self.plan:
            Plan.parse(p)  # syntax errors before the model loads


def evaluate(mm, plan: Any = None, *, metric: str = EvalOptions.metric, blocks: torch.Tensor | None = None,
             items: Sequence | None = None, tasks: Any = None, batch_size: int = EvalOptions.batch_size,
             progress: bool = False, **kw) -> dict:
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


def run_eval(o: EvalOptions, mm=None, *, progress: bool = True,
             note: Callable[[str], None] | None = None) -> dict:
    """``hookmoe eval``: load ``o.model`` (unless ``mm`` is given) with ``o.hook``, read the data once, score every
    plan of ``o.plan`` on it (dynamic plans that need it calibrated first, on the train split of ``o.calib``);
    returns ``{"model", "data", "metric", "hook", "results": [...]}``. ``note``: told each calibration."""
    if mm is None:
        from hookmoe.hook import load

        mm = load(o.model, hook=o.hook, seed=o.seed, **o.load_kwargs())
    plans = list(o.plan or [])
    if not plans:  # a Hook is evaluated under the plan it was trained for
        hs = getattr(mm, "hookset", None)
        hp = hs.plan if hs is not None and o.hook is not None else None
        plans = [hp] if hp is not None else ["native"]
    for p in plans:
        Plan.parse(p).resolve(mm)  # plans that do not fit this model fail before any data is read
    blocks = items = calib = None
    if o.metric == "ppl":
        blocks = _eval_blocks(mm, o.data, o.n_blocks, o.block_len, o.seed, o.split, progress)
    elif o.metric == "mc":
        items = load_mc_source(o.data, n_items=o.n_items, seed=o.seed)
    limit = int(o.limit) if o.limit is not None and o.limit >= 1 else o.limit
    results = []
    for p in plans:
        concrete, told = p, None
        if needs_calibration(mm, p) or (o.act is not None and _has_dynamic(mm, p)):
            csrc = o.calib or (o.data if o.metric == "ppl" else "builtin")
            if calib is None:
                calib = _eval_blocks(mm, csrc, o.calib_blocks, o.block_len, o.seed, "train", progress)
            concrete, told = _calibrated(mm, p, calib, csrc, o, progress)
            if note is not None:
                note(told)
        r = evaluate(mm, concrete, metric=o.metric, blocks=blocks, items=items, tasks=o.tasks,
                     batch_size=o.batch_size, progress=progress, window=o.window, stride=o.stride,
                     num_fewshot=o.num_fewshot, limit=limit, include_path=o.include_path, seed=o.seed)
        r["requested_plan"] = p.describe() if isinstance(p, Plan) else str(p)
        if told:
            r["calibration"] = told
        results.append(r)
    return {"model": o.model, "data": o.data, "metric": o.metric, "hook": str(o.hook) if o.hook else None,
            "results": results}


def _calibrated(mm, plan: Any, blocks: torch.Tensor, source: str, o: EvalOptions, progress: bool):
    """``plan`` with its dynamic rules fitted on ``blocks`` (to ``o.act`` when given), and a line saying so."""
    from hookmoe.routing.calibrate import calibrate_plan

    concrete = calibrate_plan(mm, plan, blocks, target_act=o.act, batch_size=o.batch_size, progress=progress)
    cal = concrete.meta.get("calibration", {})
    desc = plan.describe() if isinstance(plan, Plan) else str(plan)
    return concrete, (f"plan '{desc}' calibrated on the train split of {source} ({blocks.shape[0]}x{blocks.shape[1]} "
                      f"tokens): measured Act {cal.get('measured_act', float('nan')):.3f}")


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
