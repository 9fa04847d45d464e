"""Scaled real shapes: presets of real MoE configs (Mixtral-8x7B, Qwen1.5-MoE, ...) scaled down, built with random
weights for speed measurements."""

from __future__ import annotations


import torch

from hookmoe.errors import ModelError
from hookmoe.errors import BenchError


PRESETS: dict[str, dict] = {
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, head_dim=128, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, max_position_embeddings=8192, rope_theta=1e6,
        rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=21, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    # deepseek-ai/DeepSeek-V2-Lite
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        max_position_embeddings=163840, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001),
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        clip_qkv=None, hidden_act="silu", tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
}


# config keys divided by --scale (when present); heads are divided too, head dims are kept
_SCALED_SIZES = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                 "vocab_size", "kv_lora_rank", "q_lora_rank")


_SCALED_HEADS = ("num_attention_heads", "num_key_value_heads")


def _round8(x: float) -> int:
    return max(8, int(round(x / 8.0)) * 8)


def scale_config(cfg: dict, *, scale: float = 1.0, layers: int | None = None) -> dict:
    """A copy of a config dict with sizes divided by ``scale`` and ``layers`` decoder layers."""
    out = dict(cfg)
    if scale <= 0:
        raise BenchError(f"--scale must be > 0, got {scale:g}")
    if scale != 1:
        if not out.get("head_dim") and out.get("hidden_size") and out.get("num_attention_heads") \
                and "qk_nope_head_dim" not in out:
            out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]  # keep the head dim
        for key in _SCALED_SIZES:
            if out.get(key):
                out[key] = _round8(out[key] / scale)
        heads = out.get("num_attention_heads")
        if heads:
            out["num_attention_heads"] = max(1, int(round(heads / scale)))
            kv = out.get("num_key_value_heads") or heads
            ratio = max(1, heads // kv)
            out["num_key_value_heads"] = max(1, out["num_attention_heads"] // ratio)
            while out["num_attention_heads"] % out["num_key_value_heads"]:
                out["num_key_value_heads"] -= 1
    if layers is not None:
        if layers < 1:
            raise BenchError(f"--layers must be >= 1, got {layers}")
        n_old = int(out.get("num_hidden_layers") or layers)
        out["num_hidden_layers"] = layers
        if layers < n_old and out.get("vocab_size"):
            # the LM head keeps its real share of the per-token work: the vocabulary shrinks with the depth too
            out["vocab_size"] = max(256, _round8(out["vocab_size"] * layers / n_old))
        if "max_window_layers" in out:
            out["max_window_layers"] = min(out["max_window_layers"], layers)
        if isinstance(out.get("layer_types"), list):
            lt = out["layer_types"]
            out["layer_types"] = [lt[i % len(lt)] for i in range(layers)]
        if out.get("first_k_dense_replace", 0) >= layers:
            out["first_k_dense_replace"] = max(0, layers - 1)
        if isinstance(out.get("mlp_only_layers"), list):
            out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < layers]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = out.get(key)
        if isinstance(v, int) and out.get("vocab_size") and v >= out["vocab_size"]:
            out[key] = out["vocab_size"] - 1 - (key == "pad_token_id")
    return out


def random_model(spec: str, *, scale: float = 1.0, layers: int | None = None, device: str = "auto",
                 dtype: str = "auto", seed: int = 0):
    """An :class:`~hookmoe.models.MoEModel` with random weights built from a config alone.

    ``spec``: a preset name (``mixtral-8x7b``, optionally ``preset:``-prefixed), ``tiny:<arch>``, a local
    model directory (only its ``config.json`` is read) or a hub id (only its config is fetched).
    """
    from transformers import AutoConfig

    from hookmoe.models.moe_model import MoEModel
    from hookmoe.models.adapters import _refusal, ADAPTERS
    from hookmoe.models.loading import load, resolve_device, resolve_dtype

    if spec.startswith("tiny:"):
        if scale != 1 or layers is not None:
            from hookmoe.models.tiny import build_tiny, tiny_tokenizer, tiny_config

            arch = spec.split(":", 1)[1]
            base = {k: v for k, v in tiny_config(arch).to_dict().items() if k in ADAPTERS[arch].tiny}
            over = scale_config(base, scale=scale, layers=layers)
            dev = resolve_device(device)
            model = build_tiny(arch, seed=seed, **over).to(dev, resolve_dtype(dtype, dev))
            return MoEModel(model, tiny_tokenizer(), source=spec)
        return load(spec, device=device, dtype=dtype, seed=seed)
    name = spec.split(":", 1)[1] if spec.startswith("preset:") else spec
    if name in PRESETS:
        cfg_dict = dict(PRESETS[name])
    elif spec.startswith("preset:"):
        raise BenchError(f"unknown preset '{name}' (presets: {', '.join(PRESETS)})")
    else:
        try:
            cfg_dict = AutoConfig.from_pretrained(spec).to_dict()
        except (OSError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot read a config for '{spec}' (presets: {', '.join(PRESETS)}): {msg}") from None
    model_type = cfg_dict.get("model_type")
    if model_type not in ADAPTERS:
        raise ModelError(_refusal(str(model_type)))
    cfg_dict = scale_config(cfg_dict, scale=scale, layers=layers)
    cfg_dict.pop("model_type", None)
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                "quantization_config", "auto_map"):
        cfg_dict.pop(key, None)
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = _build_random(cfg, dev, dt, seed)
    label = f"{name} (random weights" + (f", scale 1/{scale:g}" if scale != 1 else "") + \
        (f", {layers} layers" if layers is not None else "") + ")"
    return MoEModel(model, None, source=label)


def _build_random(cfg, dev: torch.device, dt: torch.dtype, seed: int):
    """Build on the meta device (no slow init), then draw every parameter once: N(0, 0.02) for matrices
    (routers included, so routing is random rather than tied), 1 for norm weights, 0 for biases."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for mod_name, module in model.named_modules():
        for p_name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=torch.float32)
            if p.dim() >= 2:
                t.normal_(0.0, 0.02, generator=gen)
            elif "norm" in mod_name.lower().rsplit(".", 1)[-1] or "norm" in p_name or "layernorm" in mod_name:
                t.fill_(1.0)
            else:
                t.zero_()
            setattr(module, p_name, torch.nn.Parameter(t.to(dev, dt), requires_grad=False))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.empty(buf.shape).normal_(0.0, 0.02, generator=gen))
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(dev).eval()
