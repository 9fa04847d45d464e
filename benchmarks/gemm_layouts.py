"""Expert GEMM alternatives for CPU prefill (issue 5, the Mixtral prefill@1024 bound in SPEED.md).

One expert's gate/up projection at Mixtral-8x7B shapes /2 (2048 -> 2 x 7168), fp32, 1 thread, process CPU
time, for M routed rows: the runtime's layout (``F.linear(x, W)``, W ``[out, in]`` as transformers stores it),
the same weights stored input-major (``x @ W_t``, contiguous ``[in, out]``) and MKL's pre-packed GEMM
(``torch.ops.mkl._mkl_linear``, packed for one M) and oneDNN's matmul on the runtime's layout
(``torch.ops.mkldnn._linear_pointwise``, what ``hookmoe.cpu_gemm`` uses). Then, for the shapes the
project runs (Mixtral /2 experts, SmolLM2's MLP and LM head, decode rows), torch's BLAS against oneDNN:
forward, input gradient and weight gradient; and a prompt's causal attention (Mixtral /2 and Qwen1.5-MoE
heads), torch's SDPA against ``cpu_gemm.causal_attention``. Writes benchmarks/results/gemm_layouts.json.

    taskset -c 1 python benchmarks/gemm_layouts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_profile import cpu_ms  # this folder (the script's own directory is on sys.path)
from hookmoe.machine import machine_info
from hookmoe.kernels.cpu_gemm import causal_attention, onednn_linear

OUT = Path(__file__).resolve().parent / "results" / "gemm_layouts.json"


def best(fn) -> float:
    fn()  # warm-up
    return min(cpu_ms(fn, 3) for _ in range(3))


SHAPES = {  # name: (rows, in, out)
    "mixtral/2 expert gate_up, 1 row (decode)": (1, 2048, 14336),
    "mixtral/2 expert gate_up, 128 rows": (128, 2048, 14336),
    "mixtral/2 expert down, 128 rows": (128, 7168, 2048),
    "mixtral/2 expert gate_up, 512 rows": (512, 2048, 14336),
    "smollm2 mlp up, 1024 rows": (1024, 576, 1536),
    "smollm2 mlp down, 1024 rows": (1024, 1536, 576),
    "smollm2 lm head, 1024 rows": (1024, 576, 49152),
}


def backends() -> dict:
    """torch's BLAS vs oneDNN: forward ``x W^T``, input gradient ``g W``, weight gradient ``g^T x``."""
    out = {}
    gen = torch.Generator().manual_seed(1)
    for name, (m, k, n) in SHAPES.items():
        w, x, g = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
        ref = F.linear(x, w)
        assert ((onednn_linear(x, w, None) - ref).norm() / ref.norm()).item() < 1e-5
        r = {"torch_fwd": best(lambda: F.linear(x, w)), "onednn_fwd": best(lambda: onednn_linear(x, w, None)),
             "torch_dx": best(lambda: g @ w), "onednn_dx": best(lambda: onednn_linear(g, w.t(), None)),
             "torch_dw": best(lambda: g.t() @ x),
             "onednn_dw": best(lambda: onednn_linear(g.t().contiguous(), x.t().contiguous(), None))}
        out[name] = r
        print(name, {a: round(b, 2) for a, b in r.items()}, flush=True)
    return out


def attention() -> dict:
    """One layer's causal prompt attention, ms: torch's SDPA vs oneDNN products in query blocks."""
    out = {}
    gen = torch.Generator().manual_seed(2)
    for name, heads, kv_heads in (("mixtral/2: 16 heads x 128, 4 KV heads", 16, 4),
                                  ("qwen1.5-moe: 16 heads x 128, 16 KV heads", 16, 16)):
        for t in (1024, 4096):
            q = torch.randn(1, heads, t, 128, generator=gen)
            k = torch.randn(1, kv_heads, t, 128, generator=gen)
            v = torch.randn(1, kv_heads, t, 128, generator=gen)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            torch.testing.assert_close(causal_attention(q, k, v, 128 ** -0.5), ref.transpose(1, 2), rtol=1e-4,
                                       atol=1e-4)
            r = {"sdpa": best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
                 "onednn_blocks": best(lambda: causal_attention(q, k, v, 128 ** -0.5))}
            out[f"{name}, {t} tokens"] = r
            print("attention", name, t, {a: round(b, 1) for a, b in r.items()}, flush=True)
    return out


def main() -> int:
    torch.set_num_threads(1)
    k, n = 2048, 2 * 7168
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    wt = w.t().contiguous()
    rows = (64, 128, 200, 256, 512)
    packed_for = 128
    mkl = hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
    pw = torch.ops.mkl._mkl_reorder_linear_weight(w, packed_for) if mkl else None
    res = {"command": " ".join(["python"] + sys.argv), "machine": machine_info(), "in": k, "out": n,
           "clock": "process CPU time, 1 thread, best of 3 x 3", "packed_for_rows": packed_for if mkl else None,
           "ms": {}}
    for m in rows:
        x = torch.randn(m, k)
        r = {"linear_out_in": best(lambda: F.linear(x, w)), "matmul_in_out": best(lambda: x @ wt),
             "onednn_out_in": best(lambda: onednn_linear(x, w, None))}
        if mkl:
            torch.testing.assert_close(torch.ops.mkl._mkl_linear(x, pw, w, None, packed_for), F.linear(x, w))
            r["mkl_packed"] = best(lambda: torch.ops.mkl._mkl_linear(x, pw, w, None, packed_for))
        res["ms"][str(m)] = r
        print(m, {a: round(b, 1) for a, b in r.items()}, flush=True)
    res["backends"] = backends()
    res["attention"] = attention()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
