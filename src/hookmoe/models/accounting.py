"""Activated parameters and expert FLOPs per token, counted from module shapes.

``active`` params = every parameter outside the routed experts (attention, norms, routers, shared experts,
dense layers, embeddings and LM head — as in the paper's App. A.2) + ``k_l`` routed experts in each MoE
layer ``l``. ``k_l`` is the native k, a static plan's k, or a measured Act (fractional) per layer.
The paper's closed form ``L·(4h² + 3·h·h_moe·(k + n_shared)) + 2·v·h`` is reported beside it.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn


def _numel(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


def per_expert_params(experts: nn.Module) -> int:
    """Parameters of one routed expert (3-D expert tensors: first dim = expert)."""
    n = getattr(experts, "num_experts", None)
    total = 0
    for p in experts.parameters(recurse=False):
        if n and p.dim() >= 2 and p.shape[0] == n:
            total += p[0].numel()
    if total == 0:  # experts held as a ModuleList of MLPs
        mods = [m for m in experts.children()]
        total = _numel(mods[0]) if mods else 0
    return total


def param_counts(mm, k_per_layer: Mapping[int, float] | None = None) -> dict:
    """Total and activated parameter counts for ``mm`` under ``k_per_layer`` (default: native k)."""
    total = _numel(mm.model)
    routed_total = sum(_numel(layer.experts) for layer in mm.layers)
    per_expert = per_expert_params(mm.layers[0].experts)
    ks = {layer.index: float(mm.native_top_k) for layer in mm.layers}
    if k_per_layer:
        ks.update({int(i): float(k) for i, k in k_per_layer.items()})
    active = total - routed_total + sum(ks[layer.index] * per_expert_params(layer.experts) for layer in mm.layers)
    return {
        "total": int(total),
        "active": int(round(active)),
        "active_paper": int(round(paper_active_params(mm, ks))),
        "per_expert": int(per_expert),
        "routed_total": int(routed_total),
    }


def paper_active_params(mm, ks: Mapping[int, float]) -> float:
    c = mm.config
    h = int(c.hidden_size)
    v = int(c.vocab_size)
    shared = int(getattr(c, "n_shared_experts", 0) or getattr(c, "num_shared_experts", 0) or 0)
    inter = mm.expert_intermediate_size
    layers = sum(4 * h * h + 3 * h * inter * (ks[layer.index] + shared) for layer in mm.layers)
    dense = mm.num_layers - len(mm.layers)
    dense_ffn = int(getattr(c, "intermediate_size", 0) or 0)
    return layers + dense * (4 * h * h + 3 * h * dense_ffn) + 2 * v * h


def expert_flops_per_token(mm, k_per_layer: Mapping[int, float] | None = None) -> dict:
    """Multiply-add FLOPs (2 per MAC) of routed and shared experts per token."""
    ks = {layer.index: float(mm.native_top_k) for layer in mm.layers}
    if k_per_layer:
        ks.update({int(i): float(k) for i, k in k_per_layer.items()})
    routed = sum(2.0 * ks[layer.index] * per_expert_params(layer.experts) for layer in mm.layers)
    shared = sum(2.0 * _numel(layer.shared) for layer in mm.layers)
    return {"routed": routed, "shared": shared, "total": routed + shared}
