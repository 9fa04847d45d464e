"""Calibrating dynamic rules to data: router statistics per layer, measured Act, and :func:`calibrate_plan`, which
fits ``naee`` / ``entropy`` / ``topp`` / ``ratio`` thresholds (to a target Act when given)."""

from __future__ import annotations

from hookmoe import progress as progress_bars

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from hookmoe.compat import split_router_output
from hookmoe.errors import PlanError
from hookmoe.routing.patch import eval_mode, routing_scope
from hookmoe.routing.plan import Dynamic, Plan, TopK
from hookmoe.routing.rules import router_probs
from hookmoe.errors import SearchError
from hookmoe.routing.partial import _batches, _forward_stack


DYNAMIC_KINDS = ("topp", "ratio", "naee", "entropy")


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
            with progress_bars.bar(progress, "router statistics", n_b) as advance:
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
    fit = _Calibration(mm, p, blocks.long(), target_act, batch_size=batch_size, tol=tol, max_iter=max_iter)
    t0 = time.perf_counter()
    with progress_bars.bar(progress, f"calibrating {p.describe()}", None) as advance:
        fit.advance = advance
        fit.naee()
        fit.entropy()
        fit.tau()
        act, per = fit.measure(fit.current)
    name = p.describe() + (f" @Act {target_act:g}" if target_act is not None else "") + " (calibrated)"
    meta = dict(p.meta)
    meta["calibration"] = {
        "from": p.describe(), "kinds": fit.kinds, "target_act": target_act, "measured_act": act,
        "act_per_layer": {str(i): a for i, a in sorted(per.items())}, "tokens": int(fit.blocks.numel()),
        "passes": fit.passes, "time_s": time.perf_counter() - t0,
    }
    return plan_from_rules(fit.current, name=name, meta=meta)


class _Calibration:
    """The state of one :func:`calibrate_plan` fit: the rules being fitted (``current``), the per-layer Act the
    dynamic layers must reach (``per_target``), and one fitting step per kind of rule."""

    def __init__(self, mm, p: Plan, blocks: torch.Tensor, target_act: float | None, *, batch_size: int, tol: float,
                 max_iter: int):
        self.mm, self.blocks, self.target_act = mm, blocks, target_act
        self.batch_size, self.tol, self.max_iter = batch_size, tol, max_iter
        rules = p.resolve(mm)
        self.dyn = {i: r for i, r in rules.items() if isinstance(r, Dynamic)}
        if not self.dyn:
            raise PlanError(f"plan '{p.describe()}' has no dynamic rule (topp, ratio, naee, entropy) to calibrate")
        self.kinds = sorted({r.kind for r in self.dyn.values()})
        self.per_target = self._per_layer_target(rules) if target_act is not None else None
        self.current = dict(rules)
        # the candidates each dynamic layer chooses from: its cap, as a static top-k
        self.candidates = {i: (TopK(_cap(mm, r)) if i in self.dyn else r) for i, r in rules.items()}
        self.passes = 0
        self.advance = lambda n=1: None

    def _per_layer_target(self, rules: dict) -> float:
        """What each dynamic layer must reach so that, with the static layers, the plan's Act is the target."""
        if len(self.kinds) > 1:
            raise PlanError(f"calibrate one kind of dynamic rule at a time (this plan mixes {', '.join(self.kinds)})")
        static = sum(_cap(self.mm, r) for i, r in rules.items() if i not in self.dyn)
        per_target = (float(self.target_act) * len(rules) - static) / len(self.dyn)
        lo_cap = min(_cap(self.mm, r) for r in self.dyn.values())
        if not 1.0 <= per_target <= lo_cap + 1e-9:
            raise PlanError(f"target Act {self.target_act:g} is out of reach for this plan (its dynamic layers would "
                            f"need {per_target:.3f} experts per token; possible: 1..{lo_cap})")
        return per_target

    def measure(self, rules: dict[int, Any]) -> tuple[float, dict]:
        self.passes += 1
        return measure_act(self.mm, plan_from_rules(rules), self.blocks, batch_size=self.batch_size)

    def _stats(self, rules: dict[int, Any]) -> dict:
        self.passes += 1
        return collect_router_stats(self.mm, self.blocks, plan=plan_from_rules(rules), batch_size=self.batch_size)

    def naee(self) -> None:
        """Per-layer medians of p2/p1, then (for a target Act) one common scale found by bisection."""
        naee = {i: r for i, r in self.dyn.items() if r.kind == "naee"}
        if not naee:
            return
        stats = self._stats(self.candidates) if any(r.value is None for r in naee.values()) else {}
        betas = {i: (float(r.value) if r.value is not None else
                     (float(stats[i].ratio(1).median()) if i in stats else 0.0)) for i, r in naee.items()}

        def scaled(s: float) -> None:
            for i, r in naee.items():
                self.current[i] = replace(r, value=min(1.0, max(0.0, s * betas[i])))

        scaled(1.0)
        if self.per_target is None:
            return
        pos = [b for b in betas.values() if b > 0]

        def m_naee(s: float):
            self.advance(1)
            scaled(s)
            return self.measure(self.current)

        s, _, _, _ = _bisect(m_naee, 0.0, 1.0 / min(pos) if pos else 1.0, float(self.target_act), increasing=False,
                             tol=self.tol, max_iter=self.max_iter)
        scaled(s)

    def entropy(self) -> None:
        """Per-layer quantile thresholds, refitted under the plan being built (upstream layers change)."""
        fit = {i: r for i, r in self.dyn.items()
               if r.kind == "entropy" and (r.thresholds is None or self.per_target is not None)}
        if not fit:
            return
        goal = {i: (self.per_target if self.per_target is not None else float(r.value)) for i, r in fit.items()}
        for i, r in fit.items():
            cap = _cap(self.mm, r)
            if not 1.0 <= goal[i] <= cap:
                raise PlanError(f"entropy target Act {goal[i]:g} is out of range for layer {i} (1..{cap})")
        plan_for_stats = dict(self.candidates)
        for _ in range(3):
            stats = self._stats(plan_for_stats)
            self.advance(1)
            for i, r in fit.items():
                ts = entropy_thresholds(stats[i].entropy, goal[i], _cap(self.mm, r), self.mm.num_experts)
                self.current[i] = replace(r, value=None, thresholds=ts)
            plan_for_stats = {**plan_for_stats, **{i: self.current[i] for i in fit}}
            _, per = self.measure(self.current)
            if all(abs(per.get(i, goal[i]) - goal[i]) <= self.tol for i in fit):
                break

    def tau(self) -> None:
        """top-p / max-ratio: bisection on a common shift of the per-layer thresholds (keeps a depth schedule)."""
        tau = {i: r for i, r in self.dyn.items() if r.kind in ("topp", "ratio")}
        if not tau or self.per_target is None:
            return
        base = {i: float(r.value) for i, r in tau.items()}

        def shifted(d: float) -> None:
            for i, r in tau.items():
                self.current[i] = replace(r, value=min(1.0, max(1e-4, base[i] + d)))

        def m_tau(d: float):
            self.advance(1)
            shifted(d)
            return self.measure(self.current)

        d, _, _, _ = _bisect(m_tau, -1.0, 1.0, float(self.target_act), increasing=True, tol=self.tol,
                             max_iter=self.max_iter)
        shifted(d)
