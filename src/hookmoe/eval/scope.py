"""What every evaluation shares: whether a plan needs calibration first, the Hook description recorded with a result,
and :func:`finish_result` (Act, activated parameters and plan details added to every result)."""

from __future__ import annotations


from typing import Any

import torch

from hookmoe.routing.plan import Dynamic, Plan






def needs_calibration(mm, plan: Any) -> bool:
    """Whether ``plan`` holds a dynamic rule that must be fitted on data first (``naee``, ``entropy:ACT``)."""
    if plan is None:
        return False
    rules = Plan.parse(plan).resolve(mm)
    return any(isinstance(r, Dynamic) and not r.calibrated for r in rules.values())


def _has_dynamic(mm, plan: Any) -> bool:
    return any(isinstance(r, Dynamic) for r in Plan.parse(plan).resolve(mm).values())






def hook_info(mm) -> dict | None:
    """The attached Hooks (layers, params) or None."""
    try:
        from hookmoe.hook.inject import get_hooks
    except ImportError:  # pragma: no cover - hook.py ships with the package
        return None
    hs = get_hooks(mm)
    if hs is None or not any(getattr(h, "enabled", True) for h in hs.modules()):
        return None
    info = {"kind": hs.kind, "layers": hs.layers, "params": hs.num_params()}
    src = hs.manifest.get("source") or hs.manifest.get("directory") if hs.manifest else None
    if src:
        info["source"] = src
    return info


def hook_signature(mm) -> str:
    """Identifies the attached Hooks and their current weights (for memoising scores)."""
    try:
        from hookmoe.hook.inject import get_hooks
    except ImportError:  # pragma: no cover
        return "none"
    hs = get_hooks(mm)
    if hs is None:
        return "none"
    with torch.no_grad():
        s = sum(float(p.detach().double().abs().sum()) for p in hs.parameters())
    return f"{id(hs)}:{hs.layers}:{s:.12g}"


def finish_result(mm, patch, result: dict, *, act_per_layer: dict[int, float] | None = None) -> dict:
    """Add plan, Act, params and hook fields to a metric result."""
    from hookmoe.models.accounting import param_counts

    per = act_per_layer if act_per_layer is not None else patch.stats.act_per_layer()
    per = {int(i): float(a) for i, a in sorted(per.items())}
    act = sum(per.values()) / len(per) if per else float("nan")
    params = param_counts(mm, per or None)
    hook = hook_info(mm)
    idle = _idle_hook_params(mm) if hook is None else 0
    if idle:  # Hooks inserted but disabled (or unused) take no part in this result
        params = {k: (v - idle if k in ("total", "active") else v) for k, v in params.items()}
    out = dict(result)
    out.update({
        "plan": patch.plan.describe(),
        "plan_json": patch.plan.to_dict(),
        "rules": {str(i): r for i, r in patch.per_layer().items()},
        "act": act,
        "act_per_layer": {str(i): a for i, a in per.items()},
        "native_top_k": mm.native_top_k,
        "params": params,
        "hook": hook,
    })
    return out


def _idle_hook_params(mm) -> int:
    try:
        from hookmoe.hook.inject import get_hooks
    except ImportError:  # pragma: no cover
        return 0
    hs = get_hooks(mm)
    return hs.num_params() if hs is not None else 0
