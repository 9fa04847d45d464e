"""The one patch point: the router's ``top_k`` and a forward hook on the router apply a plan per layer (reversibly),
count Act, and drop slots at no cost (sentinel expert index, weight 0); :func:`routing_scope` applies a plan for
a block of code."""

from __future__ import annotations

import contextlib

from typing import Any

import torch

from hookmoe.compat import enable_sentinels, in_backward, restore_sentinels, router_sorts_candidates, sentinel_skips, split_router_output
from hookmoe.errors import PlanError
from hookmoe.routing.plan import Dynamic, Plan, Rule, TopK
from hookmoe.routing.rules import make_selector
from hookmoe.routing.stats import RoutingStats


class RoutingPatch:
    """A plan applied to a model. Reversible: ``remove()`` or use as a context manager."""

    def __init__(self, mm, plan: Plan, rules: dict[int, Rule], count: bool = True):
        self.mm = mm
        self.plan = plan
        self.rules = rules
        self.stats = RoutingStats(mm.moe_layer_indices, mm.num_experts)
        self._count = count
        self._handles: list = []
        self._restore_k: list = []  # (router, previous top_k)
        self._restore_sentinel: list = []  # (experts, previous _is_expert_parallel)
        self._mask: torch.Tensor | None = None
        self._active = False

    # the plan in force, for reports
    def per_layer(self) -> dict[int, str]:
        return {i: r.describe() for i, r in self.rules.items()}

    def static_k(self) -> dict[int, float] | None:
        """k per layer when the plan is static (None when a dynamic rule is in use)."""
        out = {}
        for i, r in self.rules.items():
            if isinstance(r, Dynamic):
                return None
            out[i] = float(r.k if isinstance(r, TopK) else self.mm.native_top_k)
        return out

    def _apply(self) -> "RoutingPatch":
        mm = self.mm
        prev = getattr(mm, "_routing_patch", None)
        if prev is not None and prev._active:
            prev.remove()
        sentinel = sentinel_skips(mm.experts_implementation)
        for layer in mm.layers:
            rule = self.rules[layer.index]
            router = layer.router
            self._restore_k.append((router, router.top_k))
            if isinstance(rule, TopK):
                router.top_k = rule.k
            elif isinstance(rule, Dynamic):
                router.top_k = rule.max_k or mm.native_top_k
                if sentinel:
                    self._restore_sentinel.append((layer.experts, enable_sentinels(layer.experts)))
            if isinstance(rule, Dynamic) or self._count:  # a static plan without counting needs no hook at all
                self._handles.append(router.register_forward_hook(self._make_hook(layer.index, rule, sentinel, router)))
        self._handles.append(mm.model.register_forward_pre_hook(self._grab_mask, with_kwargs=True))
        self._handles.append(mm.model.register_forward_hook(self._drop_mask))
        mm._routing_patch = self
        self._active = True
        return self

    def remove(self) -> None:
        if not self._active:
            return
        for h in self._handles:
            h.remove()
        for router, k in self._restore_k:
            router.top_k = k
        for experts, prev in self._restore_sentinel:
            restore_sentinels(experts, prev)
        self._handles.clear()
        self._restore_k.clear()
        self._restore_sentinel.clear()
        self._active = False
        if getattr(self.mm, "_routing_patch", None) is self:
            self.mm._routing_patch = None

    def __enter__(self) -> "RoutingPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- hooks ---------------------------------------------------------------------------------
    def _grab_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
            mask = args[1]
        self._mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def _drop_mask(self, module, args, output):
        self._mask = None

    def _token_weights(self, n_rows: int) -> torch.Tensor | None:
        m = self._mask
        if m is None or n_rows % m.shape[0]:
            return None
        t = n_rows // m.shape[0]
        if t > m.shape[1]:
            return None
        return m[:, -t:].reshape(-1)

    def _make_hook(self, layer_idx: int, rule: Rule, sentinel: bool, router: torch.nn.Module):
        mm = self.mm
        num_experts, renorm_arch, score = mm.num_experts, mm.renormalize, mm.adapter.score

        def count(index, kept, keep):
            if self._count and not in_backward():
                self.stats.record(layer_idx, kept, self._token_weights(index.shape[0]), index, keep)

        if not isinstance(rule, Dynamic):
            def static_hook(module, args, out):
                ro = split_router_output(out, num_experts)
                idx = ro.index.reshape(-1, ro.index.shape[-1])
                count(idx, torch.full((idx.shape[0],), float(idx.shape[-1]), device=idx.device), None)
                return None

            return static_hook

        cap = rule.max_k or mm.native_top_k
        select = make_selector(rule, cap, score, renorm=rule.renorm == "native" and renorm_arch,
                               sorted_candidates=router_sorts_candidates(router))
        counting = self._count
        layout: list = []  # positions of (logits, weights, index) in the router's tuple, found on the first call

        def dynamic_hook(module, args, out):
            if layout:
                i_log, i_w, i_idx = layout
                lg, w, idx = out[i_log], out[i_w], out[i_idx]
            else:
                ro = split_router_output(out, num_experts)
                if ro.logits is None:
                    raise RuntimeError("dynamic routing needs router logits, which this router did not return")
                layout.extend(ro.order)
                lg, w, idx = ro.logits, ro.weights, ro.index
            new_w, keep = select(lg, w, idx)
            if counting:
                count(idx, keep.sum(-1).float(), keep)
            new_idx = torch.where(keep, idx, num_experts) if sentinel else idx
            res = [None, None, None]
            res[layout[0]], res[layout[1]], res[layout[2]] = lg, new_w, new_idx
            return tuple(res)

        return dynamic_hook


def apply_plan(mm, plan: Any = "native", *, count: bool = True) -> RoutingPatch:
    """Apply ``plan`` to the MoE model ``mm`` (a :class:`hookmoe.models.MoEModel`); replaces any plan in force."""
    p = Plan.parse(plan)
    rules = p.resolve(mm)
    for r in rules.values():
        if isinstance(r, Dynamic) and not r.calibrated:
            raise PlanError(
                f"plan rule '{r.describe()}' needs calibration first (per-layer "
                f"{'beta' if r.kind == 'naee' else 'thresholds'}); calibrate it on data (hookmoe compare / "
                "hookmoe.routing.calibrate_plan) or give the value, e.g. naee:0.3 or entropy:t=1.2/1.6"
            )
    return RoutingPatch(mm, p, rules, count=count)._apply()


@contextlib.contextmanager
def routing_scope(mm, plan: Any = None):
    """Apply ``plan`` for the duration of the block and yield its patch (with fresh routing stats).

    ``plan=None`` keeps the plan in force (its stats are swapped out and restored), or applies ``native``
    when none is. A plan that was in force before is re-applied afterwards.
    """
    cur = getattr(mm, "_routing_patch", None)
    active = cur is not None and getattr(cur, "_active", False)
    if plan is None and active and getattr(cur, "_count", True):
        saved = cur.stats
        cur.stats = RoutingStats(mm.moe_layer_indices, mm.num_experts)
        try:
            yield cur
        finally:
            cur.stats = saved
        return
    prev_plan = cur.plan if active else None
    patch = apply_plan(mm, plan if plan is not None else (prev_plan or "native"))
    try:
        yield patch
    finally:
        patch.remove()
        if prev_plan is not None:
            restored = apply_plan(mm, prev_plan)
            if getattr(mm, "active_plan", None) is cur:
                mm.active_plan = restored


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)
