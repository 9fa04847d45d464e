"""Speed: oneDNN CPU kernels, the runtime that never computes dropped experts, and the TTFT/ITL benchmark.
"""

from .bench import BENCH_FORMAT, DEFAULT_LENGTHS, DEFAULT_LENGTHS_TEXT, Variant, parse_variants, BenchConfig, bench
from .cost import attention_score_flops, cost_model, prefill_flops, kv_bytes_per_step
from .runtime import IMPL_NAME, SMALL_SLOTS, PER_EXPERT_MIN_MACS, host_experts_forward, device_experts_forward, experts_forward, register, set_experts, sync, CLOCKS, clock_fn, Generation, LEAN_MODEL_TYPES, LeanDecoder, Runtime, reference_generate
from .shapes import PRESETS, scale_config, random_model

__all__ = [
    "BENCH_FORMAT",
    "DEFAULT_LENGTHS",
    "DEFAULT_LENGTHS_TEXT",
    "Variant",
    "parse_variants",
    "BenchConfig",
    "bench",
    "attention_score_flops",
    "cost_model",
    "prefill_flops",
    "kv_bytes_per_step",
    "IMPL_NAME",
    "SMALL_SLOTS",
    "PER_EXPERT_MIN_MACS",
    "host_experts_forward",
    "device_experts_forward",
    "experts_forward",
    "register",
    "set_experts",
    "sync",
    "CLOCKS",
    "clock_fn",
    "Generation",
    "LEAN_MODEL_TYPES",
    "LeanDecoder",
    "Runtime",
    "reference_generate",
    "PRESETS",
    "scale_config",
    "random_model",
]
