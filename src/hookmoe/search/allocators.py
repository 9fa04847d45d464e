"""Allocators: how many experts each MoE layer keeps for a target Act (or a tolerance).

Which layers lose k matters more than anything trained afterwards, so the per-layer budget is chosen by an
*allocator*. All of them share one interface (:class:`Allocator`) and return a static per-layer
:class:`~hookmoe.routing.Plan` (``layers:K0,K1,...``, one k per MoE layer) whose Act is exact:

* with a static k per layer every token runs exactly k routed experts there (``routing.RoutingStats``
  counts kept slots per token), so the plan's Act is ``sum(k_l) / L`` over the L MoE layers;
* a target Act ``A`` is met exactly when ``A * L`` is a whole number (the budget ``B = A * L``), otherwise
  the nearest budget below is used and the plan's ``meta["allocation"]`` says so (``exact: false`` and a
  ``note``).

Allocators (:data:`ALLOCATORS`):

``tlnle``   the paper's §3.3 shape: the upper layers lose one expert (``tlnle:k=K,l=L``); with a tolerance
            it runs :func:`hookmoe.search.search` (uniform k, then l) on a scorer.
``greedy``  from the native k, repeatedly take the cheapest single-layer decrement by measured sensitivity;
            then trade an increment in one layer for a decrement in another while that lowers the predicted
            loss (so layers may go up as well as down).
``dp``      an exact knapsack over layers: choose one k per layer from the measured choices so that
            ``sum k = B`` and the summed measured loss is minimal (additive approximation of the per-layer
            deltas).
``weights`` data-free: per-layer costs from random probes through each MoE block alone (LExI-style, see
            :func:`weight_sensitivity`), then the same knapsack as ``dp``.

Sensitivity (:func:`measure_sensitivity`) is measured once: for each MoE layer and each candidate k, the
mean token NLL on calibration blocks when only that layer runs k experts (all others native), minus the
native NLL. The hidden states entering a layer are computed once and shared by every k of that layer
(``search.run_partial``), so a full table costs about ``len(ks) / 2`` forward passes per layer. The result is
a JSON-able dict; pass it back to any allocator (and save it next to the plans).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hookmoe.routing.patch import eval_mode, routing_scope
from hookmoe.eval.perplexity import perplexity_core
from hookmoe import progress as progress_bars
from hookmoe.routing.plan import Plan
from hookmoe.errors import AllocationError

SENSITIVITY_FORMAT = "hookmoe-sensitivity/1"




# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------


def budget_for_act(mm, target_act: float, *, k_min: int = 1, k_max: int | None = None) -> tuple[int, bool]:
    """The total number of experts ``B`` (sum of per-layer k) for ``target_act``; ``(B, exact)``.

    ``B = target_act * L`` when that is a whole number (``exact``), else the nearest whole number below.
    """
    n = len(mm.layers)
    k_max = int(k_max or mm.native_top_k)
    if not math.isfinite(float(target_act)):
        raise AllocationError(f"--act must be a number, got {target_act}")
    raw = float(target_act) * n
    b = int(math.floor(raw + 1e-9))
    exact = abs(raw - b) <= 1e-9 * max(1.0, raw)
    if b < k_min * n or b > k_max * n:
        raise AllocationError(f"--act {target_act:g} is out of reach: with {n} MoE layers and {k_min}..{k_max} "
                              f"experts per layer the Act can be {k_min}..{k_max}")
    return b, exact


def plan_from_ks(mm, ks: dict[int, int], *, name: str | None = None, meta: dict | None = None) -> Plan:
    """A static ``layers:`` plan with one k per MoE layer."""
    order = mm.moe_layer_indices
    return Plan(base="layers:" + ",".join(str(int(ks[i])) for i in order), name=name, meta=dict(meta or {}))


def plan_ks(mm, plan: Any) -> dict[int, int]:
    """Per-layer k of a static plan (``native``, ``topk``, ``tlnle``, ``layers``)."""
    from hookmoe.routing.plan import Native, TopK

    out = {}
    for i, r in Plan.parse(plan).resolve(mm).items():
        if isinstance(r, Native):
            out[i] = mm.native_top_k
        elif isinstance(r, TopK):
            out[i] = r.k
        else:
            raise AllocationError(f"plan rule '{r.describe()}' of layer {i} is dynamic; allocators make static plans")
    return out


def _finish(mm, name: str, ks: dict[int, int], *, target_act: float | None, tolerance: float | None,
            exact: bool | None, predicted: float | None, extra: dict | None = None, plan: Plan | None = None) -> Plan:
    n = len(ks)
    act = sum(ks.values()) / n
    info: dict[str, Any] = {"allocator": name, "target_act": target_act, "tolerance": tolerance, "act": act,
                            "budget": int(sum(ks.values())), "exact": exact,
                            "ks": {str(i): int(k) for i, k in sorted(ks.items())}, "predicted_cost": predicted}
    if target_act is not None and not exact:
        info["note"] = (f"Act {target_act:g} x {n} MoE layers is not a whole number of experts; "
                        f"using the nearest budget below: Act {act:.6g}")
    if extra:
        info.update(extra)
    label = f"{name}@{act:.4g}"
    if plan is None:
        plan = plan_from_ks(mm, ks)
    plan = Plan(base=plan.base, layers=dict(plan.layers), name=label, meta={**plan.meta, "allocation": info})
    return plan


# --------------------------------------------------------------------------------------------------
# Sensitivity (measured once)
# --------------------------------------------------------------------------------------------------


def default_ks(mm, *, down: int = 2, up: int = 1) -> list[int]:
    """Candidate k per layer around the native k: ``native-down .. native+up`` (within 1..max_top_k)."""
    nk = mm.native_top_k
    lo, hi = max(1, nk - int(down)), min(mm.max_top_k, nk + int(up))
    return [k for k in range(lo, hi + 1) if k != nk]


def _blocks_of(scorer_or_blocks: Any) -> tuple[torch.Tensor, int]:
    if isinstance(scorer_or_blocks, torch.Tensor):
        return scorer_or_blocks.long(), 8
    blocks = getattr(scorer_or_blocks, "blocks", None)
    if blocks is None or getattr(scorer_or_blocks, "metric", "ppl") != "ppl":
        raise AllocationError("sensitivity is measured by perplexity: pass token blocks or a perplexity Scorer "
                              "(--metric ppl)")
    return blocks.long(), int(getattr(scorer_or_blocks, "batch_size", 8))


def measure_sensitivity(mm, scorer_or_blocks: Any, *, ks: Sequence[int] | None = None, down: int = 2, up: int = 1,
                        base: dict[int, int] | None = None, batch_size: int | None = None,
                        progress: bool = False) -> dict:
    """Per-layer loss when one MoE layer alone runs k experts (every other layer native), for each k in ``ks``.

    ``scorer_or_blocks``: a perplexity :class:`hookmoe.search.Scorer` or a ``[N, T]`` tensor of calibration
    token ids. ``ks`` defaults to ``native-down .. native+up`` without the native k. Returns a JSON-able dict::

        {"format": "hookmoe-sensitivity/1", "kind": "nll", "native_k": 4, "base_nll": 3.55,
         "delta": {"<layer>": {"<k>": mean NLL(layer at k) - base_nll, ...}, ...}, "ks": [...], ...}

    The states entering layer ``l`` (under native routing) are computed once and reused for every k of that
    layer; only layers ``l..`` run per measurement.

    ``base``: measure around another operating point (one k per MoE layer) instead of native: every other
    layer runs its ``base`` k, and layer l is measured at ``base[l] - down .. base[l] + up`` (``ks`` ignored).
    The result then carries ``base_ks``; this captures the interactions of a plan that cuts many layers.
    """
    from hookmoe.routing.partial import _batches, run_partial

    blocks, bs = _blocks_of(scorer_or_blocks)
    bs = int(batch_size or bs)
    nk = mm.native_top_k
    moe = mm.moe_layer_indices
    if base is not None:
        base = {int(i): int(k) for i, k in base.items()}
        if set(base) != set(moe):
            raise AllocationError("a base plan for the sensitivity needs one k per MoE layer")
        per_ks = {i: [k for k in range(max(1, base[i] - int(down)), min(mm.max_top_k, base[i] + int(up)) + 1)
                      if k != base[i]] for i in moe}
        base_plan: Any = plan_from_ks(mm, base)
        ks = sorted({k for v in per_ks.values() for k in v})
    else:
        ks = sorted({int(k) for k in (ks if ks is not None else default_ks(mm, down=down, up=up))} - {nk})
        for k in ks:
            if not 1 <= k <= mm.max_top_k:
                raise AllocationError(f"sensitivity k={k} is out of range: this model allows 1..{mm.max_top_k} "
                                      "experts")
        per_ks = {i: ks for i in moe}
        base_plan = "native"
    if not ks:
        raise AllocationError("no candidate k to measure (the native k is the only choice)")
    t0 = time.perf_counter()
    batches = [b.to(mm.device) for b in _batches(blocks, bs)]
    with routing_scope(mm, base_plan):
        base_core = perplexity_core(mm, blocks, batch_size=bs)
    delta: dict[str, dict[str, float]] = {}
    evals = 1
    states: list[torch.Tensor] | None = None
    prev = 0
    n_total = sum(len(v) for v in per_ks.values())
    with progress_bars.bar(progress, f"sensitivity ({len(moe)} layers, {n_total} points)", n_total) as advance:
        for li in moe:
            if li > 0:
                with routing_scope(mm, base_plan), eval_mode(mm.model):
                    states = [run_partial(mm, ids, start=prev, hidden=None if states is None else states[bi], stop=li)
                              for bi, ids in enumerate(batches)]
                prev = li
            row = {}
            for k in per_ks[li]:
                if base is None:
                    plan = Plan(base="native", layers={str(li): f"topk:{k}"})
                else:
                    plan = plan_from_ks(mm, {**base, li: k})
                with routing_scope(mm, plan):
                    if li > 0:
                        st = states

                        def fwd(bi: int, ids: torch.Tensor, _st=st, _li=li) -> torch.Tensor:
                            return run_partial(mm, ids, start=_li, hidden=_st[bi])
                    else:
                        fwd = None
                    core = perplexity_core(mm, blocks, batch_size=bs, forward=fwd)
                row[str(k)] = core["nll"] - base_core["nll"]
                evals += 1
                advance(1)
            delta[str(li)] = row
    out = {"format": SENSITIVITY_FORMAT, "kind": "nll", "model": getattr(mm, "source", None), "arch": mm.arch,
           "native_k": nk, "ks": ks, "base_nll": base_core["nll"], "base_ppl": base_core["ppl"],
           "tokens": base_core["tokens"], "blocks": int(blocks.shape[0]), "block_len": int(blocks.shape[1]),
           "delta": delta, "evals": evals, "time_s": time.perf_counter() - t0}
    if base is not None:
        out["base_ks"] = {str(i): k for i, k in sorted(base.items())}
    return out


def _norm_input_scale(mm, layer_index: int) -> torch.Tensor | None:
    """The weight of the norm in front of the MoE block (RMSNorm gamma), if the decoder layer has one."""
    layer = mm.decoder_layers[layer_index]
    for name in ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm", "post_attn_norm"):
        norm = getattr(layer, name, None)
        w = getattr(norm, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            w = w.detach().float()
            # Gemma-style norms scale by (1 + w)
            if type(norm).__name__.lower().startswith("gemma"):
                w = 1.0 + w
            return w
    return None


def weight_sensitivity(mm, *, ks: Sequence[int] | None = None, down: int = 2, up: int = 1, tokens: int = 512,
                       seed: int = 0, progress: bool = False) -> dict:
    """Data-free per-layer costs from the weights alone (no text): random probes through each MoE block.

    For each MoE layer, ``tokens`` synthetic inputs ``x = gamma * z`` with ``z ~ N(0, I)`` (``gamma``: the
    weight of the RMSNorm in front of the block, so the probe has the scale the block sees; an RMSNorm output
    has unit RMS before ``gamma``) go through the MoE block alone (router, routed and shared experts) with
    the layer's k set to each candidate and to every expert (``k = max``). The cost of k is

        ``cost_l(k) = mean_t ||y_k - y_all|| - mean_t ||y_native - y_all||``

    i.e. how much further from the all-experts output (for a CMoE model: the dense FFN) the block moves
    with k experts than with the native k; negative for k above native. Like LExI (Chitty-Venkata et al.,
    2025) this profiles each layer with Gaussian inputs and needs no data; unlike LExI it measures the
    distance to the all-experts output (so raising k has a value) and allocates with an exact knapsack
    instead of an evolutionary search. The costs are in output-norm units, not NLL: good for ranking layers,
    not for a tolerance in perplexity.
    """
    nk = mm.native_top_k
    k_all = int(mm.max_top_k)
    ks = sorted({int(k) for k in (ks if ks is not None else default_ks(mm, down=down, up=up))} - {nk})
    g = torch.Generator().manual_seed(int(seed))
    h = int(mm.config.hidden_size)
    t0 = time.perf_counter()
    delta: dict[str, dict[str, float]] = {}
    dev, dt = mm.device, mm.dtype
    with progress_bars.bar(progress, "weight probes", len(mm.layers)) as advance, eval_mode(mm.model):
        for layer in mm.layers:
            z = torch.randn(1, int(tokens), h, generator=g)
            gamma = _norm_input_scale(mm, layer.index)
            x = (z * gamma if gamma is not None and gamma.numel() == h else z).to(device=dev, dtype=dt)

            def run(k: int) -> torch.Tensor:
                plan = Plan(base="native", layers={str(layer.index): f"topk:{k}"})
                with routing_scope(mm, plan):
                    out = layer.block(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                return out.float().reshape(-1, h)

            y_all = run(k_all)
            base = float((run(nk) - y_all).norm(dim=-1).mean())
            delta[str(layer.index)] = {str(k): float((run(k) - y_all).norm(dim=-1).mean()) - base for k in ks}
            advance(1)
    return {"format": SENSITIVITY_FORMAT, "kind": "weights", "model": getattr(mm, "source", None), "arch": mm.arch,
            "native_k": nk, "ks": ks, "k_all": k_all, "tokens": int(tokens), "seed": int(seed), "delta": delta,
            "time_s": time.perf_counter() - t0}


def _cost_table(mm, sens: dict) -> dict[int, dict[int, float]]:
    """Per MoE layer: k -> cost (native k costs 0), from a sensitivity dict."""
    if not isinstance(sens, dict) or sens.get("format") != SENSITIVITY_FORMAT:
        raise AllocationError("sensitivity must be a dict from measure_sensitivity / weight_sensitivity "
                              f"(format {SENSITIVITY_FORMAT})")
    if int(sens.get("native_k", -1)) != mm.native_top_k:
        raise AllocationError(f"this sensitivity was measured at native k={sens.get('native_k')}, but the model's "
                              f"native k is {mm.native_top_k}")
    out: dict[int, dict[int, float]] = {}
    base_ks = sens.get("base_ks") or {}
    for i in mm.moe_layer_indices:
        row = sens["delta"].get(str(i))
        if row is None:
            raise AllocationError(f"the sensitivity has no entry for MoE layer {i} (measured on another model?)")
        costs = {int(base_ks.get(str(i), mm.native_top_k)): 0.0}
        costs.update({int(k): float(v) for k, v in row.items() if 1 <= int(k) <= mm.max_top_k})
        out[i] = costs
    return out


# --------------------------------------------------------------------------------------------------
# Solvers over a cost table
# --------------------------------------------------------------------------------------------------


def knapsack(costs: dict[int, dict[int, float]]) -> dict[int, tuple[float, dict[int, int]]]:
    """Exact minimum summed cost for every reachable budget: ``{B: (cost, {layer: k})}``.

    Dynamic programming over layers; state = experts used so far. Ties go to the choice closest to the
    layer's cheapest-|cost| k and then to the lower layer index order (deterministic).
    """
    layers = sorted(costs)
    # best[b] = (cost, choices tuple)
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for li in layers:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for b, (c, ch) in best.items():
            for k, ck in sorted(costs[li].items()):
                key = b + k
                cand = (c + ck, ch + (k,))
                cur = nxt.get(key)
                if cur is None or cand[0] < cur[0] - 1e-15:
                    nxt[key] = cand
        best = nxt
    return {b: (c, dict(zip(layers, ch))) for b, (c, ch) in best.items()}


def greedy_allocate(costs: dict[int, dict[int, float]], native: dict[int, int], budget: int, *,
                    swaps: bool = True, max_swaps: int = 10000) -> tuple[float, dict[int, int], dict]:
    """Cheapest single-layer moves from ``native`` until ``sum k == budget``; then improving +1/-1 swaps.

    A move changes one layer's k to the next measured choice below (or above, when the budget is above the
    native total). The marginal cost of a move is ``cost(new) - cost(old)``. With ``swaps``, a pair (raise
    layer a by one step, lower layer b by one step) that keeps the budget and lowers the total cost is applied
    while one exists (best pair first).
    """
    ks = dict(native)
    moves = 0

    def nxt(li: int, direction: int) -> int | None:
        opts = sorted(costs[li])
        pos = opts.index(ks[li])
        j = pos + direction
        return opts[j] if 0 <= j < len(opts) else None

    total = sum(ks.values())
    while total != budget:
        d = -1 if total > budget else 1
        best = None
        for li in sorted(costs):
            k2 = nxt(li, d)
            if k2 is None or (d < 0 and total - (ks[li] - k2) < budget) or (d > 0 and total + (k2 - ks[li]) > budget):
                continue
            m = costs[li][k2] - costs[li][ks[li]]
            if best is None or m < best[0] - 1e-15:
                best = (m, li, k2)
        if best is None:
            raise AllocationError(f"greedy allocation cannot reach a budget of {budget} experts with the measured "
                                  "choices (measure more k values)")
        _, li, k2 = best
        total += k2 - ks[li]
        ks[li] = k2
        moves += 1
    n_swaps = 0
    if swaps:
        while n_swaps < max_swaps:
            best = None
            for a in sorted(costs):  # raise a
                ka = nxt(a, +1)
                if ka is None:
                    continue
                ga = costs[a][ka] - costs[a][ks[a]]
                for b in sorted(costs):  # lower b by the same number of experts
                    if b == a:
                        continue
                    kb = ks[b] - (ka - ks[a])
                    if kb not in costs[b]:
                        continue
                    gain = ga + costs[b][kb] - costs[b][ks[b]]
                    if gain < -1e-12 and (best is None or gain < best[0]):
                        best = (gain, a, ka, b, kb)
            if best is None:
                break
            _, a, ka, b, kb = best
            ks[a], ks[b] = ka, kb
            n_swaps += 1
    cost = sum(costs[li][ks[li]] for li in costs)
    return cost, ks, {"moves": moves, "swaps": n_swaps}


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------


@dataclass
class Allocator:
    """Base class: ``allocate(mm, target_act=None, tolerance=None, sensitivity=None, ...) -> Plan``.

    Exactly one of ``target_act`` (average routed experts per token) and ``tolerance`` (allowed relative
    perplexity rise, 0.01 = 1%) must be given. ``sensitivity`` is a dict from :func:`measure_sensitivity`
    (or :func:`weight_sensitivity` for ``weights``); allocators that need one and get none measure it on
    ``calib`` (token blocks or a perplexity Scorer). The returned plan's ``meta["allocation"]`` holds the
    allocator, target, planned Act, budget, exactness, per-layer k and the predicted cost.
    """

    name: str = "?"
    needs_sensitivity: bool = True
    description: str = ""

    def allocate(self, mm, target_act: float | None = None, tolerance: float | None = None,
                 sensitivity: dict | None = None, *, calib: Any = None, scorer: Any = None,
                 k_min: int = 1, k_max: int | None = None, progress: bool = False) -> Plan:  # pragma: no cover
        raise NotImplementedError

    # shared helpers
    @staticmethod
    def _check_target(target_act: float | None, tolerance: float | None) -> None:
        if (target_act is None) == (tolerance is None):
            raise AllocationError("give exactly one of --act (target Act) and --tolerance")
        if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
            raise AllocationError(f"--tolerance must be a non-negative fraction (0.01 = 1%), got {tolerance}")

    def _sensitivity(self, mm, sensitivity: dict | None, calib: Any, scorer: Any, progress: bool) -> dict:
        if sensitivity is not None:
            return sensitivity
        src = calib if calib is not None else scorer
        if src is None:
            raise AllocationError(f"the {self.name} allocator needs calibration data (--calib) or a measured "
                                  "sensitivity")
        return measure_sensitivity(mm, src, progress=progress)


class _TableAllocator(Allocator):
    """Allocators that choose from a per-layer cost table (``dp``, ``greedy``, ``weights``)."""

    def _solve(self, costs: dict[int, dict[int, float]], native: dict[int, int], budget: int
               ) -> tuple[float, dict[int, int], dict]:  # pragma: no cover
        raise NotImplementedError

    def _table(self, mm, sensitivity, calib, scorer, progress) -> tuple[dict, dict]:
        sens = self._sensitivity(mm, sensitivity, calib, scorer, progress)
        return sens, _cost_table(mm, sens)

    def allocate(self, mm, target_act: float | None = None, tolerance: float | None = None,
                 sensitivity: dict | None = None, *, calib: Any = None, scorer: Any = None,
                 k_min: int = 1, k_max: int | None = None, progress: bool = False) -> Plan:
        self._check_target(target_act, tolerance)
        sens, costs = self._table(mm, sensitivity, calib, scorer, progress)
        k_max = int(k_max or max(max(c) for c in costs.values()))
        costs = {i: {k: v for k, v in c.items() if k_min <= k <= k_max} for i, c in costs.items()}
        native = {i: int((sens.get("base_ks") or {}).get(str(i), mm.native_top_k)) for i in costs}
        lo, hi = sum(min(c) for c in costs.values()), sum(max(c) for c in costs.values())
        extra = {"sensitivity_kind": sens.get("kind"), "choices": sorted({k for c in costs.values() for k in c})}
        if target_act is not None:
            budget, exact = budget_for_act(mm, target_act, k_min=k_min, k_max=k_max)
            if not lo <= budget <= hi:
                raise AllocationError(f"--act {target_act:g} is out of reach with the measured choices (Act "
                                      f"{lo / len(costs):.3g}..{hi / len(costs):.3g}); measure more k values")
            cost, ks, info = self._solve(costs, native, budget)
            extra.update(info)
            if exact and sens.get("kind") == "nll" and calib is not None:
                ks, guard = _guard_uniform(mm, ks, target_act, calib)
                if guard is not None:
                    extra["uniform_check"] = guard
            return _finish(mm, self.name, ks, target_act=float(target_act), tolerance=None, exact=exact,
                           predicted=cost, extra=extra)
        # tolerance: the smallest budget whose cost stays within it
        if scorer is not None:
            return allocate_within_tolerance(self, mm, tolerance, scorer, sensitivity=sens, k_min=k_min,
                                             k_max=k_max)
        if sens.get("kind") != "nll":
            raise AllocationError(f"the {self.name} allocator predicts no perplexity from weight statistics; give "
                                  "--act, or data to score plans for --tolerance")
        native_total = sum(native.values())
        for budget in range(lo, native_total + 1):
            cost, ks, info = self._solve(costs, native, budget)
            if math.exp(cost) - 1.0 <= tolerance or budget == native_total:
                extra.update(info, predicted_rise=math.exp(cost) - 1.0)
                return _finish(mm, self.name, ks, target_act=None, tolerance=float(tolerance), exact=None,
                               predicted=cost, extra=extra)
        raise AssertionError("unreachable")  # pragma: no cover


def _guard_uniform(mm, ks: dict[int, int], target_act: float, calib: Any) -> tuple[dict[int, int], dict | None]:
    """Keep the per-layer plan only if it measures better than uniform top-k at the same (whole) Act.

    The table's costs add single-layer measurements; when a model's per-layer effects are small or interact, the
    sum can mislead (on a small trained qwen2_moe the dp plan at Act 3 measured +0.59 % against uniform's +0.06 %;
    benchmarks/results/frontier_tiny_trained_qwen2_moe/). Two perplexity passes over the calibration blocks
    decide; the result says which was kept and both NLLs."""
    k = round(float(target_act))
    if abs(k - float(target_act)) > 1e-9 or not 1 <= k <= mm.max_top_k or all(v == k for v in ks.values()):
        return ks, None
    blocks, bs = _blocks_of(calib)
    nll = {}
    for name, plan in (("allocated", plan_from_ks(mm, ks)), ("uniform", f"topk:{k}")):
        with routing_scope(mm, plan):
            nll[name] = perplexity_core(mm, blocks, batch_size=bs)["nll"]
    kept = "uniform" if nll["uniform"] <= nll["allocated"] else "allocated"
    guard = {"kept": kept, "nll_allocated": nll["allocated"], "nll_uniform": nll["uniform"],
             "tokens": int(blocks.numel())}
    return ({i: k for i in ks} if kept == "uniform" else ks), guard


class DPAllocator(_TableAllocator):
    def __init__(self):
        super().__init__(name="dp", description="exact knapsack over measured per-layer sensitivity")

    def _solve(self, costs, native, budget):
        table = knapsack(costs)
        if budget not in table:  # pragma: no cover - lo..hi budgets are always reachable with unit steps
            raise AllocationError(f"no per-layer choice of k sums to {budget}")
        cost, ks = table[budget]
        return cost, ks, {}


class RefinedDPAllocator(DPAllocator):
    """``dp``, then ``rounds`` times: re-measure each layer at k-1 / k+1 around the current plan (every other
    layer at its planned k, so the interactions of cutting many layers at once are in the numbers) and
    re-solve the knapsack on those costs. Needs calibration data (``calib``) for the re-measurement."""

    def __init__(self, rounds: int = 1):
        _TableAllocator.__init__(self, name="dp2", description="dp, then re-measured around its plan and re-solved")
        self.rounds = rounds

    def allocate(self, mm, target_act: float | None = None, tolerance: float | None = None,
                 sensitivity: dict | None = None, *, calib: Any = None, scorer: Any = None,
                 k_min: int = 1, k_max: int | None = None, progress: bool = False) -> Plan:
        if target_act is None:
            raise AllocationError("the dp2 allocator takes a target Act (--act); use dp for --tolerance")
        src = calib if calib is not None else scorer
        if src is None:
            raise AllocationError("the dp2 allocator re-measures around its plan and needs calibration data (--calib)")
        plan = DPAllocator.allocate(self, mm, target_act=target_act, sensitivity=sensitivity, calib=calib,
                                    scorer=scorer, k_min=k_min, k_max=k_max, progress=progress)
        first = plan.meta["allocation"]
        history = [first["ks"]]
        for _ in range(int(self.rounds)):
            ks = {int(i): int(k) for i, k in plan.meta["allocation"]["ks"].items()}
            local = measure_sensitivity(mm, src, base=ks, down=1, up=1, progress=progress)
            plan = DPAllocator.allocate(self, mm, target_act=target_act, sensitivity=local, k_min=k_min,
                                        k_max=k_max)
            history.append(plan.meta["allocation"]["ks"])
            if history[-1] == history[-2]:
                break
        info = dict(plan.meta["allocation"], rounds=len(history) - 1, history=history,
                    first_predicted_cost=first["predicted_cost"])
        return Plan(base=plan.base, layers=dict(plan.layers), name=plan.name, meta={**plan.meta, "allocation": info})


class GreedyAllocator(_TableAllocator):
    def __init__(self, swaps: bool = True):
        super().__init__(name="greedy", description="cheapest single-layer decrements, then improving swaps")
        self.swaps = swaps

    def _solve(self, costs, native, budget):
        return greedy_allocate(costs, native, budget, swaps=self.swaps)


class WeightsAllocator(DPAllocator):
    """Data-free (:func:`weight_sensitivity`), then the knapsack. ``up`` (default 0): how far a layer may go
    above the native k. Measured on the demo model (benchmarks/results/allocators_smollm2_base.json): with
    ``up=1`` the probes' distance to the all-experts output made every upper layer take a 5th expert and
    left the rest at 2 (held-out perplexity 65.9 at Act 3.0 against 43.3 for uniform top-3): after the CMoE
    fine-tune the experts are trained for the native k, so the all-experts output is no longer the target."""

    def __init__(self, tokens: int = 512, seed: int = 0, up: int = 0):
        _TableAllocator.__init__(self, name="weights", needs_sensitivity=False,
                                 description="data-free: random probes through each MoE block, then a knapsack")
        self.tokens, self.seed, self.up = tokens, seed, up

    def _table(self, mm, sensitivity, calib, scorer, progress):
        sens = sensitivity if (sensitivity is not None and sensitivity.get("kind") == "weights") else \
            weight_sensitivity(mm, tokens=self.tokens, seed=self.seed, up=self.up, progress=progress)
        return sens, _cost_table(mm, sens)


class TLNLEAllocator(Allocator):
    """The paper's §3.3 shape: top-K in the lower layers, K-1 in the upper ones."""

    def __init__(self):
        super().__init__(name="tlnle", needs_sensitivity=False,
                         description="paper §3.3: k-1 experts from layer l up (TLNLE)")

    def allocate(self, mm, target_act: float | None = None, tolerance: float | None = None,
                 sensitivity: dict | None = None, *, calib: Any = None, scorer: Any = None,
                 k_min: int = 1, k_max: int | None = None, progress: bool = False) -> Plan:
        self._check_target(target_act, tolerance)
        moe = mm.moe_layer_indices
        n = len(moe)
        if target_act is not None:
            budget, exact = budget_for_act(mm, target_act, k_min=max(1, k_min), k_max=mm.native_top_k)
            k = -(-budget // n)  # ceil: layers at k, the top (k*n - budget) layers at k-1
            n_low = k * n - budget
            ks = {i: (k - 1 if pos >= n - n_low else k) for pos, i in enumerate(moe)}
            if n_low == 0:
                plan = Plan(base="native" if k == mm.native_top_k else f"topk:{k}")
            else:
                plan = Plan(base=f"tlnle:k={k},l={moe[n - n_low]}")
            return _finish(mm, self.name, ks, target_act=float(target_act), tolerance=None, exact=exact,
                           predicted=None, plan=plan)
        if scorer is None:
            raise AllocationError("the tlnle allocator with --tolerance runs the §3.3 search and needs data to score "
                                  "plans (--data)")
        from hookmoe.search.paper import search

        res = search(mm, scorer, tolerance=float(tolerance), hook=False, progress=progress)
        ks = plan_ks(mm, res["plan"])
        return _finish(mm, self.name, ks, target_act=None, tolerance=float(tolerance), exact=None, predicted=None,
                       plan=Plan(base=res["plan"]),
                       extra={"search": {k: res[k] for k in ("k", "l", "score", "drop", "evals")}})


def allocate_within_tolerance(allocator: Allocator, mm, tolerance: float, scorer: Any, *,
                              sensitivity: dict | None = None, k_min: int = 1, k_max: int | None = None) -> Plan:
    """The lowest-Act plan of ``allocator`` whose scored drop stays within ``tolerance`` (bisection on the
    budget, assuming quality falls monotonically as the budget shrinks)."""
    n = len(mm.layers)
    base = scorer("native")
    lo, hi = max(1, k_min) * n, mm.native_top_k * n  # hi is always within (native)
    best = None
    scored = []
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            plan = allocator.allocate(mm, target_act=mid / n, sensitivity=sensitivity, scorer=scorer,
                                      k_min=k_min, k_max=k_max)
        except AllocationError:
            lo = mid + 1
            continue
        res = scorer(plan)
        d = scorer.drop(base["score"], res["score"])
        scored.append({"budget": mid, "act": mid / n, "score": res["score"], "drop": d})
        if d <= tolerance:
            best, hi = (plan, res, d), mid - 1
        else:
            lo = mid + 1
    if best is None:
        ks = {i: mm.native_top_k for i in mm.moe_layer_indices}
        return _finish(mm, allocator.name, ks, target_act=None, tolerance=float(tolerance), exact=None,
                       predicted=None, extra={"scored": scored})
    plan, res, d = best
    info = dict(plan.meta["allocation"], target_act=None, tolerance=float(tolerance), exact=None, scored=scored,
                score=res["score"], drop=d)
    info.pop("note", None)
    return Plan(base=plan.base, layers=dict(plan.layers), name=plan.name, meta={**plan.meta, "allocation": info})


ALLOCATORS: dict[str, Allocator] = {
    "tlnle": TLNLEAllocator(),
    "greedy": GreedyAllocator(),
    "dp": DPAllocator(),
    "dp2": RefinedDPAllocator(),
    "weights": WeightsAllocator(),
}

#: the allocator ``hookmoe search/run --allocator`` use when none is named (benchmarks/results/allocators_*.json)
DEFAULT_ALLOCATOR = "dp"


def get_allocator(name: str) -> Allocator:
    key = (name or "").strip().lower()
    if key not in ALLOCATORS:
        raise AllocationError(f"unknown --allocator '{name}' (choose from: {', '.join(ALLOCATORS)})")
    return ALLOCATORS[key]


def allocate(mm, allocator: str = DEFAULT_ALLOCATOR, target_act: float | None = None,
             tolerance: float | None = None, sensitivity: dict | None = None, **kw) -> Plan:
    """``get_allocator(allocator).allocate(mm, target_act, tolerance, sensitivity, **kw)``."""
    return get_allocator(allocator).allocate(mm, target_act, tolerance, sensitivity, **kw)
