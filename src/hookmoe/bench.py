"""Speed benchmark: TTFT and ITL of routing plans (and Hooks), side by side, with their theoretical limits.

What is measured (as in the paper): **TTFT** for prompts of ``lengths`` tokens (default 1024/2048/4096)
and one new token; **ITL** = (e2e - TTFT) / (new - 1) for ``new_tokens`` (default 256) tokens after an
``itl_prompt``-token prompt. The decode steps are fed the greedy tokens, or (``decode_tokens="random"``,
the default for random-weight models, whose greedy outputs repeat one token and so route unlike text)
random tokens — the same work per step, with routing statistics like the prompt's, so that a dynamic
rule calibrated on the prompt keeps its Act while decoding (the Act of both phases is reported).
Timings are synchronised (CUDA events on a GPU; on the CPU the wall clock or, ``clock="cpu"``, the
process CPU time — one thread on a shared machine, preemption excluded), medians over ``repeats`` after
``warmup`` passes.

Trustworthy ratios on a noisy machine: all variants share one loaded model and are measured
**interleaved** — for every repeat and prompt length, plan A, plan B, ... one after the other (the order
reversed on every other repeat, ABBA), so drift hits all of them alike. Each ratio is the median of the
per-repeat paired ratios ``t_base / t_variant`` (spread: min..max over repeats).

Beside each measured ratio stands its **theoretical limit** — active FLOPs (routed + shared experts,
attention projections and the causal attention scores; the LM head for the last token) for prefill,
active weight bytes read per step for decode (for batch B the expected number of distinct experts under
uniform routing) — both from :mod:`hookmoe.accounting`, and the **efficiency**
``(measured - 1) / (limit - 1)``.

``--random-weights`` builds the model from its configuration alone (a local config, a hub id's config —
nothing else is downloaded — or a built-in preset of a published model's real shapes, :data:`PRESETS`),
with ``--layers N`` and ``--scale F`` (hidden, intermediate, vocabulary sizes and head count divided by F;
head dim, expert count, top-k, shared experts and their proportions kept; with fewer layers than the real
model the vocabulary shrinks by the same factor as the depth, so the LM head keeps its real share of the
per-token work and the theoretical limits equal the real model's) so the shapes fit a small machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import typer

from . import cpu_gemm
from .errors import ModelError, UserError

BENCH_FORMAT = "hookmoe-bench/1"
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_LENGTHS_TEXT = ",".join(map(str, DEFAULT_LENGTHS))


class BenchError(UserError):
    """A benchmark option is invalid for this model or machine."""


# --------------------------------------------------------------------------------------------------
# Presets: real configurations of published MoE models (config.json values)
# --------------------------------------------------------------------------------------------------

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

    from .models import MoEModel, _refusal, load, resolve_device, resolve_dtype, ADAPTERS

    if spec.startswith("tiny:"):
        if scale != 1 or layers is not None:
            from .models import build_tiny, tiny_tokenizer, tiny_config

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


# --------------------------------------------------------------------------------------------------
# Variants: plan + hook + runtime
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    plan: str
    hook: str | None = None  # a hook directory, or "random[:L]" (an untrained Hook of the paper's shape)
    runtime: str = "fast"  # fast | reference
    label: str = ""
    resolved_plan: Any = None  # calibrated Plan for dynamic rules that needed it

    def __post_init__(self):
        if not self.label:
            self.label = self.plan + (f" + hook({self.hook})" if self.hook else "")
            if self.runtime != "fast":
                self.label += f" [{self.runtime}]"


def parse_variants(plans: Sequence[str], hooks: Sequence[str] = (),
                   runtimes: Sequence[str] = ("fast",)) -> list[Variant]:
    """Variants from ``--plan`` values (``PLAN`` or ``PLAN@HOOK``), ``--hook`` values (each combined with
    every plan after the first) and runtimes (each variant under each runtime)."""
    if not plans:
        plans = ["native", "topk:1"]
    base: list[tuple[str, str | None]] = []
    for p in plans:
        p = str(p).strip()
        if not p:
            raise BenchError("empty --plan value")
        if "@" in p:
            plan, hook = p.split("@", 1)
            base.append((plan.strip() or "native", hook.strip() or None))
        else:
            base.append((p, None))
    for h in hooks:
        for plan, hook in list(base[1:] if len(base) > 1 else base):
            if hook is None and (plan, h) not in base:
                base.append((plan, h))
    seen, out = set(), []
    for rt in runtimes:
        if rt not in ("fast", "reference"):
            raise BenchError(f"unknown runtime '{rt}' (use fast, reference or both)")
        for plan, hook in base:
            key = (plan, hook, rt)
            if key in seen:
                continue
            seen.add(key)
            out.append(Variant(plan, hook, rt))
    return out


class _Activation:
    """Puts a variant in force on the shared model: experts path, hook, plan (undone by ``close``)."""

    def __init__(self, mm, v: Variant, impls: dict[str, str], count: bool = False):
        from .routing import Dynamic, Plan, apply_plan
        from .runtime import set_experts

        self.mm = mm
        self.patch = None
        self.saved_k: list = []
        set_experts(mm, impls[v.runtime])
        self.hookset = _attach_hook(mm, v.hook) if v.hook else None
        plan = v.resolved_plan if v.resolved_plan is not None else Plan.parse(v.plan)
        rules = plan.resolve(mm)
        if count or any(isinstance(r, Dynamic) for r in rules.values()):
            self.patch = apply_plan(mm, plan, count=count)
        else:
            # static plan: exactly what routing.py does for static rules (router.top_k), minus its counting hook
            for layer in mm.layers:
                r = rules[layer.index]
                self.saved_k.append((layer.router, layer.router.top_k))
                layer.router.top_k = getattr(r, "k", mm.native_top_k)

    def close(self) -> None:
        if self.patch is not None:
            self.patch.remove()
        for router, k in self.saved_k:
            router.top_k = k
        if self.hookset is not None:
            from .hook import remove_hooks

            remove_hooks(self.mm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _attach_hook(mm, spec: str):
    from .hook import attach_hooks, insert_hooks

    if spec == "random" or spec.startswith("random:"):
        if ":" in spec:
            try:
                layers = [int(x) for x in spec.split(":", 1)[1].split(",")]
            except ValueError:
                raise BenchError(f"bad hook spec '{spec}' (use random or random:LAYER[,LAYER])") from None
        else:
            idx = mm.moe_layer_indices
            layers = [idx[len(idx) // 2]]
        return insert_hooks(mm, layers, init="paper", seed=0)
    if not Path(spec).is_dir():
        raise BenchError(f"hook directory not found: {spec} (or use random[:LAYER] for an untrained hook)")
    return attach_hooks(mm, spec)


# --------------------------------------------------------------------------------------------------
# Theoretical limits
# --------------------------------------------------------------------------------------------------


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
    from .accounting import param_counts, per_expert_params

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


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict:
    xs_sorted = sorted(xs)
    n = len(xs_sorted)

    def q(p):
        if n == 1:
            return xs_sorted[0]
        pos = p * (n - 1)
        lo = int(math.floor(pos))
        hi = min(n - 1, lo + 1)
        return xs_sorted[lo] + (xs_sorted[hi] - xs_sorted[lo]) * (pos - lo)

    return {"median": statistics.median(xs_sorted), "min": xs_sorted[0], "max": xs_sorted[-1],
            "q25": q(0.25), "q75": q(0.75), "n": n}


def machine_info() -> dict:
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["cpu_gemm"] = cpu_gemm.describe()
    try:
        from . import __version__

        info["hookmoe"] = __version__
    except ImportError:
        pass
    return info


@dataclass
class BenchConfig:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS  # TTFT prompt lengths (empty: no TTFT)
    new_tokens: int = 256  # ITL run (0: no ITL)
    itl_prompt: int = 128
    batch_size: int = 1
    repeats: int = 5
    warmup: int = 1
    compile: Any = "auto"
    clock: str = "wall"  # wall | cpu (process CPU time; one thread, CPU only)
    act: float | None = None  # calibrate dynamic plans to this Act
    seed: int = 0
    check_outputs: bool = True
    decode_tokens: str = "greedy"  # greedy | random: what the ITL decode steps are fed (see module docstring)

    def validate(self) -> None:
        if any(int(t) < 1 for t in self.lengths):
            raise BenchError("prompt lengths must be positive integers")
        if self.new_tokens == 1 or self.new_tokens < 0:
            raise BenchError(f"--new-tokens must be >= 2 (ITL needs two tokens) or 0 (no ITL), got {self.new_tokens}")
        if not self.lengths and not self.new_tokens:
            raise BenchError("nothing to measure: give prompt lengths (TTFT) or --new-tokens (ITL)")
        if self.itl_prompt < 1 or self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise BenchError("--itl-prompt, --batch-size and --repeats must be >= 1 and --warmup >= 0")
        if self.clock not in ("wall", "cpu"):
            raise BenchError(f"--clock must be wall or cpu, got '{self.clock}'")
        if self.decode_tokens not in ("greedy", "random"):
            raise BenchError(f"--decode-tokens must be greedy or random, got '{self.decode_tokens}'")


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int):
    """A rich progress bar on stderr that redraws only between measurements (no refresh thread taking CPU
    time while a variant is timed)."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True, auto_refresh=False) as prog:
        task = prog.add_task(description, total=total)
        prog.refresh()

        def advance(n=1):
            prog.advance(task, n)
            prog.refresh()

        yield advance


def _max_positions(mm) -> int | None:
    v = getattr(mm.config, "max_position_embeddings", None)
    return int(v) if v else None


def bench(mm, variants: Sequence[Variant], cfg: BenchConfig | None = None, *, progress: bool = True) -> dict:
    """Benchmark ``variants`` on the loaded model ``mm``; returns the result dict (see module docstring)."""
    from .compat import experts_implementation
    from .routing import Plan
    from .runtime import Runtime, reference_generate, set_experts

    cfg = cfg or BenchConfig()
    cfg.validate()
    if not variants:
        raise BenchError("nothing to benchmark: give at least one --plan")
    if cfg.clock == "cpu":
        if mm.device.type != "cpu":
            raise BenchError("--clock cpu measures CPU devices only; use --clock wall on a GPU")
        if torch.get_num_threads() != 1:
            raise BenchError("--clock cpu sums the CPU time of all threads; use it with --threads 1")
    for v in variants:  # parse every plan and find every hook up front: bad input fails before any timing
        Plan.parse(v.plan).resolve(mm)
        if v.hook and not (v.hook == "random" or v.hook.startswith("random:")) and not Path(v.hook).is_dir():
            raise BenchError(f"hook directory not found: {v.hook} (or use random[:LAYER] for an untrained hook)")
    lengths = [int(t) for t in cfg.lengths]
    maxpos = _max_positions(mm)
    need = max([t + 1 for t in lengths] + [cfg.itl_prompt + cfg.new_tokens])
    if maxpos is not None and need > maxpos:
        raise BenchError(f"prompt + new tokens ({need}) exceed the model's max_position_embeddings ({maxpos})")
    dev = mm.device
    vocab = int(mm.config.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    lo = min(3, vocab - 1)
    prompts = {t: torch.randint(lo, vocab, (cfg.batch_size, t), generator=gen).to(dev) for t in lengths}
    itl_ids = torch.randint(lo, vocab, (cfg.batch_size, cfg.itl_prompt), generator=gen).to(dev)
    n_probe = max(2, min(8, cfg.new_tokens or 8))
    forced = None
    if cfg.decode_tokens == "random" and cfg.new_tokens:
        forced = torch.randint(lo, vocab, (cfg.batch_size, cfg.new_tokens - 1), generator=gen).to(dev)

    orig_impl = experts_implementation(mm.model)
    impls = {"fast": "hookmoe", "reference": orig_impl if orig_impl != "hookmoe" else "grouped_mm"}
    rt = Runtime(mm, compile=cfg.compile, clock=cfg.clock)  # sets the hookmoe experts; restored at the end

    def run(v: Variant, ids, n: int):
        feed = forced[:, : n - 1] if forced is not None and n > 1 and ids is itl_ids else None
        if v.runtime == "fast":
            return rt.generate(ids, n, decode_inputs=feed)
        return reference_generate(mm, ids, n, clock=cfg.clock, decode_inputs=feed)

    try:
        _calibrate(mm, variants, cfg, itl_ids, impls)
        info = {}
        for v in variants:
            info[v.label] = _variant_info(mm, v, cfg, itl_ids, impls, lambda ids, n, v=v: run(v, ids, n))
        samples: dict[str, dict[str, list[float]]] = {v.label: {} for v in variants}
        total = (cfg.warmup + cfg.repeats * (len(lengths) + (1 if cfg.new_tokens else 0))) * len(variants)
        with _progress(progress, "benchmarking", total) as advance:
            for _ in range(cfg.warmup):
                for v in variants:
                    with _Activation(mm, v, impls):
                        if lengths:
                            run(v, prompts[lengths[0]], 1)
                        run(v, itl_ids, n_probe)
                    advance(1)
            for r in range(cfg.repeats):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for t in lengths:
                    for v in order:
                        with _Activation(mm, v, impls):
                            g = run(v, prompts[t], 1)
                        samples[v.label].setdefault(f"ttft@{t}", []).append(g.ttft_s)
                        samples[v.label].setdefault(f"wall:ttft@{t}", []).append(g.wall_ttft_s)
                        advance(1)
                if cfg.new_tokens:
                    for v in order:
                        with _Activation(mm, v, impls):
                            g = run(v, itl_ids, cfg.new_tokens)
                        samples[v.label].setdefault("itl", []).append(g.itl_s)
                        samples[v.label].setdefault("e2e", []).append(g.e2e_s)
                        samples[v.label].setdefault("ttft_itl_prompt", []).append(g.ttft_s)
                        n_new = g.tokens.shape[1]
                        samples[v.label].setdefault("wall:itl", []).append(
                            (g.wall_e2e_s - g.wall_ttft_s) / (n_new - 1))
                        advance(1)
        checks = _check_outputs(mm, variants, itl_ids, impls, rt) if cfg.check_outputs else {}
    finally:
        rt.close()
        set_experts(mm, orig_impl)
    desc = rt.describe()
    desc["reference_experts"] = impls["reference"]
    return _assemble(mm, variants, cfg, lengths, samples, info, checks, desc)


def _calibrate(mm, variants, cfg: BenchConfig, ids, impls) -> None:
    """Fit dynamic plans that need it (naee / entropy:ACT, or any dynamic plan when ``cfg.act`` is set) on
    the benchmark's own ITL prompt tokens (with the variant's hook in place, as it changes the routing)."""
    from .evaluate import needs_calibration
    from .routing import Dynamic, Plan
    from .runtime import set_experts

    for v in variants:
        plan = Plan.parse(v.plan)
        dyn = any(isinstance(r, Dynamic) for r in plan.resolve(mm).values())
        if not dyn or not (needs_calibration(mm, plan) or cfg.act is not None):
            continue
        from .search import calibrate_plan

        set_experts(mm, impls[v.runtime])
        blocks = ids.detach().cpu()
        if blocks.shape[1] < 64:
            blocks = blocks.repeat(1, math.ceil(64 / blocks.shape[1]))
        hookset = _attach_hook(mm, v.hook) if v.hook else None
        try:
            v.resolved_plan = calibrate_plan(mm, plan, blocks, target_act=cfg.act)
        finally:
            if hookset is not None:
                from .hook import remove_hooks

                remove_hooks(mm)
        v.label += f" (calibrated{f' to Act {cfg.act:g}' if cfg.act is not None else ''})"


def _variant_info(mm, v: Variant, cfg: BenchConfig, ids, impls, run) -> dict:
    """Act of one variant for prefill (the ITL prompt) and for decode (the new tokens of a full ITL run), and
    the cost model of each phase (limits use the Act of their own phase: dynamic rules may differ)."""
    from .hook import get_hooks

    with _Activation(mm, v, impls, count=True) as act:
        stats = act.patch.stats
        run(ids, 1)
        pre, pre_tok = stats.act_per_layer(), stats.tokens
        dec = dict(pre)
        if cfg.new_tokens:
            stats.reset()
            run(ids, cfg.new_tokens)
            tot, tot_tok = stats.act_per_layer(), stats.tokens
            dec = {i: (tot[i] * tot_tok - pre[i] * pre_tok) / max(1.0, tot_tok - pre_tok) for i in tot}
        pre = {int(i): float(a) for i, a in pre.items()}
        dec = {int(i): float(a) for i, a in dec.items()}
        hs = get_hooks(mm)
        return {  # costs are counted while the variant's hook is in the model
            "act": sum(pre.values()) / len(pre), "act_per_layer": pre,
            "act_decode": sum(dec.values()) / len(dec), "act_decode_per_layer": dec,
            "rules": act.patch.per_layer(),
            "plan": (v.resolved_plan.to_dict() if v.resolved_plan is not None else v.plan),
            "hook_params": hs.num_params() if hs is not None else 0,
            "cost": cost_model(mm, pre, batch_size=cfg.batch_size),
            "cost_decode": cost_model(mm, dec, batch_size=cfg.batch_size),
        }


def _check_outputs(mm, variants, ids, impls, rt) -> dict:
    """Greedy tokens of the fast runtime vs the stock path, per plan (a correctness check beside timing)."""
    from .runtime import reference_generate

    res = {}
    n = 16
    for v in variants:
        if v.runtime != "fast":
            continue
        with _Activation(mm, v, impls):
            fast = rt.generate(ids[:1], n).tokens
        ref_v = Variant(v.plan, v.hook, "reference", resolved_plan=v.resolved_plan)
        with _Activation(mm, ref_v, impls):
            ref = reference_generate(mm, ids[:1], n).tokens
        res[v.label] = bool(torch.equal(fast.cpu(), ref.cpu()))
    return {"greedy_tokens_identical_to_reference": res, "tokens_checked": n}


def _paired(a: list[float], b: list[float]) -> dict:
    """Median and range of the per-repeat ratios a_i / b_i."""
    st = _stats([x / y for x, y in zip(a, b)])
    return {"median": st["median"], "min": st["min"], "max": st["max"]}


def _assemble(mm, variants, cfg, lengths, samples, info, checks, runtime_desc) -> dict:
    metrics = [f"ttft@{t}" for t in lengths] + (["itl"] if cfg.new_tokens else [])
    base_by_rt: dict[str, Variant] = {}
    for v in variants:
        base_by_rt.setdefault(v.runtime, v)
    rows = []
    for v in variants:
        base = base_by_rt[v.runtime]
        vi, bi = info[v.label], info[base.label]
        entry: dict[str, Any] = {"label": v.label, "plan": vi["plan"], "hook": v.hook, "runtime": v.runtime,
                                 "base": base.label, "act": vi["act"], "act_per_layer": vi["act_per_layer"],
                                 "act_decode": vi["act_decode"], "act_decode_per_layer": vi["act_decode_per_layer"],
                                 "rules": {str(k): r for k, r in vi["rules"].items()},
                                 "params_active": vi["cost"]["active_params"], "hook_params": vi["hook_params"],
                                 "metrics": {}}
        for m in metrics:
            xs = samples[v.label][m]
            raw = _stats(xs)
            st: dict[str, Any] = {"median_ms": raw["median"] * 1e3, "min_ms": raw["min"] * 1e3,
                                  "max_ms": raw["max"] * 1e3, "q25_ms": raw["q25"] * 1e3, "q75_ms": raw["q75"] * 1e3,
                                  "n": raw["n"], "samples_ms": [x * 1e3 for x in xs]}
            if cfg.clock != "wall":
                wall = samples[v.label][f"wall:{m}"]
                w = _stats(wall)
                st["wall_clock"] = {"median_ms": w["median"] * 1e3, "min_ms": w["min"] * 1e3,
                                    "max_ms": w["max"] * 1e3}
                if v is not base:
                    st["wall_clock"]["ratio"] = _paired(samples[base.label][f"wall:{m}"], wall)["median"]
            if m == "itl":
                st["e2e_median_ms"] = statistics.median(samples[v.label]["e2e"]) * 1e3
                limit = bi["cost_decode"]["decode_weight_bytes"] / vi["cost_decode"]["decode_weight_bytes"]
                st["weight_bytes_per_step"] = vi["cost_decode"]["decode_weight_bytes"]
                st["kv_bytes_per_step"] = kv_bytes_per_step(mm, cfg.itl_prompt + cfg.new_tokens // 2,
                                                            cfg.batch_size)
            else:
                t = int(m.split("@")[1])
                fv = prefill_flops(mm, vi["cost"], t, cfg.batch_size)
                limit = prefill_flops(mm, bi["cost"], t, cfg.batch_size) / fv
                st["flops"] = fv
            if v is not base:
                ps = _paired(samples[base.label][m], xs)
                st["ratio"], st["ratio_min"], st["ratio_max"] = ps["median"], ps["min"], ps["max"]
                st["ratio_of_medians"] = statistics.median(samples[base.label][m]) / statistics.median(xs)
                st["limit"] = limit
                st["efficiency"] = (ps["median"] - 1) / (limit - 1) if abs(limit - 1) > 0.02 else None
            entry["metrics"][m] = st
        rows.append(entry)
    by_key = {(v.plan, v.hook, v.runtime): v for v in variants}
    # hook overhead: "P + hook" against "P" under the same runtime
    overhead = []
    for v in variants:
        plain = by_key.get((v.plan, None, v.runtime)) if v.hook else None
        if plain is None:
            continue
        o: dict[str, Any] = {"variant": v.label, "without_hook": plain.label,
                             "hook_params": info[v.label]["hook_params"]}
        for m in metrics:
            ps = _paired(samples[v.label][m], samples[plain.label][m])
            hv, pv = info[v.label], info[plain.label]
            if m == "itl":
                expected = hv["cost_decode"]["decode_weight_bytes"] / pv["cost_decode"]["decode_weight_bytes"] - 1
            else:
                t = int(m.split("@")[1])
                expected = prefill_flops(mm, hv["cost"], t, cfg.batch_size) / prefill_flops(mm, pv["cost"], t,
                                                                                            cfg.batch_size) - 1
            o[m] = {"overhead": ps["median"] - 1, "min": ps["min"] - 1, "max": ps["max"] - 1,
                    "expected": expected}
        overhead.append(o)
    # dynamic rules against static plans of (about) the same Act, same runtime and hook
    from .routing import Dynamic, Plan

    def is_dynamic(v):
        plan = v.resolved_plan if v.resolved_plan is not None else Plan.parse(v.plan)
        return any(isinstance(r, Dynamic) for r in plan.resolve(mm).values())

    dyn_vs_static = []
    for v in variants:
        if not is_dynamic(v):
            continue
        for w in variants:
            if w is v or w.runtime != v.runtime or w.hook != v.hook or is_dynamic(w):
                continue
            a_v, a_w = info[v.label]["act"], info[w.label]["act"]
            if abs(a_v - a_w) > 0.05 * a_w:
                continue
            d: dict[str, Any] = {"dynamic": v.label, "static": w.label, "act_dynamic": a_v, "act_static": a_w,
                                 "act_decode_dynamic": info[v.label]["act_decode"],
                                 "act_decode_static": info[w.label]["act_decode"]}
            for m in metrics:
                ps = _paired(samples[v.label][m], samples[w.label][m])
                d[m] = {"slowdown": ps["median"] - 1, "min": ps["min"] - 1, "max": ps["max"] - 1}
            dyn_vs_static.append(d)
    argv = sys.argv[1:] if Path(sys.argv[0]).name.startswith("hookmoe") else sys.argv
    return {
        "format": BENCH_FORMAT,
        "command": " ".join(["hookmoe"] + list(argv)) if argv is not sys.argv else " ".join(argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "model": {"source": mm.source, "arch": mm.arch, "layers": mm.num_layers, "moe_layers": len(mm.layers),
                  "experts": mm.num_experts, "native_top_k": mm.native_top_k,
                  "hidden_size": int(mm.config.hidden_size), "expert_intermediate_size": mm.expert_intermediate_size,
                  "vocab_size": int(mm.config.vocab_size), "dtype": str(mm.dtype).replace("torch.", ""),
                  "device": str(mm.device)},
        "settings": {"lengths": lengths, "new_tokens": cfg.new_tokens, "itl_prompt": cfg.itl_prompt,
                     "batch_size": cfg.batch_size, "repeats": cfg.repeats, "warmup": cfg.warmup, "act": cfg.act,
                     "clock": cfg.clock, "decode_tokens": cfg.decode_tokens, "seed": cfg.seed,
                     "order": "interleaved, ABBA across repeats",
                     "runtime": runtime_desc},
        "variants": rows,
        "hook_overhead": overhead,
        "dynamic_vs_static": dyn_vs_static,
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------


def _metric_name(m: str) -> str:
    return "TTFT@" + m.split("@")[1] if m.startswith("ttft") else "ITL"


def results_table(res: dict):
    from rich.table import Table

    st = res["settings"]
    t = Table(title=f"hookmoe bench: {res['model']['source']} — {res['model']['device']}, {res['model']['dtype']}, "
                    f"batch {st['batch_size']}, {st['repeats']} interleaved repeats, {st['clock']} clock"
                    + (f", ITL over {st['new_tokens']} new tokens" if st["new_tokens"] else ""))
    for col, just in (("variant", "left"), ("Act¹", "right"), ("metric", "left"), ("median ms", "right"),
                      ("speed-up (min–max)", "right"), ("limit", "right"), ("eff.", "right")):
        t.add_column(col, justify=just, overflow="fold")
    for row in res["variants"]:
        first = True
        for m, x in row["metrics"].items():
            ratio = f"{x['ratio']:.2f}× ({x['ratio_min']:.2f}–{x['ratio_max']:.2f})" if "ratio" in x else "base"
            lim = f"{x['limit']:.2f}×" if "limit" in x else ""
            eff = x.get("efficiency")
            eff_s = f"{eff * 100:.0f}%" if isinstance(eff, (int, float)) else ("" if "ratio" not in x else "n/a")
            a, d = row["act"], row.get("act_decode", row["act"])
            act_s = f"{a:.2f}" if abs(a - d) < 0.005 else f"{a:.2f}/{d:.2f}"
            t.add_row(row["label"] if first else "", act_s if first else "", _metric_name(m),
                      f"{x['median_ms']:.1f}", ratio, lim, eff_s)
            first = False
        t.add_section()
    t.caption = ("¹ activated experts per token (prefill/decode where they differ); speed-up = median of the "
                 "per-repeat paired ratios; limit = active FLOPs (TTFT) or weight bytes per step (ITL); "
                 "eff. = (speed-up − 1)/(limit − 1)")
    return t


def _pairs_table(title: str, items: list[dict], name: Callable[[dict], str], key: str):
    from rich.table import Table

    if not items:
        return None
    t = Table(title=title)
    t.add_column("comparison", overflow="fold")
    metrics = [k for k in items[0] if k.startswith(("ttft@", "itl"))]
    for m in metrics:
        t.add_column(_metric_name(m), justify="right")
    for o in items:
        t.add_row(name(o), *[f"{o[m][key] * 100:+.1f}% ({o[m]['min'] * 100:+.1f}, {o[m]['max'] * 100:+.1f})"
                             + (f"; work +{o[m]['expected'] * 100:.1f}%" if "expected" in o[m] else "")
                             for m in metrics])
    return t


def extra_tables(res: dict) -> list:
    out = [_pairs_table("Hook overhead (time with / without, paired median (min, max))", res["hook_overhead"],
                        lambda o: f"{o['variant']} vs {o['without_hook']}", "overhead"),
           _pairs_table("Dynamic rule vs static plan at the same Act (time, paired median (min, max))",
                        res["dynamic_vs_static"],
                        lambda o: f"{o['dynamic']} (Act {o['act_dynamic']:.2f}/{o['act_decode_dynamic']:.2f}) vs "
                                  f"{o['static']} (Act {o['act_static']:.2f}/{o['act_decode_static']:.2f})",
                        "slowdown")]
    return [t for t in out if t is not None]


def plot(res: dict, path: str | Path) -> Path:
    """Bar plot: measured speed-up of every variant vs its base, with the theoretical limit beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["variants"] if any("ratio" in st for st in r["metrics"].values())]
    metrics = list(res["variants"][0]["metrics"].keys())
    names = [_metric_name(m) for m in metrics]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 2.0 + 1.1 * len(metrics) * max(1, len(rows)))), 4.5))
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        meas = [r["metrics"][m].get("ratio", float("nan")) for m in metrics]
        lo = [max(0.0, mv - r["metrics"][m].get("ratio_min", mv)) for m, mv in zip(metrics, meas)]
        hi = [max(0.0, r["metrics"][m].get("ratio_max", mv) - mv) for m, mv in zip(metrics, meas)]
        lim = [r["metrics"][m].get("limit", float("nan")) for m in metrics]
        bars = ax.bar(xs, meas, width * 0.9, yerr=[lo, hi], capsize=3, label=f"{r['label']} (Act {r['act']:.2f})")
        ax.hlines(lim, [x - width * 0.45 for x in xs], [x + width * 0.45 for x in xs], colors="black",
                  linestyles="--", linewidth=1.5, zorder=3, label="theoretical limit" if j == 0 else None)
        for b, mv in zip(bars, meas):
            ax.annotate(f"{mv:.2f}×", (b.get_x() + b.get_width() / 2, mv), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(names)
    ax.set_ylabel("speed-up vs base")
    base = res["variants"][0]["label"]
    ax.set_title(f"{res['model']['source']}: speed-up over '{base}'", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(rows) + 1),
              frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _command_line(ctx) -> str:
    """The command as typed (arguments and the options given on the command line), for the results JSON."""
    import shlex

    words = ["hookmoe", ctx.info_name or "bench"]
    for param in ctx.command.params:
        try:
            src = ctx.get_parameter_source(param.name)
        except AttributeError:  # pragma: no cover - very old click
            src = None
        if src is not None and getattr(src, "name", "") != "COMMANDLINE":
            continue
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            words.append(shlex.quote(str(value)))
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value:
                words.append(flag)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, shlex.quote(str(v))]
    return " ".join(words)


def _busy_note(mm, clock: str) -> str | None:
    """A hint when CPU timings are at the mercy of other jobs (OpenMP threads stall when cores are shared)."""
    if mm.device.type != "cpu" or clock == "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > cores - 0.5:
        return (f"the machine is busy (load {load:.1f} on {cores} cores): for stable CPU timings use "
                "--threads 1 --clock cpu")
    return None


def _int_list(text: str, what: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise BenchError(f"{what} must be comma-separated whole numbers (or none), got '{text}'") from None
    if any(v < 1 for v in vals):
        raise BenchError(f"{what} must be positive whole numbers, got '{text}'")
    return vals


def register_cli(app) -> None:
    from .cli import MODEL_HELP, PLAN_HELP, console, write_json

    @app.command("bench")
    def bench_cmd(
        ctx: typer.Context,
        model: str = typer.Argument(..., help=MODEL_HELP + "; with --random-weights also a preset: "
                                    + ", ".join(PRESETS)),
        plan: Optional[list[str]] = typer.Option(None, "--plan", help=PLAN_HELP + " (repeat; the first is the base; "
                                                 "PLAN@HOOK adds a hook; default: native and topk:1)"),
        hook: Optional[list[str]] = typer.Option(None, "--hook", help="hook directory or random[:LAYER] "
                                                 "(repeat); each is added to every plan after the first"),
        random_weights: bool = typer.Option(False, "--random-weights", help="build the model from its config "
                                            "(or preset) with random weights"),
        layers: Optional[int] = typer.Option(None, "--layers", help="with --random-weights: decoder layers"),
        scale: float = typer.Option(1.0, "--scale", help="with --random-weights: divide hidden/intermediate/"
                                    "vocab sizes and heads by this"),
        lengths: str = typer.Option(DEFAULT_LENGTHS_TEXT, "--lengths",
                                    help="TTFT prompt lengths (comma-separated; none = ITL only)"),
        new_tokens: int = typer.Option(256, "--new-tokens", help="new tokens for ITL (0 = TTFT only)"),
        itl_prompt: int = typer.Option(128, "--itl-prompt", help="prompt length for the ITL run"),
        batch_size: int = typer.Option(1, "--batch-size", help="sequences per batch"),
        repeats: int = typer.Option(5, "--repeats", help="interleaved timed repeats"),
        warmup: int = typer.Option(1, "--warmup", help="warm-up passes per variant"),
        runtime: str = typer.Option("fast", "--runtime", help="fast (hookmoe runtime) | reference (stock "
                                    "transformers generate) | both"),
        compile_: str = typer.Option("auto", "--compile", help="auto | on | off: torch.compile the decode step"),
        act: Optional[float] = typer.Option(None, "--act", help="calibrate dynamic plans to this Act first"),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (torch.set_num_threads)"),
        clock: str = typer.Option("wall", "--clock", help="wall | cpu (process CPU time, needs --threads 1: "
                                  "excludes preemption on a shared machine)"),
        device: str = typer.Option("auto", help="cpu | cuda | auto"),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        seed: int = typer.Option(0, "--seed"),
        as_json: Optional[Path] = typer.Option(None, "--json", help="write the results JSON here ('-' = stdout)"),
        plot_path: Optional[Path] = typer.Option(None, "--plot", help="bar plot PNG (default: next to --json)"),
        decode_tokens: Optional[str] = typer.Option(None, "--decode-tokens", help="greedy | random: what the "
                                                    "ITL decode steps are fed (default: random for random-weight "
                                                    "models, whose greedy outputs repeat; greedy otherwise)"),
        no_check: bool = typer.Option(False, "--no-check", help="skip the greedy-token check against the "
                                      "reference path"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    ):
        """TTFT / ITL of routing plans (and hooks), interleaved, with theoretical limits and efficiency."""
        if threads is not None:
            if threads < 1:
                raise BenchError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        comp = {"auto": "auto", "on": True, "off": False}.get(compile_)
        if comp is None:
            raise BenchError(f"--compile must be auto, on or off, got '{compile_}'")
        runtimes = {"fast": ["fast"], "reference": ["reference"], "both": ["fast", "reference"]}.get(runtime)
        if runtimes is None:
            raise BenchError(f"--runtime must be fast, reference or both, got '{runtime}'")
        name = model.split(":", 1)[1] if model.startswith("preset:") else model
        if not random_weights and (name in PRESETS or model.startswith("preset:")):
            raise BenchError(f"'{model}' is a random-weight preset: add --random-weights")
        if not random_weights and (layers is not None or scale != 1.0):
            raise BenchError("--layers and --scale need --random-weights")
        note = None
        if random_weights:
            mm = random_model(model, scale=scale, layers=layers, device=device, dtype=dtype, seed=seed)
        else:
            from .models import load

            mm = load(model, device=device, dtype=dtype, seed=seed)
        maxpos = _max_positions(mm)
        if lengths == DEFAULT_LENGTHS_TEXT and maxpos is not None and max(DEFAULT_LENGTHS) >= maxpos:
            fit = tuple(sorted({max(8, maxpos // d) for d in (8, 4, 2)}))
            lengths = ",".join(map(str, fit))
            note = (f"this model takes at most {maxpos} positions: TTFT prompt lengths {lengths} instead of "
                    f"{DEFAULT_LENGTHS_TEXT}")
            if not (as_json is not None and str(as_json) == "-"):
                console.print(f"note: {note}")
        cfg = BenchConfig(lengths=_int_list(lengths, "--lengths"), new_tokens=new_tokens, itl_prompt=itl_prompt,
                          batch_size=batch_size, repeats=repeats, warmup=warmup, compile=comp, clock=clock, act=act,
                          seed=seed, check_outputs=not no_check,
                          decode_tokens=decode_tokens or ("random" if random_weights or model.startswith("tiny:")
                                                          else "greedy"))
        cfg.validate()
        variants = parse_variants(plan or [], hook or [], runtimes)
        res = bench(mm, variants, cfg, progress=not no_progress)
        res["command"] = _command_line(ctx)
        if note:
            res["settings"]["lengths_note"] = note
        busy = _busy_note(mm, clock)
        if busy and not (as_json is not None and str(as_json) == "-"):
            console.print(f"note: {busy}")
        res["model"]["random_weights"] = bool(random_weights or model.startswith("tiny:"))
        res["model"]["scale"], res["model"]["layers_arg"] = scale, layers
        to_stdout = as_json is not None and str(as_json) == "-"
        if not to_stdout:
            console.print(results_table(res))
            for extra in extra_tables(res):
                console.print(extra)
            chk = res["checks"].get("greedy_tokens_identical_to_reference")
            if chk:
                bad = [k for k, x in chk.items() if not x]
                console.print("greedy tokens, fast runtime vs stock transformers: "
                              + ("identical" if not bad else "DIFFERENT for " + ", ".join(bad)))
        png = plot_path
        if png is None and as_json is not None and not to_stdout:
            png = Path(as_json).with_suffix(".png")
        if png is not None:
            plot(res, png)
            res["plot"] = str(png)
        if as_json is not None:
            write_json(res, None if to_stdout else as_json)
            if not to_stdout:
                console.print(f"wrote {as_json}" + (f" and {png}" if png else ""))
