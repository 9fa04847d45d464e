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
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .compat import split_router_output
from .errors import PlanError, UserError
from .evaluate import (
    EvalError,
    eval_mode,
    evaluate,
    finish_result,
    hook_signature,
    perplexity_core,
    progress_bar,
    relative_drop,
    routing_scope,
)
from .routing import Dynamic, Plan, TopK, router_probs

DYNAMIC_KINDS = ("topp", "ratio", "naee", "entropy")
#: Hook learning rate for the short CPU-budget trainings of search / compare / run (tens to hundreds of
#: steps). The paper's 1e-4 is for 512 x 2048-token samples; hookmoe.train keeps that as its own default.
QUICK_HOOK_LR = 1e-3
METHODS = ("native", "topk", "tlnle", "topp", "ratio", "naee", "entropy", "hook", "hook+tlnle")


class SearchError(UserError):
    """A sweep, search, comparison or pipeline cannot run with the given input."""


# --------------------------------------------------------------------------------------------------
# Forward passes that start or stop at a decoder layer
# --------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _passthrough(hidden_states=None, *args, **kwargs):
    return hidden_states


_MISSING = object()


def run_partial(mm, ids: torch.Tensor, *, start: int = 0, hidden: torch.Tensor | None = None,
                stop: int | None = None) -> torch.Tensor:
    """Run the model on ``ids`` with decoder layers ``< start`` skipped and ``hidden`` fed into layer ``start``.

    With ``stop``, return the hidden states entering decoder layer ``stop`` (nothing above it runs);
    otherwise return the logits. Embeddings, masks and position embeddings are computed as usual, so the
    result equals a full forward whose layers below ``start`` produced ``hidden``.
    """
    layers = mm.decoder_layers
    handles, patched, captured = [], [], {}
    try:
        if hidden is not None and start > 0:
            for i in range(start):
                layer = layers[i]
                patched.append((layer, layer.__dict__.get("forward", _MISSING)))
                layer.forward = _passthrough

            def feed(module, args, kwargs):
                if args:
                    return (hidden,) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = hidden
                return args, kwargs

            handles.append(layers[start].register_forward_pre_hook(feed, with_kwargs=True))
        if stop is not None:
            def grab(module, args, kwargs):
                captured["h"] = args[0] if args else kwargs["hidden_states"]
                raise _Stop

            handles.append(layers[stop].register_forward_pre_hook(grab, with_kwargs=True))
        try:
            out = mm.model(input_ids=ids, use_cache=False)
        except _Stop:
            return captured["h"]
        if stop is not None:  # pragma: no cover - the stop layer always runs
            raise RuntimeError(f"decoder layer {stop} was not reached")
        return out.logits
    finally:
        for h in handles:
            h.remove()
        for layer, prev in patched:
            if prev is _MISSING:
                del layer.forward
            else:
                layer.forward = prev


def _forward_stack(mm, ids: torch.Tensor) -> None:
    """A forward pass that skips the LM head when the model exposes its decoder stack."""
    base = getattr(mm.model, "model", None)
    if isinstance(base, torch.nn.Module) and any(m is mm.decoder_layers for m in base.children()):
        base(input_ids=ids, use_cache=False)
    else:
        mm.model(input_ids=ids, use_cache=False)


def _batches(blocks: torch.Tensor, batch_size: int):
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i:i + batch_size]


# --------------------------------------------------------------------------------------------------
# Router statistics and calibration
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerRouterStats:
    """Router statistics of one MoE layer over calibration tokens."""

    p_sorted: torch.Tensor  # [tokens, candidates] candidate probabilities, descending
    entropy: torch.Tensor  # [tokens] routing entropy over all experts

    def ratio(self, j: int = 1) -> torch.Tensor:
        """p_{j+1} / p_1 per token (the NAEE statistic for j=1)."""
        if self.p_sorted.shape[1] <= j:
            return torch.zeros(self.p_sorted.shape[0])
        return self.p_sorted[:, j] / self.p_sorted[:, 0].clamp_min(1e-20)


def collect_router_stats(mm, blocks: torch.Tensor, *, plan: Any = "native", batch_size: int = 8,
                         progress: bool = False) -> dict[int, LayerRouterStats]:
    """Candidate probabilities and routing entropy per token, per MoE layer, under ``plan``.

    Forward hooks on every ``MoELayer.router`` (registered before the plan's own hooks, so they see the
    router's raw candidates) turn the router logits into probabilities with ``routing.router_probs``.
    """
    store: dict[int, list] = {layer.index: [] for layer in mm.layers}
    ent: dict[int, list] = {layer.index: [] for layer in mm.layers}
    score, n_exp = mm.adapter.score, mm.num_experts

    def make(i: int):
        def hook(module, args, out):
            ro = split_router_output(out, n_exp)
            if ro.logits is None:
                raise SearchError("this model's router returns no logits, so routing statistics cannot be collected")
            probs = router_probs(ro.logits.reshape(-1, ro.logits.shape[-1]), score)
            p = probs.gather(-1, ro.index.reshape(-1, ro.index.shape[-1]))
            store[i].append(p.sort(-1, descending=True).values.float().cpu())
            ent[i].append((-(probs * probs.clamp_min(1e-20).log()).sum(-1)).float().cpu())
            return None
        return hook

    handles = []
    try:
        with routing_scope(mm, plan), eval_mode(mm.model):
            for layer in mm.layers:
                handles.append(layer.router.register_forward_hook(make(layer.index), prepend=True))
            blocks = blocks.long()
            n_b = -(-blocks.shape[0] // batch_size)
            with progress_bar(progress, "router statistics", n_b) as advance:
                for batch in _batches(blocks, batch_size):
                    _forward_stack(mm, batch.to(mm.device))
                    advance(1)
    finally:
        for h in handles:
            h.remove()
    return {i: LayerRouterStats(torch.cat(store[i]), torch.cat(ent[i])) for i in store if store[i]}


def measure_act(mm, plan: Any, blocks: torch.Tensor, *, batch_size: int = 8) -> tuple[float, dict[int, float]]:
    """Measured Act (overall, per MoE layer) of ``plan`` on ``blocks`` (forward passes only)."""
    with routing_scope(mm, plan) as patch, eval_mode(mm.model):
        for batch in _batches(blocks.long(), batch_size):
            _forward_stack(mm, batch.to(mm.device))
        return patch.stats.act(), patch.stats.act_per_layer()


def plan_from_rules(rules: dict[int, Any], *, name: str | None = None, meta: dict | None = None) -> Plan:
    """A concrete plan: ``native`` base plus one entry per MoE layer."""
    return Plan(base="native", layers={str(i): r.describe() for i, r in sorted(rules.items())}, name=name,
                meta=dict(meta or {}))


def _cap(mm, rule) -> int:
    if isinstance(rule, Dynamic):
        return int(rule.max_k or mm.native_top_k)
    if isinstance(rule, TopK):
        return int(rule.k)
    return int(mm.native_top_k)


def entropy_thresholds(entropy: torch.Tensor, target: float, cap: int, num_experts: int) -> tuple[float, ...]:
    """Thresholds t_1 <= .. <= t_{cap-1} so that k = 1 + #(H > t_j) averages ``target`` over these tokens.

    The extra experts go to the highest-entropy tokens first: the j-th extra expert is given to the
    ``clip(target - j, 0, 1)`` fraction of tokens with the highest entropy.
    """
    h = entropy.double().numpy()
    extra = min(max(float(target) - 1.0, 0.0), cap - 1.0)
    never = max(math.log(max(2, num_experts)), float(h.max()) if h.size else 0.0) + 1.0  # above any entropy
    always = -1.0
    ts = []
    for j in range(1, cap):
        f = min(max(extra - (j - 1), 0.0), 1.0)
        if f >= 1.0:
            ts.append(always)
        elif f <= 0.0:
            ts.append(never)
        else:
            ts.append(float(np.quantile(h, 1.0 - f)))
    return tuple(sorted(ts))


def _bisect(measure: Callable[[float], tuple[float, dict]], lo: float, hi: float, target: float, *,
            increasing: bool, tol: float, max_iter: int) -> tuple[float, float, dict, int]:
    """Find x in [lo, hi] whose measured Act is closest to ``target``; returns (x, act, per_layer, evals)."""
    best = None
    n = 0
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        act, per = measure(mid)
        n += 1
        if best is None or abs(act - target) < abs(best[1] - target):
            best = (mid, act, per)
        if abs(act - target) <= tol:
            break
        if (act < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best[0], best[1], best[2], n


def _as_plan(plan_or_kind: Any, target_act: float | None) -> Plan:
    if isinstance(plan_or_kind, str):
        s = plan_or_kind.strip()
        if s in ("topp", "ratio"):
            return Plan.parse(f"{s}:0.5")
        if s == "entropy":
            if target_act is None:
                raise PlanError("entropy calibration needs a target Act (entropy:ACT or target_act=...)")
            return Plan.parse(f"entropy:{target_act:g}")
    return Plan.parse(plan_or_kind)


def calibrate_plan(mm, plan: Any, blocks: torch.Tensor, target_act: float | None = None, *, batch_size: int = 8,
                   tol: float = 0.01, max_iter: int = 14, progress: bool = False) -> Plan:
    """Fit a plan's dynamic rules on ``blocks`` (calibration tokens); return a concrete per-layer Plan.

    ``plan`` may be a plan (string, dict, file, Plan) or a bare kind (``naee``, ``topp``, ``ratio``,
    ``entropy``). Static layers of the plan stay as they are and count towards the target Act; the
    dynamic layers share what is left of it. Without ``target_act``: ``naee`` gets the per-layer medians
    of p2/p1, ``entropy:ACT`` hits ACT, and already concrete rules are kept (their Act is measured). The
    result's ``meta["calibration"]`` records the fit: kind, target, measured Act (overall and per layer),
    calibration tokens and the number of measurement passes.
    """
    p = _as_plan(plan, target_act)
    rules = p.resolve(mm)
    dyn = {i: r for i, r in rules.items() if isinstance(r, Dynamic)}
    if not dyn:
        raise PlanError(f"plan '{p.describe()}' has no dynamic rule (topp, ratio, naee, entropy) to calibrate")
    kinds = sorted({r.kind for r in dyn.values()})
    blocks = blocks.long()
    n_moe = len(rules)
    per_target = None
    if target_act is not None:
        if len(kinds) > 1:
            raise PlanError(f"calibrate one kind of dynamic rule at a time (this plan mixes {', '.join(kinds)})")
        static = sum(_cap(mm, r) for i, r in rules.items() if i not in dyn)
        per_target = (float(target_act) * n_moe - static) / len(dyn)
        lo_cap = min(_cap(mm, r) for r in dyn.values())
        if not 1.0 <= per_target <= lo_cap + 1e-9:
            raise PlanError(f"target Act {target_act:g} is out of reach for this plan (its dynamic layers would "
                            f"need {per_target:.3f} experts per token; possible: 1..{lo_cap})")
    t0 = time.perf_counter()
    passes = 0
    current = dict(rules)

    def measure_rules(rs: dict[int, Any]) -> tuple[float, dict]:
        nonlocal passes
        passes += 1
        return measure_act(mm, plan_from_rules(rs), blocks, batch_size=batch_size)

    candidates = {i: (TopK(_cap(mm, r)) if i in dyn else r) for i, r in rules.items()}
    with progress_bar(progress, f"calibrating {p.describe()}", None) as advance:
        # naee: per-layer medians of p2/p1, then a common scale for a target Act
        naee = {i: r for i, r in dyn.items() if r.kind == "naee"}
        if naee:
            need_stats = any(r.value is None for r in naee.values())
            stats = collect_router_stats(mm, blocks, plan=plan_from_rules(candidates), batch_size=batch_size) \
                if need_stats else {}
            passes += int(need_stats)
            betas = {i: (float(r.value) if r.value is not None else
                         (float(stats[i].ratio(1).median()) if i in stats else 0.0)) for i, r in naee.items()}
            for i, r in naee.items():
                current[i] = replace(r, value=min(1.0, max(0.0, betas[i])))
            if per_target is not None:
                pos = [b for b in betas.values() if b > 0]
                s_hi = 1.0 / min(pos) if pos else 1.0

                def m_naee(s: float):
                    advance(1)
                    for i, r in naee.items():
                        current[i] = replace(r, value=min(1.0, max(0.0, s * betas[i])))
                    return measure_rules(current)

                s, _, _, _ = _bisect(m_naee, 0.0, s_hi, float(target_act), increasing=False, tol=tol,
                                     max_iter=max_iter)
                for i, r in naee.items():
                    current[i] = replace(r, value=min(1.0, max(0.0, s * betas[i])))
        # entropy: per-layer quantile thresholds, refitted under the plan being built (upstream changes)
        ent = {i: r for i, r in dyn.items() if r.kind == "entropy"}
        fit_ent = {i: r for i, r in ent.items() if r.thresholds is None or per_target is not None}
        if fit_ent:
            goal = {i: (per_target if per_target is not None else float(r.value)) for i, r in fit_ent.items()}
            for i, r in fit_ent.items():
                cap = _cap(mm, r)
                if not 1.0 <= goal[i] <= cap:
                    raise PlanError(f"entropy target Act {goal[i]:g} is out of range for layer {i} (1..{cap})")
            plan_for_stats = dict(candidates)
            for it in range(3):
                stats = collect_router_stats(mm, blocks, plan=plan_from_rules(plan_for_stats), batch_size=batch_size)
                passes += 1
                advance(1)
                for i, r in fit_ent.items():
                    ts = entropy_thresholds(stats[i].entropy, goal[i], _cap(mm, r), mm.num_experts)
                    current[i] = replace(r, value=None, thresholds=ts)
                plan_for_stats = {**plan_for_stats, **{i: current[i] for i in fit_ent}}
                act, per = measure_rules(current)
                if all(abs(per.get(i, goal[i]) - goal[i]) <= tol for i in fit_ent):
                    break
        # topp / ratio: bisection on a common shift of the per-layer thresholds (keeps a depth schedule's slope)
        tau = {i: r for i, r in dyn.items() if r.kind in ("topp", "ratio")}
        if tau and per_target is not None:
            base = {i: float(r.value) for i, r in tau.items()}

            def m_tau(d: float):
                advance(1)
                for i, r in tau.items():
                    current[i] = replace(r, value=min(1.0, max(1e-4, base[i] + d)))
                return measure_rules(current)

            d, _, _, _ = _bisect(m_tau, -1.0, 1.0, float(target_act), increasing=True, tol=tol, max_iter=max_iter)
            for i, r in tau.items():
                current[i] = replace(r, value=min(1.0, max(1e-4, base[i] + d)))
        act, per = measure_rules(current)
    tokens = int(blocks.numel())
    name = p.describe() + (f" @Act {target_act:g}" if target_act is not None else "") + " (calibrated)"
    meta = dict(p.meta)
    meta["calibration"] = {
        "from": p.describe(), "kinds": kinds, "target_act": target_act, "measured_act": act,
        "act_per_layer": {str(i): a for i, a in sorted(per.items())}, "tokens": tokens, "passes": passes,
        "time_s": time.perf_counter() - t0,
    }
    return plan_from_rules(current, name=name, meta=meta)


# --------------------------------------------------------------------------------------------------
# Scoring with memoisation
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Sensitivity sweep
# --------------------------------------------------------------------------------------------------


def layer_groups(mm, group: int | None = None) -> list[tuple[int, int]]:
    """Consecutive decoder-layer groups of ``group`` layers (default: 8 groups) that hold an MoE layer."""
    n = mm.num_layers
    g = int(group) if group else max(1, n // 8)
    if g < 1:
        raise SearchError(f"group size must be >= 1, got {group}")
    moe = set(mm.moe_layer_indices)
    out = []
    for s in range(0, n, g):
        e = min(s + g, n) - 1
        if any(s <= i <= e for i in moe):
            out.append((s, e))
    return out


def sweep_plans(mm, group: int | None = None, k: int | None = None) -> list[dict]:
    """One ``tlnle:k=K,l=l,r=r`` plan per range of groups [group_i .. group_j], i <= j."""
    k = int(k or mm.native_top_k)
    if k < 2:
        raise SearchError(f"the sweep runs k-1 experts in a layer range, so it needs base k >= 2 (this model's "
                          f"native k is {mm.native_top_k}; pass a larger k)")
    groups = layer_groups(mm, group)
    out = []
    for gi, (l, _) in enumerate(groups):
        for gj in range(gi, len(groups)):
            r = groups[gj][1]
            out.append({"l": l, "r": r, "group_l": gi, "group_r": gj, "plan": f"tlnle:k={k},l={l},r={r}"})
    return out


def _row(res: dict, base: dict, scorer: Scorer, extra: dict) -> dict:
    return {**extra, "score": res["score"], "drop": scorer.drop(base["score"], res["score"]), "act": res["act"],
            "act_per_layer": res["act_per_layer"], "params_active": res["params"]["active"]}


def sweep(mm, scorer: Scorer, *, group: int | None = None, k: int | None = None, cache: bool = True,
          progress: bool = True) -> dict:
    """Score every layer-range plan; perplexity reuses the states entering each first reduced layer."""
    t0 = time.perf_counter()
    k = int(k or mm.native_top_k)
    plans = sweep_plans(mm, group, k)
    base_plan = "native" if k == mm.native_top_k else f"topk:{k}"
    base = scorer(base_plan)
    use_cache = bool(cache and scorer.metric == "ppl" and not scorer.eval_kw.get("window")
                     and not scorer.eval_kw.get("stride"))
    rows = []
    with progress_bar(progress, f"sweep ({len(plans)} plans)", len(plans)) as advance:
        if not use_cache:
            for p in plans:
                res = scorer(p["plan"])
                rows.append(_row(res, base, scorer, p))
                advance(1)
        else:
            by_l: dict[int, list[dict]] = {}
            for p in plans:
                by_l.setdefault(p["l"], []).append(p)
            blocks = scorer.blocks.long()
            bs = scorer.batch_size
            batches = [b.to(mm.device) for b in _batches(blocks, bs)]
            base_per = {int(i): a for i, a in base["act_per_layer"].items()}
            states: list[torch.Tensor] | None = None
            prev_l = 0
            for l in sorted(by_l):
                todo = [p for p in by_l[l] if scorer.cached(p["plan"]) is None]
                if todo and l > 0:
                    with routing_scope(mm, base_plan), eval_mode(mm.model):
                        states = [run_partial(mm, ids, start=prev_l, hidden=None if states is None else states[bi],
                                              stop=l) for bi, ids in enumerate(batches)]
                    prev_l = l
                for p in by_l[l]:
                    res = scorer.cached(p["plan"])
                    if res is None:
                        res = _cached_ppl(mm, scorer, p["plan"], l, states if l > 0 else None, base_per)
                        scorer.remember(p["plan"], res)
                        scorer.evals += 1
                    rows.append(_row(res, base, scorer, p))
                    advance(1)
            states = None
    return {"group": int(group) if group else max(1, mm.num_layers // 8), "groups": layer_groups(mm, group),
            "k": k, "metric": scorer.metric,
            "higher_is_better": scorer.higher_is_better, "base_plan": base_plan, "base_score": base["score"],
            "base_act": base["act"], "rows": rows, "layer_cache": use_cache, "time_s": time.perf_counter() - t0}


def _cached_ppl(mm, scorer: Scorer, plan: str, l: int, states, base_per: dict[int, float]) -> dict:
    t0 = time.perf_counter()
    with routing_scope(mm, plan) as patch:
        if states is None:
            fwd = None
        else:
            def fwd(bi: int, ids: torch.Tensor) -> torch.Tensor:
                return run_partial(mm, ids, start=l, hidden=states[bi])
        core = perplexity_core(mm, scorer.blocks, batch_size=scorer.batch_size, forward=fwd)
        per = patch.stats.act_per_layer()
        merged = {i: (base_per[i] if i < l and i in base_per else per.get(i, base_per.get(i))) for i in base_per}
        out = finish_result(mm, patch, {"metric": "ppl", "score": core["ppl"], "higher_is_better": False, **core,
                                        "layer_cache": states is not None}, act_per_layer=merged)
    out["time_s"] = time.perf_counter() - t0
    return out


def write_sweep(result: dict, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """sweep.json, sweep.csv and the heatmap sweep.png."""
    from . import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(out / "sweep.json", result)}
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["l", "r", "group_l", "group_r", "plan", "score", "drop", "act", "params_active"])
        for r in result["rows"]:
            w.writerow([r["l"], r["r"], r["group_l"], r["group_r"], r["plan"], f"{r['score']:.6g}",
                        f"{r['drop']:.6g}", f"{r['act']:.6g}", r["params_active"]])
    paths["csv"] = out / "sweep.csv"
    label = {"ppl": "perplexity", "mc": "accuracy", "lm-eval": "score"}.get(result["metric"], "score")
    paths["png"] = report.sweep_heatmap(result["rows"], out / "sweep.png", label=label,
                                        higher_is_better=result["higher_is_better"], base=result["base_score"],
                                        title=title or f"k={result['k']}->{result['k'] - 1} in layers l..r "
                                                       f"(base {label} {result['base_score']:.4g})")
    return paths


# --------------------------------------------------------------------------------------------------
# Hook training glue
# --------------------------------------------------------------------------------------------------


def train_hook_at(mm, layer: int, plan: Any, train_blocks: torch.Tensor, val_blocks: torch.Tensor | None = None, *,
                  steps: int = 20, lr: float | None = None, batch_size: int = 4, objective: str | None = None,
                  out_dir: str | Path | None = None, progress: bool = False, **kw):
    """Train a Hook at ``layer`` under ``plan`` with :func:`hookmoe.train.train_hook` (its defaults for a
    ``None`` lr / objective); the Hook stays attached to ``mm``. Returns the TrainResult."""
    from . import train as _train
    from .hook import get_hooks

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
    from .hook import remove_hooks

    remove_hooks(mm)


# --------------------------------------------------------------------------------------------------
# Search (paper §3.3)
# --------------------------------------------------------------------------------------------------


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
            from rich.markup import escape

            if "score" in entry:
                ok = "[green]ok[/green]" if entry.get("within") else "[red]over[/red]"
                if entry.get("within") is None:
                    ok = ""
                what = escape(str(entry.get("label", entry.get("plan"))))
                self.console.print(f"  {escape('[' + entry['phase'] + ']')} {what}: "
                                   f"score {entry['score']:.4f} (drop {100 * entry.get('drop', 0):+.2f}%) "
                                   f"Act {entry.get('act', float('nan')):.3f} {ok}"
                                   + (" (cached)" if entry.get("cached") else ""), highlight=False)
            elif entry.get("event"):
                self.console.print(f"  {escape('[' + entry.get('phase', '') + ']')} {escape(entry['event'])}",
                                   highlight=False)


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


def search(mm, scorer: Scorer, *, tolerance: float = 0.01, step: int | None = None, max_evals: int | None = None,
           hook: bool = True, hook_plan: Any = None, hook_candidates: Sequence[int] | None = None,
           train_blocks: torch.Tensor | None = None, hook_steps: int = 20,
           hook_lr: float | None = QUICK_HOOK_LR, hook_batch_size: int = 4, hook_objective: str | None = None,
           train_fn: Callable | None = None, log_path: str | Path | None = None, console=None,
           progress: bool = False) -> dict:
    """The paper's §3.3 search with tolerance ``tolerance`` (relative score drop; perplexity: relative rise).

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
    if not tolerance >= 0 or not math.isfinite(tolerance):
        raise SearchError(f"tolerance must be a non-negative fraction (0.01 = 1%), got {tolerance}")
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
    if hook and not exhausted:
        hp = str(hook_plan) if hook_plan is not None else f"topk:{max(1, k_best - 1)}"
        cands = sorted(set(int(c) for c in (hook_candidates if hook_candidates is not None
                                            else mm.moe_layer_indices)))
        for c in cands:
            mm.layer(c)  # raises for a non-MoE layer
        if train_fn is None:
            if train_blocks is None:
                raise SearchError("choosing the Hook layer needs training blocks (or hook=False)")

            def train_fn(layer: int, plan: Any):  # short runs, judged by the scorer: no validation inside
                return train_hook_at(mm, layer, plan, train_blocks, None, steps=hook_steps, lr=hook_lr,
                                     batch_size=hook_batch_size, objective=hook_objective, progress=False)
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


# --------------------------------------------------------------------------------------------------
# Comparison at a matched Act
# --------------------------------------------------------------------------------------------------


def default_hook_layer(mm) -> int:
    """The paper's choice scaled to depth (Mixtral: layer 14 of 32), snapped to an MoE layer."""
    moe = mm.moe_layer_indices
    want = round(0.44 * (mm.num_layers - 1))
    return min(moe, key=lambda i: (abs(i - want), i))


def compare(mm, scorer: Scorer, act: float, *, methods: Sequence[str] | None = None,
            calib_blocks: torch.Tensor | None = None, train_blocks: torch.Tensor | None = None,
            val_blocks: torch.Tensor | None = None, hook_dir: str | Path | None = None, hook_layer: int | None = None,
            hook_steps: int = 30, hook_lr: float | None = QUICK_HOOK_LR, hook_batch_size: int = 4,
            hook_objective: str | None = None, hook_out: str | Path | None = None, console=None,
            progress: bool = False, batch_size: int = 8) -> dict:
    """Score every method at Act ≈ ``act`` on the scorer's data; dynamic rules calibrated on ``calib_blocks``."""
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SearchError(f"unknown method(s) {', '.join(bad)} (choose from: {', '.join(METHODS)})")
    if not 1.0 <= act <= mm.native_top_k:
        raise SearchError(f"target Act must be between 1 and the native k ({mm.native_top_k}), got {act:g}")
    t0 = time.perf_counter()
    rows: list[dict] = []
    native = scorer("native")

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False)

    def add(method: str, plan: Any, res: dict | None, note: str | None = None, **extra) -> None:
        row = {"method": method, "plan": Plan.parse(plan).describe() if plan is not None else None, **extra}
        if res is not None:
            row.update({"score": res["score"], "act": res["act"], "params_active": res["params"]["active"],
                        "params_total": res["params"]["total"], "drop": scorer.drop(native["score"], res["score"]),
                        "rules": res["rules"], "plan_json": res["plan_json"]})
        if note:
            row["note"] = note
        rows.append(row)
        if res is not None:
            say(f"  {method:<11} score {res['score']:.4f}  Act {res['act']:.3f}  {row['plan']}")
        else:
            say(f"  {method:<11} skipped: {note}")

    k_ceil = max(1, min(mm.native_top_k, int(math.ceil(act - 1e-9))))
    k_floor = max(1, min(mm.native_top_k, int(math.floor(act + 1e-9))))
    tl = None
    try:
        tl = tlnle_for_act(mm, act)
    except SearchError as e:
        tl_err = str(e)
    hook_ready = False
    for m in methods:
        try:
            if m == "native":
                add(m, "native", native)
            elif m == "topk":
                for kk in sorted({k_floor, k_ceil}):
                    add(m, f"topk:{kk}", scorer(f"topk:{kk}"))
            elif m == "tlnle":
                if tl is None:
                    add(m, None, None, tl_err)
                else:
                    add(m, tl, scorer(tl))
            elif m in DYNAMIC_KINDS:
                if calib_blocks is None:
                    raise SearchError("dynamic rules need calibration blocks")
                start = {"topp": "topp:0.5", "ratio": "ratio:0.5", "naee": "naee", "entropy": f"entropy:{act:g}"}[m]
                plan = calibrate_plan(mm, start, calib_blocks, target_act=act, batch_size=batch_size)
                add(m, plan, scorer(plan), calibration=plan.meta.get("calibration"))
            elif m in ("hook", "hook+tlnle"):
                if not hook_ready:
                    layer = hook_layer if hook_layer is not None else default_hook_layer(mm)
                    if hook_dir is not None:
                        from .hook import attach_hooks

                        hs = attach_hooks(mm, hook_dir)
                        say(f"  attached hook {hook_dir} (layers {hs.layers})")
                    else:
                        if train_blocks is None:
                            raise SearchError("the hook methods need training blocks or --hook DIR")
                        say(f"  training a hook at layer {layer} under topk:{k_floor} ({hook_steps} steps)")
                        train_hook_at(mm, layer, f"topk:{k_floor}", train_blocks, val_blocks, steps=hook_steps,
                                      lr=hook_lr, batch_size=hook_batch_size, objective=hook_objective,
                                      out_dir=hook_out, progress=progress)
                    hook_ready = True
                from .hook import get_hooks

                hs = get_hooks(mm)
                plan = f"topk:{k_floor}" if m == "hook" else tl
                if plan is None:
                    add(m, None, None, tl_err)
                else:
                    add(m, plan, scorer(plan), hook_layers=hs.layers if hs else None)
        except UserError as e:
            add(m, None, None, str(e))
    if hook_ready:
        _remove_hooks(mm)
    return {"act": act, "metric": scorer.metric, "higher_is_better": scorer.higher_is_better,
            "native_score": native["score"], "rows": rows, "time_s": time.perf_counter() - t0}


def compare_markdown(result: dict) -> str:
    from . import report

    pct_metric = result["metric"] in ("mc", "lm-eval")
    rows = []
    for r in result["rows"]:
        if r.get("score") is None:
            rows.append([r["method"], r.get("plan") or "-", "-", "-", "-", "-", r.get("note", "")])
            continue
        score = f"{100 * r['score']:.2f}%" if pct_metric else f"{r['score']:.4f}"
        rows.append([r["method"], r["plan"], score, f"{r['act']:.3f}", f"{r['params_active']:,}",
                     report.pct(-r["drop"] if result["higher_is_better"] else r["drop"]), r.get("note", "")])
    head = ["method", "plan", "accuracy" if pct_metric else "perplexity", "Act", "active params",
            "vs native", "note"]
    return report.markdown_table(head, rows)


def write_compare(result: dict, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    from . import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(out / "compare.json", result)}
    md = f"# {title or 'Method comparison'}\n\nTarget Act {result['act']:g}; metric {result['metric']}.\n\n"
    md += compare_markdown(result) + "\n"
    (out / "compare.md").write_text(md)
    paths["md"] = out / "compare.md"
    pts = [{"label": r["plan"] if r["method"] == "topk" else r["method"], "score": r["score"], "act": r["act"]}
           for r in result["rows"] if r.get("score") is not None]
    paths["png"] = report.quality_vs_act(pts, out / "compare.png", baseline=result["native_score"],
                                         ylabel={"ppl": "perplexity"}.get(result["metric"], "accuracy"),
                                         title=title or f"quality vs Act (target {result['act']:g})")
    return paths


# --------------------------------------------------------------------------------------------------
# The one-command pipeline
# --------------------------------------------------------------------------------------------------


def run_pipeline(mm, *, calib: str, out: str | Path, tolerance: float = 0.01, data: str | None = None,
                 mc: str | None = None, group: int | None = None, block_len: int = 128, n_train: int = 32,
                 n_val: int = 8, n_eval: int = 16, search_hook_steps: int = 20, hook_steps: int = 100,
                 hook_lr: float | None = QUICK_HOOK_LR, hook_batch_size: int = 4, objective: str | None = None,
                 max_evals: int | None = None, hook_candidates: Sequence[int] | None = None, batch_size: int = 8,
                 seed: int = 0, console=None, progress: bool = True, model_name: str | None = None,
                 command: str | None = None) -> dict:
    """sweep → search → train → eval → report, all on one loaded model; everything lands in ``out``."""
    from . import report
    from .data import make_blocks

    t_start = time.perf_counter()
    out = Path(out)
    if (out / "hook").exists() and any((out / "hook").iterdir()):
        raise SearchError(f"{out / 'hook'} already holds a Hook run; choose a new --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    if mm.tokenizer is None:
        raise SearchError("this model has no tokenizer, so text data cannot be tokenised")

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    say(f"[bold]1/6 data[/bold]: {n_train}+{n_val} blocks from the train split of {calib}, {n_eval} held-out "
        f"blocks from {data or calib} ({block_len} tokens each)")
    tv = make_blocks(mm.tokenizer, calib, n_train + n_val, block_len, seed=seed, split="train", progress=progress)
    train_blocks, val_blocks = tv[:n_train], tv[n_train:]
    eval_blocks = make_blocks(mm.tokenizer, data or calib, n_eval, block_len, seed=seed, split="heldout",
                              progress=progress)
    mc_items = None
    if mc:
        from .evaluate import load_mc_source

        mc_items = load_mc_source(mc, seed=seed)
    timings["data"] = time.perf_counter() - t

    val = Scorer(mm, "ppl", blocks=val_blocks, batch_size=batch_size)
    t = time.perf_counter()
    sw = None
    if mm.native_top_k >= 2:
        say("[bold]2/6 sweep[/bold]: k-1 experts in every layer range (validation perplexity)")
        sw = sweep(mm, val, group=group, progress=progress)
        write_sweep(sw, out)
    else:
        say("[bold]2/6 sweep[/bold]: skipped (native k is 1)")
    timings["sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"[bold]3/6 search[/bold]: tolerance {100 * tolerance:g}% (relative perplexity rise on validation blocks)")
    sr = search(mm, val, tolerance=tolerance, step=group, max_evals=max_evals, hook=True,
                hook_candidates=hook_candidates, train_blocks=train_blocks,
                hook_steps=search_hook_steps, hook_lr=hook_lr, hook_batch_size=hook_batch_size,
                hook_objective=objective, log_path=out / "search_log.jsonl", console=console)
    splan = search_plan(sr)
    splan.save(out / "plan.json")
    report.write_json(out / "search.json", {k: v for k, v in sr.items() if k != "log"})
    timings["search"] = time.perf_counter() - t

    hook_plan = sr["hook"]["plan"] if sr.get("hook") else f"topk:{max(1, sr['k'] - 1)}"
    hook_layer = sr["hook"]["layer"] if sr.get("hook") else default_hook_layer(mm)
    Plan(base=hook_plan, meta={"hook_layer": hook_layer, "hook_dir": "hook"}).save(out / "hook_plan.json")
    t = time.perf_counter()
    say(f"[bold]4/6 train[/bold]: Hook at layer {hook_layer} under {hook_plan}, {hook_steps} steps")
    tr = train_hook_at(mm, hook_layer, hook_plan, train_blocks, val_blocks, steps=hook_steps, lr=hook_lr,
                       batch_size=hook_batch_size, objective=objective, out_dir=out / "hook", progress=progress)
    history = list(getattr(tr, "history", []) or [])
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[bold]5/6 eval[/bold]: held-out perplexity" + (" and multiple choice" if mc_items else ""))
    from .hook import get_hooks

    hs = get_hooks(mm)
    if hs is None:
        raise SearchError("hook training finished but left no Hook attached to the model")
    evals: dict[str, dict] = {}
    plans = [("native", "native", False), ("searched plan", sr["plan"], False),
             ("reduced (no hook)", hook_plan, False), ("reduced + hook", hook_plan, True)]
    if sr["plan"] != "native" and sr["plan"] != hook_plan:
        plans.append(("searched plan + hook", sr["plan"], True))
    done: dict[tuple, dict] = {}
    for label, plan, with_hook in plans:
        key = (Plan.parse(plan).describe(), with_hook)
        if key not in done:
            with contextlib.nullcontext() if with_hook else hs.disabled():
                r = evaluate(mm, plan, metric="ppl", blocks=eval_blocks, batch_size=batch_size, progress=progress)
                if mc_items is not None:
                    r["mc"] = evaluate(mm, plan, metric="mc", items=mc_items, batch_size=batch_size,
                                       progress=progress)
            done[key] = r
        r = dict(done[key], label=label, with_hook=with_hook)
        evals[label] = r
    _remove_hooks(mm)
    timings["eval"] = time.perf_counter() - t

    nat, red, hk = evals["native"], evals["reduced (no hook)"], evals["reduced + hook"]
    gap = _gap_recovered(nat["score"], red["score"], hk["score"])
    gap_mc = None
    if mc_items is not None:
        gap_mc = _gap_recovered(nat["mc"]["score"], red["mc"]["score"], hk["mc"]["score"])
    t = time.perf_counter()
    say("[bold]6/6 report[/bold]")
    pts = [{"label": k, "score": v["score"], "act": v["act"]} for k, v in evals.items()]
    report.quality_vs_act(pts, out / "quality_vs_act.png", baseline=nat["score"], ylabel="held-out perplexity",
                          title="held-out perplexity vs Act")
    report.loss_curve(history, out / "hook_loss.png")
    summary = {
        "model": model_name or mm.source, "command": command, "calib": calib, "data": data or calib,
        "tolerance": tolerance, "block_len": block_len, "n_train": n_train, "n_val": n_val, "n_eval": n_eval,
        "search": {k: v for k, v in sr.items() if k != "log"}, "plan": splan.to_dict(),
        "hook": {"layer": hook_layer, "plan": hook_plan, "dir": str(out / "hook"), "steps": hook_steps,
                 "metrics": _jsonable(getattr(tr, "metrics", None))},
        "evals": evals, "gap_recovered": gap, "gap_recovered_mc": gap_mc, "timings_s": timings,
        "sweep": None if sw is None else {k: v for k, v in sw.items() if k != "rows"},
    }
    timings["report"] = time.perf_counter() - t
    summary["wall_time_s"] = time.perf_counter() - t_start
    report.write_json(out / "results.json", summary)
    (out / "report.md").write_text(_report_md(mm, summary, sw, sr, evals, history))
    summary["wall_time_s"] = time.perf_counter() - t_start
    report.write_json(out / "results.json", summary)
    return summary


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        return json.loads(json.dumps(x, default=str))


def _gap_recovered(native: float, reduced: float, hooked: float) -> float | None:
    """Share of the native-vs-reduced gap won back by the Hook (same for perplexity and accuracy)."""
    if reduced == native:
        return None
    return (reduced - hooked) / (reduced - native)


def _report_md(mm, s: dict, sw: dict | None, sr: dict, evals: dict, history: list) -> str:
    from . import report

    L = []
    L.append(f"# hookmoe run: {s['model']}\n")
    if s.get("command"):
        L.append(f"Command: `{s['command']}`\n")
    L.append(f"Calibration data: `{s['calib']}` (train split: {s['n_train']} training + {s['n_val']} validation "
             f"blocks of {s['block_len']} tokens); evaluation: held-out split of `{s['data']}` ({s['n_eval']} "
             f"blocks). Tolerance {100 * s['tolerance']:g}% (relative perplexity rise). "
             f"Model: {mm.arch}, {mm.num_layers} layers ({len(mm.layers)} MoE), {mm.num_experts} experts, "
             f"native top-{mm.native_top_k}.\n")
    L.append(f"Wall time: {s['wall_time_s']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings_s"].items())
             + ").\n")
    # results
    L.append("## Results (held-out)\n")
    mc = any("mc" in v for v in evals.values())
    head = ["", "plan", "hook", "perplexity", "Act", "active params", "vs native"]
    if mc:
        head += ["MC acc", "MC acc_norm"]
    rows = []
    nat = evals["native"]["score"]
    for label, r in evals.items():
        row = [label, r["plan"], f"layer {s['hook']['layer']}" if r.get("with_hook") else "-", f"{r['score']:.4f}",
               f"{r['act']:.3f}", f"{r['params']['active']:,} / {r['params']['total']:,}",
               report.pct((r["score"] - nat) / nat)]
        if mc:
            m = r.get("mc") or {}
            row += [f"{100 * m.get('acc', float('nan')):.2f}%", f"{100 * m.get('acc_norm', float('nan')):.2f}%"]
        rows.append(row)
    L.append(report.markdown_table(head, rows) + "\n")
    g = s.get("gap_recovered")
    L.append(f"Gap recovered by the Hook (perplexity): "
             f"{'n/a (no gap)' if g is None else f'{100 * g:.1f}%'}"
             + ("" if s.get("gap_recovered_mc") is None else f"; multiple choice: {100 * s['gap_recovered_mc']:.1f}%")
             + ".\n")
    # per-layer plan
    L.append("## Per-layer plan\n")
    sp, hp, hk = evals["searched plan"], evals["reduced (no hook)"], evals["reduced + hook"]
    rows: list[list] = []  # consecutive layers with the same entries share a row
    for layer in sorted(int(i) for i in sp["act_per_layer"]):
        k = str(layer)
        cells = [sp["rules"].get(k, ""), f"{sp['act_per_layer'][k]:.3f}", hp["rules"].get(k, ""),
                 "hook" if layer == s["hook"]["layer"] else "", f"{hk['act_per_layer'][k]:.3f}"]
        if rows and rows[-1][1:] == cells and rows[-1][0][1] == layer - 1:
            rows[-1][0] = (rows[-1][0][0], layer)
        else:
            rows.append([(layer, layer)] + cells)
    rows = [[str(r[0][0]) if r[0][0] == r[0][1] else f"{r[0][0]}-{r[0][1]}"] + r[1:] for r in rows]
    L.append(report.markdown_table(["layers", "searched plan", "Act", "hook plan", "hook", "Act (hook plan)"], rows)
             + "\n")
    # search
    L.append("## Search (validation perplexity)\n")
    L.append(f"Result: `{sr['plan']}` (k={sr['k']}, l={sr['l']}), drop {100 * sr['drop']:+.2f}% at Act "
             f"{sr['act']:.3f}; {sr['evals']} evaluations" + (" (budget exhausted)" if sr["budget_exhausted"] else "")
             + ". Log: `search_log.jsonl`.\n")
    rows = [[e["phase"], e.get("label", e.get("plan")), f"{e['score']:.4f}", report.pct(e.get("drop")),
             f"{e['act']:.3f}", "yes" if e.get("within") else "no"] for e in sr["log"] if "score" in e]
    L.append(report.markdown_table(["phase", "plan", "val ppl", "drop", "Act", "within tolerance"], rows) + "\n")
    if sr.get("hook"):
        h = sr["hook"]
        L.append(f"Hook layer: {h['layer']} (binary search over {h['searched']}; probed "
                 f"{', '.join(h['candidates'])}).\n")
    # sweep
    if sw is not None:
        L.append("## Sensitivity sweep\n")
        L.append(f"k={sw['k']} -> {sw['k'] - 1} in layers l..r; base validation perplexity {sw['base_score']:.4f}; "
                 f"{len(sw['rows'])} plans in {sw['time_s']:.1f} s (layer-input cache: {sw['layer_cache']}).\n")
        L.append("![sweep](sweep.png)\n")
        rows = [[r["l"], r["r"], f"{r['score']:.4f}", report.pct(r["drop"]), f"{r['act']:.3f}"] for r in sw["rows"]]
        L.append(report.markdown_table(["l", "r", "val ppl", "drop", "Act"], rows) + "\n")
    L.append("## Plots\n")
    L.append("![quality vs Act](quality_vs_act.png)\n")
    if history:
        L.append("![hook training loss](hook_loss.png)\n")
    L.append("## Files\n")
    L.append("- `plan.json` — the searched training-free plan (`hookmoe eval MODEL --plan plan.json`)\n"
             "- `hook_plan.json` + `hook/` — the plan the Hook was trained for and the Hook artifact "
             "(`hookmoe eval MODEL --plan hook_plan.json --hook hook`)\n"
             "- `results.json`, `search.json`, `search_log.jsonl`, `sweep.json`, `sweep.csv` — all numbers\n")
    return "\n".join(L)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise SearchError(f"{what} must be layer numbers like 2,3 or 4-7, got '{text}'") from None
    return out


def _scorer_for(mm, metric: str, data: str, *, n_blocks: int, block_len: int, seed: int, split: str,
                batch_size: int, tasks: Any = None, n_items: int | None = None, progress: bool = True,
                include_path: Any = None, limit: Any = None) -> Scorer:
    from .evaluate import METRICS, _eval_blocks, load_mc_source

    if metric not in METRICS:
        raise EvalError(f"unknown metric '{metric}' (use one of: {', '.join(METRICS)})")
    if metric == "ppl":
        return Scorer(mm, "ppl", blocks=_eval_blocks(mm, data, n_blocks, block_len, seed, split, progress),
                      batch_size=batch_size)
    if metric == "mc":
        return Scorer(mm, "mc", items=load_mc_source(data, n_items=n_items, seed=seed), batch_size=batch_size)
    return Scorer(mm, "lm-eval", tasks=tasks, batch_size=batch_size,
                  eval_kw={"include_path": include_path, "limit": limit})


def register_cli(app) -> None:
    import typer

    from .cli import MODEL_HELP, console, load_model

    @app.command("sweep")
    def sweep_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: str = typer.Option(..., help="text source (ppl) or MC file / builtin-mc (mc)"),
        group: Optional[int] = typer.Option(None, min=1, help="layers per group (default: 8 groups)"),
        k: Optional[int] = typer.Option(None, min=2, help="base k (default: native); k-1 runs in layers l..r"),
        out: Path = typer.Option(Path("sweep_out"), help="output directory (sweep.json, sweep.csv, sweep.png)"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks (with --metric lm-eval)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[int] = typer.Option(None, help="lm-eval: examples per task"),
        n_blocks: int = typer.Option(16, min=1), block_len: int = typer.Option(256, min=2),
        split: str = typer.Option("heldout"), n_items: Optional[int] = typer.Option(None),
        no_cache: bool = typer.Option(False, "--no-cache", help="recompute lower layers for every plan"),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """Sensitivity sweep: k-1 experts in every layer range [l, r] over groups of layers; heatmap."""
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        sc = _scorer_for(mm, metric, data, n_blocks=n_blocks, block_len=block_len, seed=seed, split=split,
                         batch_size=batch_size, tasks=tasks, n_items=n_items, include_path=include_path, limit=limit)
        res = sweep(mm, sc, group=group, k=k, cache=not no_cache, progress=True)
        res["model"], res["data"] = model, data
        paths = write_sweep(res, out)
        _print_sweep(console, res)
        console.print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']} ({res['time_s']:.1f} s)")

    @app.command("search")
    def search_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: str = typer.Option(..., help="text source scored by perplexity (or MC data with --metric mc)"),
        tolerance: float = typer.Option(0.01, help="allowed relative score drop (0.01 = 1%; ppl: relative rise)"),
        out: Path = typer.Option(Path("plan.json"), help="where to write the plan JSON"),
        log: Optional[Path] = typer.Option(None, help="JSONL log of every evaluated point (default: next to --out)"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks (with --metric lm-eval)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[int] = typer.Option(None, help="lm-eval: examples per task"),
        step: Optional[int] = typer.Option(None, min=1, help="layers per step when lowering l (default: L/8)"),
        max_evals: Optional[int] = typer.Option(None, min=1, help="cap on fresh evaluations (budget)"),
        hook: bool = typer.Option(True, "--hook/--no-hook", help="also choose the Hook layer (trains small hooks)"),
        hook_candidates: Optional[str] = typer.Option(None, help="candidate Hook layers, e.g. 8-20 (default: all MoE)"),
        hook_steps: int = typer.Option(20, min=1, help="training steps per Hook candidate"),
        hook_lr: float = typer.Option(QUICK_HOOK_LR, help="Hook learning rate (paper: 1e-4 on far more data)"),
        calib: Optional[str] = typer.Option(None, help="text source for Hook training (default: --data, train split)"),
        n_blocks: int = typer.Option(16, min=1, help="scoring blocks"), block_len: int = typer.Option(256, min=2),
        train_blocks: int = typer.Option(32, min=1, help="Hook training blocks per candidate"),
        split: str = typer.Option("heldout"), n_items: Optional[int] = typer.Option(None),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """TLNLE search (paper §3.3): lower k, then l, within the tolerance; then pick the Hook layer."""
        from . import report
        from .evaluate import _eval_blocks

        if not tolerance >= 0:
            raise SearchError(f"tolerance must be >= 0, got {tolerance}")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        sc = _scorer_for(mm, metric, data, n_blocks=n_blocks, block_len=block_len, seed=seed, split=split,
                         batch_size=batch_size, tasks=tasks, n_items=n_items, include_path=include_path, limit=limit)
        tb = None
        if hook:
            src = calib or (data if metric == "ppl" else "builtin")
            tb = _eval_blocks(mm, src, train_blocks, block_len, seed, "train", True)
        log_path = log or out.with_name(out.stem + "_log.jsonl")
        res = search(mm, sc, tolerance=tolerance, step=step, max_evals=max_evals, hook=hook,
                     hook_candidates=_parse_int_list(hook_candidates, "--hook-candidates"), train_blocks=tb,
                     hook_steps=hook_steps, hook_lr=hook_lr, log_path=log_path, console=console)
        plan = search_plan(res)
        plan.save(out)
        report.write_json(out.with_name(out.stem + "_search.json"), {k: v for k, v in res.items() if k != "log"})
        console.print(f"[bold]plan[/bold] {res['plan']}: score {res['score']:.4f} (drop {100 * res['drop']:+.2f}%, "
                      f"Act {res['act']:.3f}) after {res['evals']} evaluations in {res['time_s']:.1f} s")
        if res.get("hook"):
            h = res["hook"]
            console.print(f"[bold]hook[/bold] layer {h['layer']} under {h['plan']}: score {h['score']:.4f} "
                          f"(without hook {h['no_hook_score']:.4f})")
        console.print(f"wrote {out} and {log_path}")

    @app.command("compare")
    def compare_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: str = typer.Option(..., help="text source (ppl) or MC file / builtin-mc (mc)"),
        act: float = typer.Option(..., help="target Act (activated routed experts per token)"),
        methods: Optional[str] = typer.Option(None, help="comma-separated subset of: " + ", ".join(METHODS)),
        out: Path = typer.Option(Path("compare_out"), help="output directory (compare.md/.json/.png)"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks (with --metric lm-eval)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[int] = typer.Option(None, help="lm-eval: examples per task"),
        calib: Optional[str] = typer.Option(None, help="text source for calibration and Hook training "
                                            "(train split; default: --data for ppl, builtin otherwise)"),
        hook: Optional[Path] = typer.Option(None, help="use this Hook artifact instead of training one"),
        hook_layer: Optional[int] = typer.Option(None, help="layer for the trained Hook (default: ~0.44 depth)"),
        hook_steps: int = typer.Option(30, min=1),
        hook_lr: float = typer.Option(QUICK_HOOK_LR, help="Hook learning rate"),
        n_blocks: int = typer.Option(16, min=1), block_len: int = typer.Option(256, min=2),
        calib_blocks: int = typer.Option(8, min=1), train_blocks: int = typer.Option(32, min=1),
        split: str = typer.Option("heldout"), n_items: Optional[int] = typer.Option(None),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """All methods at a matched Act on the same data: one table (markdown + JSON) and a plot."""
        from .evaluate import _eval_blocks

        ms = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        if ms:
            bad = [m for m in ms if m not in METHODS]
            if bad:
                raise SearchError(f"unknown method(s) {', '.join(bad)} (choose from: {', '.join(METHODS)})")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        if not 1.0 <= act <= mm.native_top_k:
            raise SearchError(f"target Act must be between 1 and the native k ({mm.native_top_k}), got {act:g}")
        sc = _scorer_for(mm, metric, data, n_blocks=n_blocks, block_len=block_len, seed=seed, split=split,
                         batch_size=batch_size, tasks=tasks, n_items=n_items, include_path=include_path, limit=limit)
        src = calib or (data if metric == "ppl" else "builtin")
        need_cal = any(m in DYNAMIC_KINDS for m in (ms or METHODS))
        need_train = hook is None and any(m in ("hook", "hook+tlnle") for m in (ms or METHODS))
        n_cal = calib_blocks if need_cal else 0
        n_tr = train_blocks if need_train else 0
        cb = tb = None
        if n_cal + n_tr:
            both = _eval_blocks(mm, src, n_cal + n_tr, block_len, seed, "train", True)
            cb, tb = (both[:n_cal] if n_cal else None), (both[n_cal:] if n_tr else None)
        res = compare(mm, sc, act, methods=ms, calib_blocks=cb, train_blocks=tb, hook_dir=hook,
                      hook_layer=hook_layer, hook_steps=hook_steps, hook_lr=hook_lr,
                      hook_out=(out / "hook") if need_train else None, console=console, batch_size=batch_size)
        res["model"], res["data"] = model, data
        paths = write_compare(res, out, title=f"{model}: methods at Act {act:g}")
        print(compare_markdown(res))
        console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} ({res['time_s']:.1f} s)")

    @app.command("run")
    def run_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        calib: str = typer.Option(..., help="calibration text source (builtin, c4, math, hf:ID, file or folder)"),
        tolerance: float = typer.Option(0.01, help="allowed relative perplexity rise for the search (0.01 = 1%)"),
        out: Path = typer.Option(..., help="output directory (report.md, plots, hook/, JSON)"),
        data: Optional[str] = typer.Option(None, help="evaluation text source (held-out split; default: --calib)"),
        mc: Optional[str] = typer.Option(None, help="also report multiple-choice accuracy on this MC data "
                                         "(.jsonl, task.json or builtin-mc[:N])"),
        group: Optional[int] = typer.Option(None, min=1, help="layers per sweep group / search step (default L/8)"),
        block_len: int = typer.Option(128, min=2, help="tokens per block"),
        n_train: int = typer.Option(32, min=1, help="Hook training blocks"),
        n_val: int = typer.Option(8, min=1, help="validation blocks (sweep, search, Hook-layer choice)"),
        n_eval: int = typer.Option(16, min=1, help="held-out evaluation blocks"),
        search_hook_steps: int = typer.Option(20, min=1, help="training steps per Hook-layer candidate"),
        hook_steps: int = typer.Option(100, min=1, help="training steps of the final Hook"),
        hook_lr: float = typer.Option(QUICK_HOOK_LR, help="Hook learning rate (paper: 1e-4 on far more data)"),
        hook_batch_size: int = typer.Option(4, min=1),
        objective: Optional[str] = typer.Option(None, help="Hook training objective: kd | lm | hidden "
                                                "(default: hookmoe.train's)"),
        max_evals: Optional[int] = typer.Option(None, min=1, help="cap on search evaluations"),
        hook_candidates: Optional[str] = typer.Option(None, help="candidate Hook layers, e.g. 8-20"),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """One command: sweep → search → train → eval → report (report.md, plots, hook artifact, JSON)."""
        import sys

        if not tolerance >= 0:
            raise SearchError(f"tolerance must be >= 0, got {tolerance}")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        res = run_pipeline(mm, calib=calib, out=out, tolerance=tolerance, data=data, mc=mc, group=group,
                           block_len=block_len, n_train=n_train, n_val=n_val, n_eval=n_eval,
                           search_hook_steps=search_hook_steps, hook_steps=hook_steps, hook_lr=hook_lr,
                           hook_batch_size=hook_batch_size, objective=objective, max_evals=max_evals,
                           hook_candidates=_parse_int_list(hook_candidates, "--hook-candidates"),
                           batch_size=batch_size, seed=seed, console=console, model_name=model,
                           command="hookmoe " + " ".join(sys.argv[1:]) if sys.argv else None)
        g = res["gap_recovered"]
        console.print(f"[bold]done[/bold] in {res['wall_time_s']:.1f} s: plan {res['search']['plan']}, hook layer "
                      f"{res['hook']['layer']} under {res['hook']['plan']}; gap recovered "
                      f"{'n/a' if g is None else f'{100 * g:.1f}%'}; report: {Path(out) / 'report.md'}")


def _print_sweep(console, res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"sweep: k={res['k']}->{res['k'] - 1} in layers l..r (base {res['base_score']:.4f})")
    t.add_column("l \\ r")
    rs = sorted({r["r"] for r in res["rows"]})
    for r in rs:
        t.add_column(str(r), justify="right")
    for l in sorted({r["l"] for r in res["rows"]}):
        cells = []
        for r in rs:
            row = next((x for x in res["rows"] if x["l"] == l and x["r"] == r), None)
            cells.append("" if row is None else f"{row['score']:.4g} ({100 * row['drop']:+.1f}%)")
        t.add_row(str(l), *cells)
    console.print(t)
