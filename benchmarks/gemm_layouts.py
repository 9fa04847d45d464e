"""Expert GEMM alternatives for CPU prefill (issue 5, the Mixtral prefill@1024 bound in SPEED.md).

One expert's gate/up projection at Mixtral-8x7B shapes /2 (2048 -> 2 x 7168), fp32, 1 thread, process CPU
time, for M routed rows: the runtime's layout (``F.linear(x, W)``, W ``[out, in]`` as transformers stores it),
the same weights stored input-major (``x @ W_t``, contiguous ``[in, out]``) and MKL's pre-packed GEMM
(``torch.ops.mkl._mkl_linear``, packed for one M). Writes benchmarks/results/gemm_layouts.json.

    taskset -c 1 python benchmarks/gemm_layouts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_profile import cpu_ms  # this folder (the script's own directory is on sys.path)
from hookmoe.bench import machine_info

OUT = Path(__file__).resolve().parent / "results" / "gemm_layouts.json"


def best(fn) -> float:
    fn()  # warm-up
    return min(cpu_ms(fn, 3) for _ in range(3))


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
        r = {"linear_out_in": best(lambda: F.linear(x, w)), "matmul_in_out": best(lambda: x @ wt)}
        if mkl:
            torch.testing.assert_close(torch.ops.mkl._mkl_linear(x, pw, w, None, packed_for), F.linear(x, w))
            r["mkl_packed"] = best(lambda: torch.ops.mkl._mkl_linear(x, pw, w, None, packed_for))
        res["ms"][str(m)] = r
        print(m, {a: round(b, 1) for a, b in r.items()}, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
