"""The one table of MoE architecture adapters: where each architecture keeps its MoE blocks, routers and experts,
its native top-k, renormalisation, router score function and expert sizes. No routing logic is written per
architecture; everything that differs between them is a field here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable




def _cfg(name: str, default: Any = None) -> Callable[[Any], Any]:
    return lambda c: getattr(c, name, default)


@dataclass(frozen=True)
class Adapter:
    """How hookmoe finds and interprets the MoE parts of one architecture."""

    model_type: str
    block_attr: str  # attribute of a decoder layer that holds the MoE block
    router_attr: str  # attribute of the MoE block that holds the router (reads ``top_k`` on each call)
    num_experts: Callable[[Any], int]
    native_top_k: Callable[[Any], int]
    renormalize: Callable[[Any], bool]  # top-k weights sum to a constant (1 or a scaling factor)
    expert_intermediate: Callable[[Any], int]
    fine_grained: bool
    shared_attr: str | None = None  # attribute of the MoE block holding always-on shared experts
    score: str = "softmax"  # how router logits turn into probabilities: softmax | sigmoid
    max_top_k: Callable[[Any], int] | None = None  # group-limited routing caps k
    tiny: dict = field(default_factory=dict)  # config overrides for ``tiny:<arch>``
    experts_attr: str = "experts"


def _group_cap(c) -> int:
    n, g = c.n_routed_experts, getattr(c, "n_group", None) or 1
    return (getattr(c, "topk_group", None) or g) * (n // g)


def _v2_cap(c) -> int:
    if getattr(c, "topk_method", "greedy") == "group_limited_greedy":
        return _group_cap(c)
    return c.n_routed_experts


_COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=260, max_position_embeddings=512, initializer_range=0.08, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=1, bos_token_id=None)
# DeepSeek's attention (MLA) has as many KV heads as heads (the real checkpoints do; transformers' DeepSeek attention
# fails on a padding mask otherwise), so the tiny configs say so too.
_MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
            num_key_value_heads=4)



ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in [
        Adapter(
            "mixtral", "mlp", "gate", _cfg("num_local_experts"), _cfg("num_experts_per_tok"),
            lambda c: True, _cfg("intermediate_size"), fine_grained=False,
            tiny=dict(_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        ),
        Adapter(
            "qwen2_moe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", False), _cfg("moe_intermediate_size"), fine_grained=True,
            shared_attr="shared_expert",
            tiny=dict(_COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        ),
        Adapter(
            "qwen3_moe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", False), _cfg("moe_intermediate_size"), fine_grained=True,
            tiny=dict(_COMMON, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
        ),
        Adapter(
            "deepseek_v2", "mlp", "gate", _cfg("n_routed_experts"), _cfg("num_experts_per_tok"),
            lambda c: False, _cfg("moe_intermediate_size"), fine_grained=True, shared_attr="shared_experts",
            max_top_k=_v2_cap,
            tiny=dict(_COMMON, **_MLA, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                      n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, topk_method="greedy",
                      routed_scaling_factor=1.0, n_group=1, topk_group=1),
        ),
        Adapter(
            "deepseek_v3", "mlp", "gate", _cfg("n_routed_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", True), _cfg("moe_intermediate_size"), fine_grained=True,
            shared_attr="shared_experts", score="sigmoid", max_top_k=_group_cap,
            tiny=dict(_COMMON, **_MLA, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                      n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4,
                      topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
        ),
        Adapter(
            "olmoe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", False), _cfg("intermediate_size"), fine_grained=True,
            tiny=dict(_COMMON, intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        ),
        Adapter(
            "granitemoe", "block_sparse_moe", "router", _cfg("num_local_experts"), _cfg("num_experts_per_tok"),
            lambda c: True, _cfg("intermediate_size"), fine_grained=False,
            tiny=dict(_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        ),
        Adapter(
            "gpt_oss", "mlp", "router", _cfg("num_local_experts"), _cfg("num_experts_per_tok"),
            lambda c: True, _cfg("intermediate_size"), fine_grained=False,
            tiny=dict(_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                      layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=131072),
        ),
        # Dense models converted by ``hookmoe convert`` (see convert.py / cmoe_model.py): routed weights are
        # per-expert scales, never renormalised.
        Adapter(
            "hookmoe_cmoe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            lambda c: False, _cfg("moe_intermediate_size"), fine_grained=True, shared_attr="shared_experts",
        ),
    ]
}


TINY_ARCHS = [a for a, ad in ADAPTERS.items() if ad.tiny]


# MoE types transformers knows but hookmoe refuses, with the reason.
UNSUPPORTED_MOE = {
    "phimoe": "its router ignores top_k (always 2)",
    "llama4": "it computes all experts densely",
    "llama4_text": "it computes all experts densely",
    "jamba": "not yet adapted",
    "dbrx": "not yet adapted",
    "qwen3_next": "not yet adapted",
    "switch_transformers": "not a causal LM",
}


DENSE_CONVERTIBLE = {"llama", "qwen2", "gemma3_text", "gemma3"}


def supported_text() -> str:
    return ", ".join(TINY_ARCHS)


def _refusal(model_type: str) -> str:
    if model_type in UNSUPPORTED_MOE:
        why = UNSUPPORTED_MOE[model_type]
        return f"unsupported MoE architecture '{model_type}' ({why}); supported: {supported_text()}"
    hint = " — convert it to an MoE first with `hookmoe convert`" if model_type in DENSE_CONVERTIBLE else ""
    return (f"'{model_type}' is not a supported MoE architecture{hint}; supported: {supported_text()}, "
            "and models made by `hookmoe convert`")
