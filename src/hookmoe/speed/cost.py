"""The cost model behind the speed limits: FLOPs per token (experts, attention) and bytes per decode step."""

from __future__ import annotations


import torch



def _attention_dims(cfg) -> tuple[int, int, int]:
    heads = int(cfg.num_attention_heads)
    if getattr(cfg, "qk_nope_head_dim", None) is not None:
        dqk = int(cfg.qk_nope_head_dim) + int(cfg.qk_rope_head_dim)
        dv = int(cfg.v_head_dim)
    else:
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        dqk = dv = int(d)
    return heads, dqk, dv


def attention_score_flops(mm, t_new: int, t_past: int = 0) -> float:
    """FLOPs of QK^T and AV for ``t_new`` causal queries after ``t_past`` cached tokens (one sequence)."""
    cfg = mm.config
    heads, dqk, dv = _attention_dims(cfg)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * mm.num_layers
    total = 0.0
    for i in range(mm.num_layers):
        if types[i] == "sliding_attention" and window:
            keys = sum(min(t_past + j + 1, window) for j in range(t_new))
        else:
            keys = t_new * t_past + t_new * (t_new + 1) / 2
        total += 2.0 * heads * (dqk + dv) * keys
    return total


def _embedding_params(mm) -> tuple[int, int, bool]:
    emb = mm.model.get_input_embeddings()
    head = mm.model.get_output_embeddings()
    n_emb = emb.weight.numel() if emb is not None else 0
    n_head = head.weight.numel() if head is not None else 0
    tied = emb is not None and head is not None and emb.weight is head.weight
    return n_emb, n_head, tied


def cost_model(mm, k_per_layer: dict[int, float], *, batch_size: int = 1) -> dict:
    """Per-token linear FLOPs (excluding the LM head) and per-decode-step weight bytes under ``k_per_layer``."""
    from hookmoe.models.accounting import param_counts, per_expert_params

    counts = param_counts(mm, k_per_layer)
    n_emb, n_head, tied = _embedding_params(mm)
    body = counts["active"] - n_emb - (0 if tied else n_head)  # params touched per token, head excluded
    nonrouted = param_counts(mm, {layer.index: 0.0 for layer in mm.layers})["active"] - n_emb - (0 if tied else n_head)
    e = mm.num_experts
    distinct = 0.0
    for layer in mm.layers:
        k = float(k_per_layer.get(layer.index, mm.native_top_k))
        frac = min(1.0, k / e)
        distinct += e * (1.0 - (1.0 - frac) ** batch_size) * per_expert_params(layer.experts)
    bytes_per = torch.finfo(mm.dtype).bits // 8
    return {"flops_per_token": 2.0 * body, "head_flops": 2.0 * n_head, "active_params": counts["active"],
            "decode_weight_bytes": bytes_per * (nonrouted + n_head + distinct)}


def prefill_flops(mm, cm: dict, t: int, batch_size: int) -> float:
    return batch_size * (t * cm["flops_per_token"] + attention_score_flops(mm, t) + cm["head_flops"])


def kv_bytes_per_step(mm, context: int, batch_size: int) -> float:
    """K/V bytes read per decode step at ``context`` cached tokens (reported, not part of the limit)."""
    cfg = mm.config
    heads, dqk, dv = _attention_dims(cfg)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    if getattr(cfg, "kv_lora_rank", None):  # transformers caches the decompressed K/V for MLA
        kv = heads
    return batch_size * mm.num_layers * context * kv * (dqk + dv) * (torch.finfo(mm.dtype).bits // 8)
