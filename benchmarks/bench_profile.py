"""Where the time goes when reduced k falls short of its limit on the CPU (issue 5).

Writes benchmarks/results/bench_profile.json (``--out``) with these measurements (one thread, process CPU clock):

* ``decode_breakdown``: one runtime decode step at native k and at k=1, split by component (attention,
  its projections, router, routed / shared experts, norms, LM head) and by operator (torch.profiler), with
  the time outside any operator (Python, module calls) — where the time goes that k does not remove;
* ``decode``: one decode step of the runtime vs only the matrix-vector products that read the same weights
  (attention projections, router, the selected experts, LM head) — the difference is the per-step cost
  that does not shrink with k (framework/op overhead), per layer;
* ``expert_gemm``: sgemm throughput of one expert's two projections for M rows (M = tokens * k / experts is
  what a prompt gives each expert: 256 at top-2, 128 at top-1 for 1024 tokens and 8 experts);
* ``attention``: causal SDPA throughput vs the expert GEMMs at the prompt lengths of the benchmark;
* ``router_call``: one router call for one token, bare and with the hook of a static / dynamic plan (what
  a dynamic rule adds to every MoE layer of a decode step).

    python benchmarks/bench_profile.py [--scale 8] [--layers 4]
    python benchmarks/bench_profile.py --preset qwen1.5-moe-a2.7b --layers 8 --breakdown-only \
        --out benchmarks/results/bench_profile_qwen.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hookmoe.machine import machine_info
from hookmoe.speed import PRESETS, random_model, scale_config
from hookmoe.speed.runtime import Runtime

OUT = Path(__file__).resolve().parent / "results" / "bench_profile.json"


def cpu_ms(fn, n: int) -> float:
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - c0) / n * 1e3


def decode_profile(mm, k_values, repeats: int = 4, steps: int = 60) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(3, mm.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    layers = mm.model.model.layers
    g = torch.Generator().manual_seed(1)

    def step(k):
        for layer in mm.layers:
            layer.router.top_k = k
        with torch.inference_mode():
            cache = DynamicCache(config=mm.config)
            out = mm.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = [out.logits[:, -1:].argmax(-1)]

            lean = _lean(mm)

            def one():
                if lean is not None:  # the runtime's decode step (what `hookmoe bench` times)
                    logits = lean(nxt[0], torch.full((1, 1), cache.get_seq_length()), cache)
                else:
                    logits = mm.model(nxt[0], past_key_values=cache, use_cache=True).logits
                nxt[0] = logits[:, -1:].argmax(-1)

            return cpu_ms(one, steps)

    def matmuls_only(k):
        x = torch.randn(1, mm.config.hidden_size)
        picks = [torch.randperm(mm.num_experts, generator=g)[:k].tolist() for _ in layers]

        def one():
            for layer, sel in zip(layers, picks):
                a = layer.self_attn
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    F.linear(x, getattr(a, name).weight)
                F.linear(x, layer.mlp.gate.weight)
                ex = layer.mlp.experts
                for e in sel:
                    h = F.linear(x, ex.gate_up_proj[e])
                    F.linear(h[:, : h.shape[1] // 2], ex.down_proj[e])
                sh = getattr(layer.mlp, "shared_expert", None)
                if sh is not None:
                    F.linear(F.linear(x, sh.up_proj.weight), sh.down_proj.weight)
                    F.linear(x, sh.gate_proj.weight)
                    F.linear(x, layer.mlp.shared_expert_gate.weight)
            F.linear(x, mm.model.lm_head.weight)

        return cpu_ms(one, steps)

    res: dict = {}
    with Runtime(mm):
        for _ in range(repeats):
            for k in k_values:
                res.setdefault(f"step_k{k}", []).append(step(k))
                res.setdefault(f"matmuls_k{k}", []).append(matmuls_only(k))
    out = {key: statistics.median(v) for key, v in res.items()}
    for k in k_values:
        out[f"overhead_k{k}_ms"] = out[f"step_k{k}"] - out[f"matmuls_k{k}"]
        out[f"overhead_k{k}_per_layer_ms"] = out[f"overhead_k{k}_ms"] / len(layers)
    a, b = k_values
    out["step_ratio"] = out[f"step_k{a}"] / out[f"step_k{b}"]
    out["matmuls_ratio"] = out[f"matmuls_k{a}"] / out[f"matmuls_k{b}"]
    out["note"] = ("step = one runtime decode step (CPU ms); matmuls = only the matrix-vector products reading "
                   "the same weights; overhead = step - matmuls, which does not shrink with k")
    return out


def _lean(mm):
    from hookmoe.speed.runtime import LeanDecoder

    return LeanDecoder(mm) if LeanDecoder.supported(mm) else None


def decode_breakdown(mm, k: int, steps: int = 100, context: int = 256) -> dict:
    """Where one decode step's time goes (runtime decode step, top-``k``, ``context`` cached tokens):
    CPU ms per step of each component (timed by wrapping its forward) and torch.profiler's top operators
    by self CPU time; ``matmul_ms`` is the time inside aten::mm/addmm/bmm (the weight-reading work that the
    limit models), ``other_ms`` everything else (framework and small-op overhead)."""
    from collections import Counter, defaultdict

    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    for layer in mm.layers:
        layer.router.top_k = k
    acc: dict = defaultdict(float)
    wrapped = []

    def wrap(mod, name):
        f = mod.forward
        wrapped.append((mod, mod.__dict__.get("forward")))  # an instance forward (cpu_gemm) comes back after

        def g(*a, **kw):
            c0 = time.process_time()
            r = f(*a, **kw)
            acc[name] += time.process_time() - c0
            return r

        mod.forward = g

    for layer in mm.model.model.layers:
        a = layer.self_attn
        wrap(a, "attention (all)")
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if hasattr(a, n):
                wrap(getattr(a, n), "attention projections")
        wrap(layer.mlp, "MoE block (all)")
        wrap(layer.mlp.experts, "routed experts")
        blk = layer.mlp
        router = getattr(blk, "gate", None) or getattr(blk, "router")
        wrap(router, "router")
        if hasattr(blk, "shared_expert"):
            wrap(blk.shared_expert, "shared expert")
        wrap(layer.input_layernorm, "norms")
        wrap(layer.post_attention_layernorm, "norms")
    wrap(mm.model.lm_head, "LM head")
    lean = _lean(mm)
    ids = torch.randint(3, mm.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    tok = torch.randint(3, mm.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(1))
    try:
        # the runtime's experts implementation, as `hookmoe bench` times it (without it the stock grouped_mm
        # experts run, whose CPU kernel calls one mm per expert, empty ones included)
        with Runtime(mm), torch.inference_mode():
            cache = DynamicCache(config=mm.config)
            mm.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

            def one():
                if lean is not None:
                    lean(tok, torch.full((1, 1), cache.get_seq_length()), cache)
                else:
                    mm.model(tok, past_key_values=cache, use_cache=True)
                cache.crop(-1)

            for _ in range(10):
                one()
            acc.clear()
            total = cpu_ms(one, steps)
            parts = {name: v / steps * 1e3 for name, v in acc.items()}
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    one()
    finally:
        for mod, prev in reversed(wrapped):
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = prev
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    prof_total = sum(e.self_cpu_time_total for e in ops) / 20 / 1e3
    mm_ms = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 20 / 1e3
    calls = Counter()
    for e in ops:
        calls[e.key] += e.count
    return {
        "k": k, "context": context, "step_ms": total, "components_ms": dict(sorted(parts.items())),
        "profiler": {"ops_ms": prof_total, "matmul_ms": mm_ms, "other_ops_ms": prof_total - mm_ms,
                     "ops_per_step": sum(e.count for e in ops) // 20,
                     "top_ops": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 20 / 1e3,
                                  "calls_per_step": e.count / 20} for e in ops[:12]]},
        "python_and_dispatch_ms": total - prof_total,
        "note": "components overlap (attention (all) includes its projections; MoE block (all) includes router, "
                "routed and shared experts); ops_ms = time inside aten operators; python_and_dispatch_ms = "
                "step_ms - ops_ms (interpreter, module calls, hooks)",
    }


def gemm_profile(hidden: int, inter: int, experts: int, rows=(64, 128, 256, 512, 1024)) -> dict:
    w1 = [torch.randn(2 * inter, hidden) for _ in range(experts)]
    w2 = [torch.randn(hidden, inter) for _ in range(experts)]
    out = {}
    for m in rows:
        x, h = torch.randn(m, hidden), torch.randn(m, inter)

        def one():
            for e in range(experts):
                F.linear(x, w1[e])
                F.linear(h, w2[e])

        one()
        t = min(cpu_ms(one, 3) for _ in range(3)) / experts
        out[str(m)] = {"ms_per_expert": t, "gflops": 2 * m * 3 * hidden * inter / t / 1e6}
    return out


def gemm_fit(profile: dict, tokens: int, experts: int, k_native: int, k_reduced: int) -> dict:
    """Fit ``t(M) = fixed + per_row * M`` (ms per expert, both projections) to :func:`gemm_profile` and
    predict the experts' prefill speed-up native → reduced k for ``tokens`` evenly routed tokens: the
    fixed part (packing/streaming the expert's weights, paid once per expert whatever M is) does not
    shrink with k, so the FLOP ratio overstates what the experts can gain."""
    ms = np.array([float(m) for m in profile])
    ts = np.array([v["ms_per_expert"] for v in profile.values()])
    per_row, fixed = np.polyfit(ms, ts, 1)

    def experts_ms(k):
        return experts * (fixed + per_row * tokens * k / experts)

    return {"fixed_ms_per_expert": float(fixed), "ms_per_row": float(per_row), "tokens": tokens,
            "experts_ms": {f"k{k}": float(experts_ms(k)) for k in (k_native, k_reduced)},
            "experts_speedup": float(experts_ms(k_native) / experts_ms(k_reduced)),
            "experts_flop_ratio": k_native / k_reduced}


def attention_profile(heads: int, head_dim: int, lengths=(1024, 2048, 4096)) -> dict:
    out = {}
    for t in lengths:
        q, k, v = (torch.randn(1, heads, t, head_dim) for _ in range(3))
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        fn()
        ms = min(cpu_ms(fn, 1) for _ in range(3))
        flops = 2 * heads * 2 * head_dim * t * (t + 1) / 2
        out[str(t)] = {"ms": ms, "gflops": flops / ms / 1e6}
    return out


def routing_profile(mm, plans=("topk:2", "topp:0.5", "ratio:0.5", "naee:0.5", "entropy:t=1.0/1.5")) -> dict:
    """One router call for one token (decode): bare, and with each plan's hook (count=False, as timed)."""
    from hookmoe.routing import apply_plan

    router = mm.layers[0].router
    x = torch.randn(1, mm.config.hidden_size)

    def call():
        with torch.inference_mode():
            router(x)

    out = {"bare_us": min(cpu_ms(call, 2000) for _ in range(3)) * 1e3}
    for plan in plans:
        patch = apply_plan(mm, plan, count=False)
        try:
            out[f"{plan}_us"] = min(cpu_ms(call, 2000) for _ in range(3)) * 1e3
        finally:
            patch.remove()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--scale", type=float, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--breakdown-only", action="store_true", help="only the decode breakdown (both k)")
    ap.add_argument("--gemm-only", action="store_true",
                    help="only the expert GEMM time by rows per expert and its fixed + per-row fit (prefill)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.gemm_only:
        return _gemm_only(args)
    mm = random_model(args.preset, scale=args.scale, layers=args.layers, device="cpu")
    cfg = scale_config(PRESETS[args.preset], scale=args.scale, layers=args.layers)
    inter = mm.expert_intermediate_size
    res = {
        "command": " ".join(["python"] + sys.argv),
        "machine": machine_info(),
        "model": mm.source,
        "clock": "process CPU time, 1 thread",
        "decode_breakdown": {f"k{k}": decode_breakdown(mm, k) for k in (mm.native_top_k, 1)},
    }
    if args.breakdown_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["decode_breakdown"], indent=1))
        print(f"wrote {args.out}")
        return 0
    res |= {
        "decode": decode_profile(mm, (mm.native_top_k, 1)),
        "expert_gemm": gemm_profile(int(cfg["hidden_size"]), inter, mm.num_experts),
        "attention": attention_profile(int(cfg["num_attention_heads"]), int(cfg.get("head_dim") or 128)),
        "router_call": routing_profile(mm),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("decode_breakdown", "decode", "expert_gemm", "attention", "router_call")},
                     indent=1))
    print(f"wrote {args.out}")
    return 0


def _gemm_only(args) -> int:
    cfg = scale_config(PRESETS[args.preset], scale=args.scale, layers=args.layers)
    hidden = int(cfg["hidden_size"])
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts"))
    k = int(cfg.get("num_experts_per_tok"))
    prof = gemm_profile(hidden, inter, experts, rows=(64, 96, 128, 192, 256, 384, 512))
    res = {"command": " ".join(["python"] + sys.argv), "machine": machine_info(), "preset": args.preset,
           "scale": args.scale, "hidden": hidden, "expert_intermediate": inter, "experts": experts, "top_k": k,
           "clock": "process CPU time, 1 thread", "expert_gemm": prof,
           "fit": {str(t): gemm_fit(prof, t, experts, k, 1) for t in (1024, 2048, 4096)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k_: res[k_] for k_ in ("expert_gemm", "fit")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
