"""Memory before you start: what a model needs, computed from its config alone (no weights are loaded).

:func:`estimate_memory` builds the model's skeleton on the ``meta`` device (``accelerate.init_empty_weights``:
every parameter has its real shape and no storage) from ``tiny:<arch>``, a local directory holding a
``config.json`` (weights need not be there), a hub id (only ``config.json`` is fetched) or an already loaded
model, and reports (all sizes in bytes):

``weights``
    ``params_total`` (every parameter, tied ones once) x bytes of ``dtype``. Buffers (rotary tables, score
    biases) are left out: they are a few KB.
``active params per token``
    :func:`hookmoe.accounting.param_counts` under the plan: everything outside the routed experts + ``k_l``
    routed experts in MoE layer ``l``. Static plans (``native``, ``topk``, ``tlnle``, ``layers``) give the
    exact count; a dynamic rule (``topp``, ``ratio``, ``naee``, ``entropy``) runs between 1 and its cap
    (``max=K``, default the native k) experts per token, so its layers are counted at the cap (an upper bound)
    and flagged: the real Act needs calibration / measurement (``hookmoe eval`` reports it).
``KV cache``
    Per token and layer: ``2 x kv_heads x head_dim x bytes`` (GQA: ``num_key_value_heads``), or for
    DeepSeek's MLA ``(kv_lora_rank + qk_rope_head_dim) x bytes`` (transformers caches the compressed latent,
    one copy for K and V). Sliding-window layers (``layer_types``/``sliding_window``) hold at most ``window``
    tokens. ``kv_bytes_per_1k_tokens`` = the cache of a 1024-token context for one sequence;
    ``kv_bytes`` = for ``batch`` sequences of ``seq_len`` tokens.
``Hook training`` (all weights frozen, only the Hooks train; ``batch`` x ``seq_len`` tokens per step)
    ``frozen weights`` + ``hook state`` (Hook params in fp32 + fp32 gradients + two fp32 Adam moments =
    16 bytes per Hook parameter) + ``stored activations`` + ``logits`` + ``transient`` where

    * stored activations: only what lies above the lowest Hook keeps activations for backward (nothing below
      needs a gradient), and with frozen weights a linear layer keeps nothing of its input (its weight gradient
      is not needed). Per token, with ``e`` = activation bytes, ``h`` hidden, ``q`` / ``kv`` the query and key
      (= value) widths, ``r`` the rope head dim, ``f`` the expert width, ``k`` the (static or capped) k, ``E``
      the experts, ``s`` the shared-expert width, ``w`` the Hook width::

          attention: e*(h + 2q + 2kv + 2r [+ q_lora + kv_lora for MLA]) + 4 + 4*heads
                     (norm input, q and attention output, k, v, rope cos/sin, fp32 rstd and log-sum-exp;
                     SDPA / flash kernels recompute the scores) [+ (e + 1)*heads*(seq_len + 1) where the model
                     runs transformers' eager attention, which keeps its probabilities, e.g. GPT-OSS]
          MoE:       e*h + 4 + 4*E + k*(e*(3f + h) + 28) + e*3s
                     (norm input, fp32 router probabilities; per active expert its gate/up, SiLU(gate) and
                     output rows, weight and indices; shared experts' gate/up/SiLU)
          Hook:      e*(2h + w) per Hook; the final norm e*h + 4

      Layers above the lowest Hook layer count attention + FFN; the Hook layer its FFN block without the norm.
      Checked against the tensors autograd saves on the tiny models (tests/test_memory.py): mixtral, deepseek_v2,
      qwen2_moe within 5 %, GPT-OSS within 25 % (its experts' clamped activation keeps more).
      With gradient checkpointing a layer keeps only its input (``e*h`` per token) and one layer's full
      activations exist at a time during its recomputation.
    * logits: ``copies x vocab x seq_len x batch x 4`` bytes (fp32): 2 copies for the ``lm`` objective (logits and
      their gradient), 3 for ``kd`` (plus the teacher's log-probabilities), 2 for ``hidden``.
    * transient: the largest single layer's working set during the frozen forward below the Hook (= one layer's
      activations above).

    This is an estimate of what autograd keeps, not a measurement; allocator fragmentation and the CUDA context
    (~0.5-1 GiB per GPU) come on top, hence the ``usable`` fraction below.
``devices``
    The number of GPUs of ``gpu_memory_gib`` each such that ``(weights + runtime) / n <= usable x GPU`` (usable =
    0.9) for inference (runtime = KV cache + logits of one forward over ``batch x seq_len``) and for Hook training,
    and a ``max_memory`` map for ``device_map="auto"`` that leaves each GPU its share of the runtime memory; with
    ``devices=N`` (``--gpus N``) also whether it fits on N such GPUs.
"""

from __future__ import annotations

from hookmoe.layerspec import parse_layer_list

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from hookmoe.errors import ModelError, UserError
from hookmoe.options import Options, option
from hookmoe.routing.plan import PLAN_HELP

GIB = 1024 ** 3

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float8": 1, "fp8": 1,
               "int8": 1, "int4": 0.5}


class MemoryError_(UserError):
    """The memory estimate cannot be made from the given input."""


def dtype_bytes(dtype: str | torch.dtype | None) -> float:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    key = "bf16" if dtype in (None, "auto") else str(dtype).lower().replace("torch.", "")
    if key not in DTYPE_BYTES:
        raise MemoryError_(f"unknown --dtype '{dtype}' for the memory estimate (use one of: "
                           f"{', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[key]


# --------------------------------------------------------------------------------------------------
# The skeleton
# --------------------------------------------------------------------------------------------------


def load_config(spec: str):
    """The transformers config of a model spec, without weights (tiny:<arch>, a directory, a hub id)."""
    from hookmoe.models.adapters import TINY_ARCHS
    from hookmoe.models.tiny import tiny_config

    spec = str(spec)
    if spec.startswith("tiny:"):
        arch = spec.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise ModelError(f"unknown tiny architecture '{arch}'; choose one of: {', '.join(TINY_ARCHS)}")
        return tiny_config(arch)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        raise ModelError("--memory reads a config.json; for a .gguf file give the original model's hub id or "
                         "a directory with its config.json")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"'{spec}' is a path but holds no config.json (not a model directory)")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ModelError(f"model path not found: {spec}")
    from hookmoe.models.loading import _register_converted_type

    _register_converted_type()  # hookmoe_cmoe directories
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else spec)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read the config of '{spec}': {msg}") from e


def skeleton(model: Any):
    """A :class:`~hookmoe.models.MoEModel` whose parameters live on the ``meta`` device (no memory)."""
    from hookmoe.models.moe_model import MoEModel

    if isinstance(model, MoEModel):
        return model
    if isinstance(model, torch.nn.Module):
        return MoEModel(model, None)
    cfg = model if hasattr(model, "model_type") else load_config(model)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from hookmoe.models.adapters import UNSUPPORTED_MOE

    if cfg.model_type in UNSUPPORTED_MOE:
        raise ModelError(f"unsupported MoE architecture '{cfg.model_type}' ({UNSUPPORTED_MOE[cfg.model_type]})")
    with init_empty_weights():
        try:
            m = AutoModelForCausalLM.from_config(cfg)
        except ValueError as e:
            raise ModelError(f"cannot build a '{cfg.model_type}' model from this config: "
                             f"{str(e).strip().splitlines()[0]}") from e
    return MoEModel(m, None, source=str(model) if isinstance(model, (str, Path)) else "<config>")


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def _text_config(c):
    return getattr(c, "text_config", None) or c


def attention_shape(c) -> dict:
    """Query / key-value widths, heads and the per-token-per-layer KV elements of one sequence."""
    c = _text_config(c)
    h = int(c.hidden_size)
    heads = int(c.num_attention_heads)
    if getattr(c, "kv_lora_rank", None):  # DeepSeek MLA: compressed latent + shared rope key are cached
        rope = int(c.qk_rope_head_dim)
        q_dim = heads * (int(c.qk_nope_head_dim) + rope)
        kv_dim = heads * (int(c.qk_nope_head_dim) + rope + int(c.v_head_dim))  # expanded K and V (activations)
        return {"kind": "mla", "heads": heads, "q": q_dim, "kv": kv_dim // 2,
                "cache_elems": int(c.kv_lora_rank) + rope}
    hd = int(getattr(c, "head_dim", None) or h // heads)
    kvh = int(getattr(c, "num_key_value_heads", None) or heads)
    return {"kind": "gqa" if kvh < heads else "mha", "heads": heads, "kv_heads": kvh, "head_dim": hd,
            "q": heads * hd, "kv": kvh * hd, "cache_elems": 2 * kvh * hd}


def sliding_windows(c, n_layers: int) -> list[int | None]:
    """Per decoder layer: the attention window (tokens) or None for full attention."""
    c = _text_config(c)
    win = getattr(c, "sliding_window", None)
    if not win or getattr(c, "use_sliding_window", True) is False:
        return [None] * n_layers
    types = getattr(c, "layer_types", None)
    if types:
        return [int(win) if t == "sliding_attention" else None for t in list(types)[:n_layers]]
    return [int(win)] * n_layers


def kv_cache_bytes(c, n_layers: int, tokens: int, nbytes: float, batch: int = 1) -> float:
    att = attention_shape(c)
    wins = sliding_windows(c, n_layers)
    return float(sum(att["cache_elems"] * nbytes * min(tokens, w or tokens) for w in wins)) * batch


def plan_ks(mm, plan: Any) -> tuple[dict[int, float], list[str]]:
    """k per MoE layer under ``plan`` (dynamic rules at their cap) and notes on what is not exact."""
    from hookmoe.routing.plan import Dynamic, Native, Plan, TopK

    rules = Plan.parse(plan if plan is not None else "native").resolve(mm)
    ks: dict[int, float] = {}
    dyn: set[str] = set()
    for i, r in rules.items():
        if isinstance(r, TopK):
            ks[i] = float(r.k)
        elif isinstance(r, Native):
            ks[i] = float(mm.native_top_k)
        elif isinstance(r, Dynamic):
            ks[i] = float(r.max_k or mm.native_top_k)
            dyn.add(r.describe())
    notes = []
    if dyn:
        notes.append(f"dynamic rule(s) {', '.join(sorted(dyn))}: counted at their cap of experts per token "
                     "(an upper bound); the real Act needs calibration (see `hookmoe eval --act`)")
    return ks, notes


def _expert_widths(mm) -> tuple[int, int]:
    """(routed expert width, total shared-expert width) of the MoE layers."""
    from hookmoe.models.accounting import per_expert_params

    h = int(_text_config(mm.config).hidden_size)
    f = per_expert_params(mm.layers[0].experts) // (3 * h) if mm.layers else 0
    shared = mm.layers[0].shared
    s = sum(p.numel() for p in shared.parameters()) // (3 * h) if shared is not None else 0
    return int(f or mm.expert_intermediate_size), int(s)


def attention_activation_bytes(c, e: float, seq_len: int = 0, eager: bool = False) -> float:
    """Bytes autograd keeps per token in one attention block whose input needs a gradient (frozen weights).

    ``eager``: attention that materialises its probabilities (transformers' ``eager`` implementation, e.g. GPT-OSS
    with attention sinks) also keeps ``heads x seq_len`` probabilities (+ a dropout mask byte) per token."""
    c = _text_config(c)
    h = int(c.hidden_size)
    att = attention_shape(c)
    rope = int(getattr(c, "qk_rope_head_dim", None) or att.get("head_dim", h // att["heads"]))
    lora = int(getattr(c, "q_lora_rank", None) or 0) + int(getattr(c, "kv_lora_rank", None) or 0)
    # norm input + rstd; q and the attention output (q width); k and v; rope cos/sin; latent norms (MLA);
    # fp32 log-sum-exp per head
    probs = (e + 1) * att["heads"] * (seq_len + 1) if eager else 0.0
    return e * (h + 2 * att["q"] + 2 * att["kv"] + 2 * rope + lora) + 4 + 4 * att["heads"] + probs


def ffn_activation_bytes(mm, k: float, e: float, *, moe: bool, with_norm: bool = True) -> float:
    """Bytes per token of one MoE (or dense) FFN block under top-``k``; ``with_norm=False`` for a Hook layer, whose
    norm lies below the Hook."""
    c = _text_config(mm.config)
    h = int(c.hidden_size)
    norm = (e * h + 4) if with_norm else 0.0
    if not moe:
        return norm + e * 3 * int(getattr(c, "intermediate_size", 4 * h))
    f, s = _expert_widths(mm)
    # per routed slot: gate/up (2f) and SiLU(gate) (f), the expert's output rows (h), its weight and indices
    slot = e * (3 * f + h) + 4 + 24
    return norm + 4 * mm.num_experts + k * slot + (e * 3 * s if s else 0.0)


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def _devices(need: float, runtime: float, gpu: float, usable: float, devices: int | None = None) -> dict:
    n = max(1, math.ceil(need / (usable * gpu)))
    per_gpu_weights = usable * gpu - runtime / n
    out = {"gpus": n, "bytes_per_gpu": need / n,
           "max_memory": {i: f"{int(per_gpu_weights // GIB)}GiB" for i in range(n)}}
    if devices:  # the user's device count: does it fit?
        out["on_devices"] = {"devices": int(devices), "bytes_per_gpu": need / devices,
                             "fits": need / devices <= usable * gpu}
    return out


@dataclass(kw_only=True)
class MemoryOptions(Options):
    """The run a memory estimate is for (``hookmoe info --memory``; :func:`estimate_memory` takes its defaults and
    bounds from here)."""

    error: ClassVar[type] = MemoryError_

    plan: Optional[str] = option(None, "--memory: " + PLAN_HELP + " (default native)")
    batch: int = option(1, "--memory: sequences per step", min=1)
    seq_len: int = option(2048, "--memory: tokens per sequence", min=1)
    gpu_memory: float = option(80.0, "--memory: GiB per GPU for the device suggestion", min=0, min_open=True)
    gpus: Optional[int] = option(None, "--memory: also check the fit on this many GPUs", min=1)
    hook_layer: Optional[str] = option(None, "--memory: Hook layer(s), e.g. 14 or 14,20 (default: the middle MoE "
                                       "layer)")

    def check(self) -> None:
        parse_layers(self.hook_layer)  # syntax now; the range once the model's shape is known

    def estimate_kwargs(self) -> dict:
        """These settings as :func:`estimate_memory` keyword arguments."""
        return {"plan": self.plan, "batch": self.batch, "seq_len": self.seq_len,
                "hook_layers": parse_layers(self.hook_layer), "gpu_memory_gib": self.gpu_memory,
                "devices": self.gpus}


def estimate_memory(model: Any, *, dtype: str | torch.dtype | None = "bf16", plan: Any = MemoryOptions.plan,
                    batch: int = MemoryOptions.batch, seq_len: int = MemoryOptions.seq_len,
                    hook_layers: list[int] | None = None, hook_hidden: int | None = None, objective: str = "kd",
                    grad_checkpointing: bool = False, gpu_memory_gib: float = MemoryOptions.gpu_memory,
                    usable: float = 0.9, activation_dtype: str | None = None,
                    devices: int | None = MemoryOptions.gpus) -> dict:
    """Memory of ``model`` (a spec, a config or a loaded model) from shapes only; see the module docstring."""
    from hookmoe.models.accounting import param_counts

    MemoryOptions(batch=batch, seq_len=seq_len, gpu_memory=gpu_memory_gib, gpus=devices)  # bounds, named by flag
    if objective not in ("kd", "lm", "hidden"):
        raise MemoryError_(f"unknown objective '{objective}' (use kd, lm or hidden)")
    mm = skeleton(model)
    c = _text_config(mm.config)
    nb = dtype_bytes(dtype)
    e = dtype_bytes(activation_dtype) if activation_dtype else max(2.0, nb) if nb < 2 else nb  # int8/fp8 run in 16 bit
    h, v = int(c.hidden_size), int(c.vocab_size)
    ks, notes = plan_ks(mm, plan)
    counts = param_counts(mm, ks)
    native = param_counts(mm)
    weights = counts["total"] * nb

    # KV cache
    kv_1k = kv_cache_bytes(c, mm.num_layers, 1024, nb)
    kv_run = kv_cache_bytes(c, mm.num_layers, seq_len, nb, batch)
    att = attention_shape(c)

    # Hook training
    moe_idx = mm.moe_layer_indices
    if hook_layers is None:
        hook_layers = [moe_idx[len(moe_idx) // 2]]
    for li in hook_layers:
        if li not in moe_idx:
            raise MemoryError_(f"--hook-layer {li} is not an MoE layer (MoE layers: {moe_idx[0]}..{moe_idx[-1]})")
    width = hook_hidden or mm.hook_hidden_size
    hook_params = len(hook_layers) * (2 * h * width + 1)
    hook_state = hook_params * 16
    lowest = min(hook_layers)
    tokens = batch * seq_len
    impl = getattr(mm.config, "_attn_implementation", None) or "sdpa"
    attn = attention_activation_bytes(c, e, seq_len, eager=impl == "eager") * tokens
    ffn = {i: ffn_activation_bytes(mm, ks.get(i, 0.0), e, moe=i in ks) * tokens for i in range(mm.num_layers)}
    per_layer = {i: attn + ffn[i] for i in range(mm.num_layers)}
    hook_acts = len(hook_layers) * e * (2 * h + width) * tokens  # Hook input, its inner ReLU, its output
    final_norm = (e * h + 4) * tokens
    above = [i for i in range(mm.num_layers) if i > lowest]
    # the lowest Hook layer keeps only its FFN block (the attention and the norm lie below the Hook)
    at_hook = ffn_activation_bytes(mm, ks[lowest], e, moe=True, with_norm=False) * tokens
    if grad_checkpointing:
        stored = e * h * tokens * (len(above) + 1) + max([per_layer[i] for i in above] + [at_hook])
    else:
        stored = sum(per_layer[i] for i in above) + at_hook
    stored += hook_acts + final_norm
    copies = {"lm": 2, "kd": 3, "hidden": 2}[objective]
    logits = copies * v * tokens * 4
    transient = max(per_layer.values())
    train_total = weights + hook_state + stored + logits + transient

    # inference: weights + KV cache + one forward's logits (fp32) and the largest layer's working set
    infer_runtime = kv_run + v * tokens * 4 + transient
    gpu = gpu_memory_gib * GIB
    out = {
        "source": mm.source,
        "arch": mm.arch,
        "dtype": str(dtype),
        "bytes_per_param": nb,
        "plan": str(plan if plan is not None else "native"),
        "k_per_layer": {str(i): k for i, k in ks.items()},
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_active_native": native["active"],
        "params_active_paper_formula": counts["active_paper"],
        "params_per_expert": counts["per_expert"],
        "weight_bytes": weights,
        "active_weight_bytes_per_token": counts["active"] * nb,
        "attention": att["kind"],
        "kv_bytes_per_token": kv_cache_bytes(c, mm.num_layers, 1, nb),
        "kv_bytes_per_1k_tokens": kv_1k,
        "sliding_window_layers": sum(w is not None for w in sliding_windows(c, mm.num_layers)),
        "batch": batch,
        "seq_len": seq_len,
        "kv_bytes": kv_run,
        "inference": {"weights": weights, "kv_cache": kv_run, "logits": v * tokens * 4, "transient": transient,
                      "total": weights + infer_runtime,
                      **_devices(weights + infer_runtime, infer_runtime, gpu, usable, devices)},
        "hook_training": {
            "hook_layers": list(hook_layers), "hook_hidden": width, "hook_params": hook_params,
            "objective": objective, "grad_checkpointing": grad_checkpointing,
            "frozen_weights": weights, "hook_state": hook_state, "activations": stored,
            "activation_layers": len(above) + 1, "logits": logits, "transient": transient, "total": train_total,
            **_devices(train_total, train_total - weights, gpu, usable, devices),
        },
        "gpu_memory_gib": gpu_memory_gib,
        "notes": notes,
    }
    return out


def _fit(part: dict) -> str:
    od = part.get("on_devices")
    if not od:
        return ""
    return (f"; on {od['devices']}: {od['bytes_per_gpu'] / GIB:,.1f} GiB per GPU, "
            f"{'fits' if od['fits'] else 'does NOT fit'}")


def parse_layers(text: str | None) -> list[int] | None:
    """``--hook-layer`` text (``14`` or ``14,20``) as layer numbers."""
    if not text:
        return None
    return parse_layer_list(text, "--hook-layer", MemoryError_)


def memory_rows(d: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the CLI table."""
    def b(x: float) -> str:
        return f"{x / GIB:,.2f} GiB ({int(round(x)):,} B)"

    inf, tr = d["inference"], d["hook_training"]
    rows = [
        ("arch / dtype", f"{d['arch']} / {d['dtype']} ({d['bytes_per_param']} B per parameter)"),
        ("params total", f"{d['params_total']:,}"),
        ("weights", b(d["weight_bytes"])),
        ("plan", d["plan"]),
        ("active params / token", f"{d['params_active']:,} (native: {d['params_active_native']:,}; paper formula: "
                                  f"{d['params_active_paper_formula']:,})"),
        ("KV cache / token", f"{int(d['kv_bytes_per_token']):,} B ({d['attention']})"),
        ("KV cache / 1k tokens", b(d["kv_bytes_per_1k_tokens"])),
        (f"inference, batch {d['batch']} x {d['seq_len']}",
         f"{b(inf['total'])}: KV {inf['kv_cache'] / GIB:,.2f} GiB + logits {inf['logits'] / GIB:,.2f} GiB"),
        ("  GPUs needed", f"{inf['gpus']} x {d['gpu_memory_gib']:g} GiB, max_memory {inf['max_memory']}"
                          + _fit(inf)),
        (f"Hook training ({tr['objective']}), layers {tr['hook_layers']}",
         f"{b(tr['total'])}: frozen weights {tr['frozen_weights'] / GIB:,.2f} + hook state "
         f"{tr['hook_state'] / GIB:,.3f} + activations {tr['activations'] / GIB:,.2f} "
         f"({tr['activation_layers']} layers{', checkpointed' if tr['grad_checkpointing'] else ''}) + logits "
         f"{tr['logits'] / GIB:,.2f} + transient {tr['transient'] / GIB:,.2f} GiB"),
        ("  GPUs needed", f"{tr['gpus']} x {d['gpu_memory_gib']:g} GiB, max_memory {tr['max_memory']}"
                          + _fit(tr)),
    ]
    rows += [("note", n) for n in d["notes"]]
    return rows

