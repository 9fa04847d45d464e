"""The paper's search (§3.3): lower k, then l, within a tolerance; then the Hook layer by binary search."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from hookmoe.eval.run import relative_drop
from hookmoe.layerspec import parse_layer_list
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import Options, argument, option
from hookmoe.routing.plan import Plan
from hookmoe.errors import SearchError
from hookmoe.search.scorer import Scorer, ScoreOptions
from hookmoe.search.sweep import layer_groups


#: Hook learning rate for the short CPU-budget trainings of search / compare / run (tens to hundreds of
#: steps). The paper's 1e-4 is for 512 x 2048-token samples; hookmoe.train keeps that as its own default.
QUICK_HOOK_LR = 1e-3


def layer_candidates(value: Any, flag: str = "--hook-candidates") -> list[int] | None:
    """Candidate Hook layers: ``"8-20"`` / ``"1,3"`` (a spec) or a sequence of ints; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_layer_list(value, flag, SearchError)
    return [int(c) for c in value]


@dataclass(kw_only=True)
class SearchSettings(Options):
    """The settings of the paper's §3.3 search: :func:`search`'s keyword arguments (with their defaults)."""

    error: ClassVar[type] = SearchError

    tolerance: float = option(0.01, "allowed relative score drop (0.01 = 1%; ppl: relative rise)", min=0)
    step: Optional[int] = option(None, "layers per step when lowering l (default: L/8)", min=1)
    max_evals: Optional[int] = option(None, "cap on fresh evaluations (budget)", min=1)
    hook: bool = option(True, "also choose the Hook layer (trains small hooks)")
    hook_candidates: Optional[str] = option(None, "candidate Hook layers, e.g. 8-20 (default: all MoE)")
    hook_steps: int = option(20, "training steps per Hook candidate", min=1)
    hook_lr: Optional[float] = option(QUICK_HOOK_LR, "Hook learning rate (paper: 1e-4 on far more data)", min=0,
                                      min_open=True)
    hook_batch_size: int = option(4, "blocks per Hook training step", min=1, cli=False)
    hook_objective: Optional[str] = option(None, "Hook training objective (default: hookmoe.train's)", cli=False)

    def check(self) -> None:
        super().check()
        layer_candidates(self.hook_candidates)


@dataclass(kw_only=True)
class SearchOptions(SearchSettings, ScoreOptions, LoadOptions):
    """``hookmoe search``: the model, the scoring (:class:`ScoreOptions`), the :class:`SearchSettings`, the Hook
    training data, and the per-layer allocator that may replace the §3.3 search."""

    model: str = argument(MODEL_HELP)
    data: str = option(help="text source scored by perplexity (or MC data with --metric mc)")
    out: Path = option(Path("plan.json"), "where to write the plan JSON")
    log: Optional[Path] = option(None, "JSONL log of every evaluated point (default: next to --out)")
    calib: Optional[str] = option(None, "text source for Hook training (default: --data, train split)")
    train_blocks: int = option(32, "Hook training blocks per candidate", min=1)
    allocator: Optional[str] = option(None, "per-layer allocator instead of the §3.3 search: tlnle, greedy, dp, "
                                      "weights (search/allocators.py); no Hook choice")
    act: Optional[float] = option(None, "with --allocator: target Act (default: --tolerance)")
    calib_blocks: int = option(8, "with --allocator: blocks for the sensitivity", min=1)

    def check(self) -> None:
        super().check()
        if self.act is not None and self.allocator is None:
            raise SearchError("--act needs --allocator (the §3.3 search works from --tolerance)")
        if str(self.out) == "-":
            raise SearchError("--out must be a file name for the plan JSON")

    def log_path(self) -> Path:
        """``--log``, else ``<out stem>_log.jsonl`` next to ``--out``."""
        out = Path(self.out).expanduser()
        return self.log or out.with_name(out.stem + "_log.jsonl")

    def summary_path(self) -> Path:
        """``<out stem>_search.json`` next to ``--out``: the search's summary."""
        out = Path(self.out).expanduser()
        return out.with_name(out.stem + "_search.json")



def train_hook_at(mm, layer: int, plan: Any, train_blocks: torch.Tensor, val_blocks: torch.Tensor | None = None, *,
                  steps: int = SearchSettings.default("hook_steps"), lr: float | None = None,
                  batch_size: int = SearchSettings.default("hook_batch_size"), objective: str | None = None,
                  out_dir: str | Path | None = None, progress: bool = False, **kw):
    """Train a Hook at ``layer`` under ``plan`` with :func:`hookmoe.train.train_hook` (its defaults for a
    ``None`` lr / objective); the Hook stays attached to ``mm``. Returns the TrainResult."""
    from hookmoe import training as _train
    from hookmoe.hook.inject import get_hooks

    args: dict[str, Any] = dict(layers=[int(layer)], plan=plan, train_blocks=train_blocks, val_blocks=val_blocks,
                                steps=int(steps), batch_size=min(int(batch_size), int(train_blocks.shape[0])),
                                out_dir=out_dir, progress=progress, **kw)
    if lr is not None:
        args["lr"] = float(lr)
    if objective is not None:
        args["objective"] = objective
    res = _train.train_hook(mm, **args)
    if get_hooks(mm) is None:
        raise SearchError("hook training finished but left no Hook attached to the model")
    return res


def _remove_hooks(mm) -> None:
    from hookmoe.hook.inject import remove_hooks

    remove_hooks(mm)


class _Budget(Exception):
    pass


class _Log:
    def __init__(self, path: str | Path | None, console=None):
        self.entries: list[dict] = []
        self.path = Path(path) if path else None
        self.console = console
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def add(self, entry: dict) -> None:
        self.entries.append(entry)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        if self.console is not None:
            if "score" in entry:
                ok = "ok" if entry.get("within") else "over"
                if entry.get("within") is None:
                    ok = ""
                what = str(entry.get("label", entry.get("plan")))
                self.console.print(f"  {'[' + entry['phase'] + ']'} {what}: "
                                   f"score {entry['score']:.4f} (drop {100 * entry.get('drop', 0):+.2f}%) "
                                   f"Act {entry.get('act', float('nan')):.3f} {ok}"
                                   + (" (cached)" if entry.get("cached") else ""), highlight=False, markup=False)
            elif entry.get("event"):
                self.console.print(f"  {'[' + entry.get('phase', '') + ']'} {entry['event']}",
                                   highlight=False, markup=False)


def tlnle_for_act(mm, act: float) -> str:
    """The TLNLE plan (base k, first reduced layer l) whose Act is closest to ``act`` (ties: the higher Act)."""
    moe = mm.moe_layer_indices
    best = None
    for kb in range(2, mm.native_top_k + 1):
        for l in range(moe[0], moe[-1] + 1):
            a = sum(kb if i < l else kb - 1 for i in moe) / len(moe)
            cand = (abs(a - act), -a, kb, l)
            if best is None or cand < best:
                best = cand
    if best is None:
        raise SearchError(f"TLNLE needs base k >= 2, but this model's native k is {mm.native_top_k}")
    return f"tlnle:k={best[2]},l={best[3]}"


def search(mm, scorer: Scorer, *, hook_plan: Any = None, train_blocks: torch.Tensor | None = None,
           train_fn: Callable | None = None, log_path: str | Path | None = None, console=None,
           progress: bool = False, **settings) -> dict:
    """The paper's §3.3 search with tolerance ``tolerance`` (relative score drop; perplexity: relative rise).
    ``settings``: :class:`SearchSettings` fields, with its defaults (``hook_candidates``: a spec like ``"8-20"`` or
    a sequence of layers).

    1. ``k``: lower the uniform top-k from the native k while the drop stays within the tolerance (k >= 1).
    2. ``l``: with ``TLNLE(k, l)`` (k-1 experts from layer l up; needs k >= 2), lower l from the last layer
       group to the first, over groups of ``step`` layers (default L/8, as the sweep), while within the
       tolerance.
    3. Hook: under ``hook_plan`` (default: every layer at k-1, or top-1 when k is 1) train a small Hook at
       candidate layers chosen by binary search (assuming a unimodal score over depth) and keep the best.

    Every evaluated point goes to the log (and ``log_path`` as JSONL). ``max_evals`` caps fresh
    evaluations (each Hook candidate counts one); when reached the search stops with the best so far.
    ``train_fn(layer, plan)`` replaces the Hook training (it must leave the Hook attached).
    """
    s = SearchSettings(**settings)
    tolerance, step, max_evals = s.tolerance, s.step, s.max_evals
    t0 = time.perf_counter()
    log = _Log(log_path, console)
    used = {"n": 0}
    exhausted = False

    def point(phase: str, plan: str, label: str | None = None, **extra) -> dict:
        cached = scorer.cached(plan) is not None
        if not cached and max_evals is not None and used["n"] >= max_evals:
            raise _Budget
        t = time.perf_counter()
        res = scorer(plan, progress=progress)
        if not cached:
            used["n"] += 1
        d = scorer.drop(base["score"], res["score"]) if base is not None else 0.0
        entry = {"phase": phase, "plan": plan, "label": label or plan, "score": res["score"], "drop": d,
                 "act": res["act"], "within": d <= tolerance, "cached": cached,
                 "evals": used["n"], "time_s": time.perf_counter() - t, **extra}
        log.add(entry)
        return entry

    base = None
    base_entry = point("base", "native")
    base = {"score": base_entry["score"], "act": base_entry["act"]}
    native_k = mm.native_top_k
    k_best, l_best = native_k, None
    best_entry = base_entry
    try:
        # phase 1: uniform k
        for k in range(native_k - 1, 0, -1):
            e = point("k", f"topk:{k}", k=k)
            if not e["within"]:
                break
            k_best, best_entry = k, e
        # phase 2: TLNLE l
        if k_best >= 2:  # l walks down the group starts of the sweep (so its scores are reused)
            for l, _ in reversed(layer_groups(mm, step)[1:]):
                e = point("l", f"tlnle:k={k_best},l={l}", k=k_best, l=l)
                if not e["within"]:
                    break
                l_best, best_entry = l, e
    except _Budget:
        exhausted = True
        log.add({"phase": "search", "event": f"evaluation budget of {max_evals} reached"})
    if l_best is not None:
        plan_str = f"tlnle:k={k_best},l={l_best}"
    elif k_best != native_k:
        plan_str = f"topk:{k_best}"
    else:
        plan_str = "native"
    result: dict[str, Any] = {
        "tolerance": tolerance, "metric": scorer.metric, "higher_is_better": scorer.higher_is_better,
        "base": {"plan": "native", **base}, "k": k_best, "l": l_best, "plan": plan_str,
        "score": best_entry["score"], "drop": best_entry["drop"], "act": best_entry["act"], "hook": None,
    }
    # phase 3: the hook layer
    if s.hook and not exhausted:
        hp = str(hook_plan) if hook_plan is not None else f"topk:{max(1, k_best - 1)}"
        cands, train_fn = _hook_trials(mm, s, train_blocks, train_fn)
        try:
            no_hook = point("hook", hp, label=f"{hp} (no hook)")
            result["hook"] = select_hook_layer(mm, scorer, hp, cands, train_fn, base=base, tolerance=tolerance,
                                               log=log, budget=(used, max_evals), progress=progress)
            result["hook"]["no_hook_score"] = no_hook["score"]
            result["hook"]["no_hook_act"] = no_hook["act"]
        except _Budget:
            exhausted = True
            log.add({"phase": "hook", "event": f"evaluation budget of {max_evals} reached"})
    result.update({"evals": used["n"], "budget_exhausted": exhausted, "log": log.entries,
                   "time_s": time.perf_counter() - t0})
    return result


def _hook_trials(mm, s: SearchSettings, train_blocks: torch.Tensor | None,
                 train_fn: Callable | None) -> tuple[list[int], Callable]:
    """The candidate Hook layers (checked to be MoE layers) and how a candidate is trained."""
    given = layer_candidates(s.hook_candidates)
    cands = sorted(set(given if given is not None else mm.moe_layer_indices))
    for c in cands:
        mm.layer(c)  # raises for a non-MoE layer
    if train_fn is not None:
        return cands, train_fn
    if train_blocks is None:
        raise SearchError("choosing the Hook layer needs training blocks (or hook=False)")

    def train(layer: int, plan: Any):  # short runs, judged by the scorer: no validation inside
        return train_hook_at(mm, layer, plan, train_blocks, None, steps=s.hook_steps, lr=s.hook_lr,
                             batch_size=s.hook_batch_size, objective=s.hook_objective, progress=False)

    return cands, train


def select_hook_layer(mm, scorer: Scorer, plan: Any, candidates: Sequence[int], train_fn: Callable, *,
                      base: dict, tolerance: float, log: _Log | None = None, budget=None,
                      progress: bool = False) -> dict:
    """Binary search over sorted candidate layers for the best Hook (score after a short training).

    Compares neighbours ``c[mid]`` and ``c[mid+1]`` and keeps the better half, so ``2·log2(n)`` trainings
    suffice for a unimodal score over depth; the best layer seen wins.
    """
    cands = list(candidates)
    if not cands:
        raise SearchError("no candidate layers for the Hook")
    scores: dict[int, dict] = {}
    log = log or _Log(None)

    def at(i: int) -> float:
        layer = cands[i]
        if layer not in scores:
            if budget is not None:
                used, cap = budget
                if cap is not None and used["n"] >= cap:
                    raise _Budget
            t = time.perf_counter()
            try:
                train_fn(layer, plan)
                res = scorer.fresh(plan, progress=progress)
            finally:
                _remove_hooks(mm)
            if budget is not None:
                budget[0]["n"] += 1
            d = relative_drop(base["score"], res["score"], scorer.higher_is_better)
            scores[layer] = {"score": res["score"], "drop": d, "act": res["act"]}
            log.add({"phase": "hook", "plan": str(plan), "label": f"{plan} + hook@{layer}", "layer": layer,
                     "score": res["score"], "drop": d, "act": res["act"], "within": d <= tolerance,
                     "cached": False, "evals": budget[0]["n"] if budget else None, "time_s": time.perf_counter() - t})
        return scores[layer]["score"]

    def better(a: float, b: float) -> bool:
        return a > b if scorer.higher_is_better else a < b

    lo, hi = 0, len(cands) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if better(at(mid), at(mid + 1)) or at(mid) == at(mid + 1):
            hi = mid
        else:
            lo = mid + 1
    at(lo)
    at(hi)
    best = min(scores, key=lambda c: (-scores[c]["score"] if scorer.higher_is_better else scores[c]["score"], c))
    return {"plan": str(plan), "layer": best, "score": scores[best]["score"], "drop": scores[best]["drop"],
            "act": scores[best]["act"], "candidates": {str(c): v for c, v in sorted(scores.items())},
            "searched": cands}


def search_plan(result: dict) -> Plan:
    """The searched (training-free) plan as a Plan, with the search summary and the Hook choice in meta."""
    meta = {"search": {k: result[k] for k in ("tolerance", "metric", "k", "l", "score", "drop", "act", "evals",
                                             "budget_exhausted")},
            "base": result["base"]}
    if result.get("hook"):
        meta["hook"] = {k: v for k, v in result["hook"].items() if k != "candidates"}
    return Plan(base=result["plan"], meta=meta)


def default_hook_layer(mm) -> int:
    """The paper's choice scaled to depth (Mixtral: layer 14 of 32), snapped to an MoE layer."""
    moe = mm.moe_layer_indices
    want = round(0.44 * (mm.num_layers - 1))
    return min(moe, key=lambda i: (abs(i - want), i))
