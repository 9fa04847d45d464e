"""MoE models: the one adapter table, loading (hub id, directory, GGUF, ``tiny:<arch>``), :class:`MoEModel`,
the converted-model class (CMoE), partial forward passes and parameter accounting.
"""

from .accounting import per_expert_params, param_counts, paper_active_params, expert_flops_per_token
from .adapters import Adapter, ADAPTERS, TINY_ARCHS, UNSUPPORTED_MOE, DENSE_CONVERTIBLE, supported_text
from .cmoe import CMOE_MODEL_TYPE, MASKED_MIN_EXPERTS, MASKED_MIN_SHARE_INV, MASKED_IMPLEMENTATIONS, dense_activation_name, HookmoeCMoEConfig, CMoERouter, CMoEExperts, CMoESharedMLP, CMoESparseBlock, CMoELlamaModel, CMoEQwen2Model, CMoEGemma3TextModel, SUPPORTED_BASE_TYPES, HookmoeCMoEPreTrainedModel, HookmoeCMoEForCausalLM
from .loading import OFFLINE_MODELS, resolve_device, resolve_dtype, offline_gguf, load_causal_lm, load
from .memory import GIB, DTYPE_BYTES, MemoryError_, dtype_bytes, load_config, skeleton, attention_shape, sliding_windows, kv_cache_bytes, plan_ks, attention_activation_bytes, ffn_activation_bytes, estimate_memory, parse_layers, memory_rows
from .moe_model import MoELayer, MoEModel
from .tiny import tiny_tokenizer, tiny_config, build_tiny

__all__ = [
    "per_expert_params",
    "param_counts",
    "paper_active_params",
    "expert_flops_per_token",
    "Adapter",
    "ADAPTERS",
    "TINY_ARCHS",
    "UNSUPPORTED_MOE",
    "DENSE_CONVERTIBLE",
    "supported_text",
    "CMOE_MODEL_TYPE",
    "MASKED_MIN_EXPERTS",
    "MASKED_MIN_SHARE_INV",
    "MASKED_IMPLEMENTATIONS",
    "dense_activation_name",
    "HookmoeCMoEConfig",
    "CMoERouter",
    "CMoEExperts",
    "CMoESharedMLP",
    "CMoESparseBlock",
    "CMoELlamaModel",
    "CMoEQwen2Model",
    "CMoEGemma3TextModel",
    "SUPPORTED_BASE_TYPES",
    "HookmoeCMoEPreTrainedModel",
    "HookmoeCMoEForCausalLM",
    "OFFLINE_MODELS",
    "resolve_device",
    "resolve_dtype",
    "offline_gguf",
    "load_causal_lm",
    "load",
    "GIB",
    "DTYPE_BYTES",
    "MemoryError_",
    "dtype_bytes",
    "load_config",
    "skeleton",
    "attention_shape",
    "sliding_windows",
    "kv_cache_bytes",
    "plan_ks",
    "attention_activation_bytes",
    "ffn_activation_bytes",
    "estimate_memory",
    "parse_layers",
    "memory_rows",
    "MoELayer",
    "MoEModel",
    "tiny_tokenizer",
    "tiny_config",
    "build_tiny",
]
