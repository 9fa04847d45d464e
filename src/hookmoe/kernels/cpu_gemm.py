"""Faster CPU matrix products: oneDNN instead of the default BLAS where it measures faster.

Why: on CPUs where torch's BLAS (MKL) does not pick its AVX-512 kernels — AMD EPYC among them — fp32
``F.linear`` runs at less than half the speed of oneDNN's matmul on the same core, forward and backward
(``benchmarks/gemm_layouts.py``; numbers in ``benchmarks/results/gemm_layouts.json`` and ``SPEED.md``). oneDNN is in every x86 torch build
(``torch.ops.mkldnn._linear_pointwise``), takes the plain ``[out, in]`` weight as it is stored (nothing is
re-packed or copied), and its results differ from MKL's by floating-point rounding only (~1e-7 relative
in fp32).

What it does:

* :func:`linear` — ``F.linear`` with the oneDNN kernel on CPU for float32 / bfloat16 products of at least
  :data:`MIN_MACS` multiply-adds when the backend in force is ``onednn``; everything else (CUDA, other
  dtypes, tiny products, tracing under ``torch.compile``) goes to ``F.linear`` unchanged. With autograd it
  runs through :class:`_OneDnnLinear`, whose backward also uses oneDNN (``dX = dY W``, ``dW = dY^T X``),
  so training gets the speed too.
* :func:`accelerate` — routes a model's ``nn.Linear`` modules through :func:`linear` (an instance-level
  ``forward``; :func:`restore` undoes it). hookmoe applies it to every model it loads on the CPU.
* :func:`causal_attention` / :func:`attention_forward` — a whole prompt's causal attention on the same
  kernel, registered with transformers as :data:`ATTN_NAME` (SDPA for everything else); the runtime turns it
  on for its lifetime (faster than torch's CPU SDPA on long prompts; see ``benchmarks/results/SPEED.md``).
* The backend: ``HOOKMOE_CPU_GEMM`` = ``auto`` (default), ``onednn`` or ``torch`` (torch's own BLAS), or
  :func:`set_backend`. ``auto`` times both kernels once per process and dtype on a mid-size product
  (a few ms) and takes oneDNN only when it is at least :data:`AUTO_MARGIN` faster, so on CPUs where MKL
  is already at its best nothing changes. :func:`describe` reports the choice and the probe's times.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

from hookmoe.errors import UserError

__all__ = ["linear", "accelerate", "restore", "set_backend", "backend", "uses_onednn", "describe", "MIN_MACS",
           "causal_attention", "attention_forward", "register_attention", "ATTN_NAME"]

BACKENDS = ("auto", "onednn", "torch")
ENV = "HOOKMOE_CPU_GEMM"
MIN_MACS = 1 << 18  # below this many multiply-adds oneDNN's per-call cost (~10 us) outweighs its speed
AUTO_MARGIN = 1.10  # auto picks oneDNN only when the torch kernel takes at least this much longer
_DTYPES = (torch.float32, torch.bfloat16)
BWD_MIN_ROWS = 16  # backward products on fewer rows use torch's kernel (1 row: 5 vs 10 ms, Mixtral /2 expert)
GW_COPY_MAX = 1 << 25  # largest output gradient (elements) the weight-gradient product copies transposed

_backend: str | None = None  # None: read ENV on first use
_choice: dict[torch.dtype, bool] = {}
_probe: dict[str, dict[str, float]] = {}


def _onednn_available(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def backend() -> str:
    """The backend setting in force: ``auto``, ``onednn`` or ``torch``."""
    global _backend
    if _backend is None:
        name = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if name == "mkl":
            name = "torch"
        if name not in BACKENDS:
            raise UserError(f"{ENV}={name!r}: use one of {', '.join(BACKENDS)}")
        _backend = name
    return _backend


def set_backend(name: str) -> str:
    """Select ``auto``, ``onednn`` or ``torch`` for this process; returns the previous setting."""
    global _backend
    name = "torch" if name == "mkl" else name
    if name not in BACKENDS:
        raise UserError(f"unknown CPU GEMM backend {name!r}: use one of {', '.join(BACKENDS)}")
    prev = backend()
    _backend = name
    _choice.clear()
    return prev


def _time_ms(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _auto_choice(dtype: torch.dtype) -> bool:
    """Time both kernels once on a mid-size product (128 x 1024 -> 2048): is oneDNN clearly faster?"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1024, generator=gen).to(dtype)
    w = torch.randn(2048, 1024, generator=gen).to(dtype)
    with torch.inference_mode():
        try:
            t_dnnl = _time_ms(lambda: onednn_linear(x, w, None))
        except (RuntimeError, NotImplementedError):  # a build whose oneDNN op cannot run here
            return False
        t_torch = _time_ms(lambda: F.linear(x, w))
    _probe[str(dtype).replace("torch.", "")] = {"torch_ms": round(t_torch, 3), "onednn_ms": round(t_dnnl, 3)}
    return t_torch >= AUTO_MARGIN * t_dnnl


def uses_onednn(dtype: torch.dtype) -> bool:
    """Whether CPU products of this dtype go to oneDNN (runs the ``auto`` probe on first call)."""
    hit = _choice.get(dtype)
    if hit is None:
        name = backend()
        if dtype not in _DTYPES or name == "torch" or not _onednn_available(dtype):
            hit = False
        elif name == "onednn":
            hit = True
        else:
            hit = _auto_choice(dtype)
        _choice[dtype] = hit
    return hit


def describe() -> dict:
    """The backend, the choice per dtype made so far and the ``auto`` probe's timings (for reports)."""
    return {"backend": backend(), "min_macs": MIN_MACS,
            "onednn": {str(k).replace("torch.", ""): v for k, v in _choice.items()}, "probe": dict(_probe)}


def _eligible(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or w.dim() != 2 or x.dim() < 2 or x.dtype != w.dtype:
        return False
    if b is not None and (b.dtype != w.dtype or b.dim() != 1):
        return False
    if x.numel() * w.shape[0] < MIN_MACS or torch.compiler.is_compiling():
        return False
    return uses_onednn(x.dtype)


class _OneDnnLinear(torch.autograd.Function):
    """``y = x W^T + b`` with oneDNN forward and backward (``dX = dY W``, ``dW = dY^T X``, ``db = sum dY``)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return onednn_linear(x.contiguous(), w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        g2 = grad.reshape(-1, grad.shape[-1])
        few = g2.shape[0] < BWD_MIN_ROWS  # a handful of rows: W^T-view and transposed copies cost more (measured)
        if ctx.needs_input_grad[0]:
            gx = grad @ w if few else onednn_linear(grad.contiguous(), w.t(), None)  # weight [in, out] viewed as W^T
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            if few or g2.numel() > GW_COPY_MAX:  # no transposed copy of a huge gradient (an LM head's)
                gw = g2.t() @ x2
            else:
                gw = onednn_linear(g2.t().contiguous(), x2.t().contiguous(), None)  # [out, rows] x [in, rows]^T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN on the CPU where that is the faster kernel."""
    if not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDnnLinear.apply(x, weight, bias)
    return onednn_linear(x.contiguous(), weight, bias)


def _linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return linear(input, self.weight, self.bias)


def accelerate(model: nn.Module) -> int:
    """Route ``model``'s plain ``nn.Linear`` modules through :func:`linear`; returns how many. A model whose
    parameters are not on the CPU, modules whose class overrides ``forward`` (quantised linears and the
    like) and modules that already carry an instance-level ``forward`` are left alone. Idempotent;
    :func:`restore` undoes it."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "forward" not in m.__dict__:
            m.forward = functools.partial(_linear_forward, m)  # picklable (torch.save of a whole model)
            n += 1
    return n


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate` on ``model``; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is _linear_forward:
            del m.forward
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Causal prompt attention on the same kernel
# --------------------------------------------------------------------------------------------------

ATTN_NAME = "hookmoe_sdpa"  # registered with transformers' attention (and mask) interfaces
# query rows per block; a block attends to keys [0, its end) (causal, block-granular); measured: 128 was the
# fastest of 64 / 128 / 256 / 512 at 1024 and 4096 tokens (Mixtral /2 heads)
ATTN_BLOCK = 128
ATTN_MIN_LEN = 64  # shorter prompts stay on SDPA


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of a whole prompt (no cache, no padding) with oneDNN products.

    ``query [B, H, T, d]``, ``key [B, Hkv, T, d]``, ``value [B, Hkv, T, dv]`` (grouped-query heads share
    their K/V: the ``H / Hkv`` query heads of a group are stacked into one product); returns
    ``[B, T, H, dv]``, the layout transformers' attention functions return. Query block ``[i0, i1)``
    multiplies only keys ``[0, i1)``; scores in float32, softmax exact (no online rescaling needed: a
    block's scores are complete). Why: torch's CPU SDPA kernel does its products with the BLAS whose speed
    ``cpu_gemm`` works around; at long prompts it becomes most of the prefill once the linears are fast.
    """
    b_sz, heads, t, d = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    g = heads // kv_heads
    out = query.new_empty((b_sz, t, heads, dv))
    blk = min(ATTN_BLOCK, t)
    mask = torch.ones(blk, blk, dtype=torch.bool, device=query.device).triu_(1)
    q_scaled = query * scale
    for b in range(b_sz):
        for h in range(kv_heads):
            k_bh, v_bh = key[b, h], value[b, h]
            q_group = q_scaled[b, h * g:(h + 1) * g]  # [g, T, d]
            for i0 in range(0, t, blk):
                i1 = min(i0 + blk, t)
                rows = i1 - i0
                q_blk = q_group[:, i0:i1].reshape(g * rows, d)
                s = onednn_linear(q_blk, k_bh[:i1], None)  # [g * rows, i1] = Q K^T
                if s.dtype != torch.float32:
                    s = s.float()
                s.view(g, rows, i1)[:, :, i0:i1].masked_fill_(mask[:rows, :rows], float("-inf"))
                p = torch.softmax(s, dim=-1).to(value.dtype)
                o = onednn_linear(p, v_bh[:i1].t(), None)  # [g * rows, dv] = P V
                out[b, i0:i1, h * g:(h + 1) * g] = o.view(g, rows, dv).transpose(0, 1)
    return out


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers attention function (name :data:`ATTN_NAME`): :func:`causal_attention` for a whole causal
    prompt without mask on the CPU where oneDNN is the kernel in force, transformers' SDPA for all else
    (decode steps, cached prefixes, padding or sliding-window masks, softcapping, sinks, dropout, autograd)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t = query.shape[2]
    if (attention_mask is None and causal and t >= ATTN_MIN_LEN and key.shape[2] == t and not dropout
            and query.device.type == "cpu" and query.dtype in _DTYPES and query.dtype == key.dtype == value.dtype
            and query.shape[1] % key.shape[1] == 0
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            and not torch.compiler.is_compiling() and uses_onednn(query.dtype)
            and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias"))):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return causal_attention(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register_attention() -> str:
    """Register :func:`attention_forward` (with SDPA's mask builder) with transformers; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS._global_mapping.get(ATTN_NAME) is not attention_forward:
        ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
