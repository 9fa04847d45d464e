"""Choosing where compensators go and how big they are: a per-layer sensitivity profile (``layers="auto"``) and
parameter budgets (``budget="0.5%"``) for :func:`hookmoe.training.train_hook`.

Sensitivity of MoE layer ``i``: KL(native || model with one expert fewer in layer ``i`` only) per token, on a few
calibration blocks (one forward per MoE layer). ``auto`` layers: the router part goes to every MoE layer (a router
delta costs ``experts x hidden`` parameters per layer, little next to any budget); the Hook and output parts go to the
most sensitive layers that together hold ``coverage`` (90 %) of the summed sensitivity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hookmoe.errors import TrainingError
from hookmoe.hook.compensators import budget_params, parse_kind, part_params, size_for_budget
from hookmoe.hook.inject import get_hooks, parse_layers


AUTO_COVERAGE = 0.9


@torch.no_grad()
def layer_sensitivity(mm, blocks: torch.Tensor, *, n_blocks: int = 2, batch_size: int = 2) -> dict[int, float]:
    """KL per token between the native model and the model with one expert fewer in one MoE layer, per layer."""
    from contextlib import nullcontext

    from hookmoe.routing.patch import routing_scope

    k = mm.native_top_k
    if k < 2:
        raise TrainingError("--layer auto needs a model whose native k is at least 2 (it measures each layer with "
                            "one expert fewer); give the layers with --layer")
    ids_all = blocks[:max(1, n_blocks)].to(mm.device)
    hs = get_hooks(mm)
    was = mm.model.training
    mm.model.eval()

    def logp(plan) -> list[torch.Tensor]:
        out = []
        with routing_scope(mm, plan), (hs.disabled() if hs is not None else nullcontext()):
            for s in range(0, ids_all.shape[0], batch_size):
                lg = mm.model(input_ids=ids_all[s:s + batch_size], use_cache=False).logits.float()
                out.append(F.log_softmax(lg, -1))
        return out

    try:
        ref = logp("native")
        sens = {}
        moe = mm.moe_layer_indices
        for j, i in enumerate(moe):
            ks = [k] * len(moe)
            ks[j] = k - 1
            cur = logp("layers:" + ",".join(map(str, ks)))
            kl = sum(float((r.exp() * (r - c)).sum()) for r, c in zip(ref, cur))
            sens[i] = kl / max(1, ids_all.numel())
    finally:
        mm.model.train(was)
    return sens


def auto_layers(sensitivity: dict[int, float], coverage: float = AUTO_COVERAGE) -> list[int]:
    """The most sensitive layers that together hold ``coverage`` of the summed sensitivity (at least one)."""
    order = sorted(sensitivity, key=lambda i: -sensitivity[i])
    total = sum(max(0.0, v) for v in sensitivity.values())
    out, acc = [], 0.0
    for i in order:
        out.append(i)
        acc += max(0.0, sensitivity[i])
        if total <= 0 or acc >= coverage * total:
            break
    return sorted(out)


def resolve_compensator(mm, *, kind: Any, layers: Any, budget: Any = None, blocks: torch.Tensor | None = None,
                        inner_size: int | None = None, rank: int | None = None) -> tuple[list[int], dict, dict]:
    """Layers and sizes for a compensator run.

    Returns ``(layers, part_layers, info)``: ``layers`` for the config, ``part_layers`` per part, and ``info`` with
    ``inner_size``/``rank`` (from ``budget`` when given, else as passed) plus the sensitivity profile when
    ``layers == "auto"``.
    """
    parts = parse_kind(kind)
    info: dict = {"inner_size": inner_size, "rank": rank}
    auto = isinstance(layers, str) and layers.strip().lower() == "auto"
    if auto:
        if blocks is None:
            raise TrainingError("--layer auto needs calibration blocks to measure each layer's sensitivity")
        sens = layer_sensitivity(mm, blocks)
        info["sensitivity"] = {str(i): v for i, v in sens.items()}
        chosen = auto_layers(sens)
        part_layers = {p: (list(mm.moe_layer_indices) if p == "router" else chosen) for p in parts}
        if "router" in parts and budget is not None:
            cap = budget_params(mm, budget)
            per = part_params(mm, "router", 1)
            if per * len(mm.moe_layer_indices) > cap // (2 if len(parts) > 1 else 1):  # keep room for other parts
                n = max(1, (cap // (2 if len(parts) > 1 else 1)) // per)
                part_layers["router"] = sorted(sorted(sens, key=lambda i: -sens[i])[:n])
    else:
        lay = parse_layers(layers, mm)
        part_layers = {p: lay for p in parts}
    if budget is not None:
        sized = size_for_budget(mm, kind, part_layers, budget)
        if inner_size is None and sized["inner_size"] is not None:
            info["inner_size"] = sized["inner_size"]
        if rank is None and sized["rank"] is not None:
            info["rank"] = sized["rank"]
        info["budget_params"] = sized["budget_params"]
        used = sum(part_params(mm, p, len(part_layers[p]),
                               {"hook": info["inner_size"] or mm.hook_hidden_size, "output": info["rank"] or 0,
                                "router": 0}[p]) for p in parts)
        if used > sized["budget_params"]:
            raise TrainingError(f"--inner-size/--rank give {used:,} parameters, above --budget {budget} "
                                f"({sized['budget_params']:,})")
    info["part_layers"] = {p: v for p, v in part_layers.items()}
    all_layers = sorted({i for v in part_layers.values() for i in v})
    return all_layers, part_layers, info
