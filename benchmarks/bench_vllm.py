"""Serving benchmark in vLLM: output tokens/s, TTFT and ITL at several concurrencies, native vs reduced k (+ Hook).

Run in the vLLM environment (``make setup-vllm``)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py mixtral-8x7b --scale 8 --layers 4 \\
        --variant native --variant topk:1 --variant topk:1+hook:2 --concurrency 1,4,16 \\
        --json benchmarks/results/bench_vllm_mixtral_s8.json

What it does: builds a random-weight model with the real shapes of a published MoE, scaled
(:func:`hookmoe.bench.random_model`, ``--scale``/``--layers`` as in ``hookmoe bench --random-weights``), exports
one checkpoint per variant with :func:`hookmoe.serving.export_for_engine` (``native``/``topk:K``: plain
checkpoints served by vLLM's own classes; ``+hook:L``: a random non-zero Hook at layer L, served by hookmoe's
plugin), loads every variant in one process (vLLM's engine core in-process, ``enforce_eager``) and measures them
**interleaved**: for each repeat and concurrency C, each variant serves C requests submitted together
(``--prompt-len`` random prompt tokens, ``--new-tokens`` greedy tokens with ``ignore_eos``), ABBA order across
repeats. Per request: TTFT (submission -> first token), ITL (mean gap between its later tokens); per round:
output tokens/s. Ratios are medians of per-repeat paired ratios against the first variant.

Theoretical limits (as in ``benchmarks/results/bench_*.json``): TTFT — active FLOPs of the prefill (same ratio
at every C); ITL and tokens/s — weight bytes read per decode step with C tokens in the batch, counting the
expected number of distinct experts those C tokens touch under uniform routing (``1 - (1 - k/E)^C`` of each
layer's experts), so the limit shrinks toward 1 as C grows; the FLOP ratio (which does not shrink) is reported
beside it. Efficiency = (measured - 1) / (limit - 1). Limits count the plan only (a ``+hook`` variant's limit is its
plan's; the Hook's own work is extra), and a dynamic rule counts as its candidate cap — what vLLM computes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: variants interleave
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _speed_api():
    """(random_model, cost_model, prefill_flops, machine_info) from hookmoe's flat (hookmoe.bench) or packaged
    (hookmoe.speed, hookmoe.machine) layout."""
    try:
        from hookmoe.speed import cost_model, prefill_flops, random_model
    except ImportError:
        from hookmoe.bench import cost_model, prefill_flops, random_model
    try:
        from hookmoe.machine import machine_info
    except ImportError:
        from hookmoe.bench import machine_info
    return random_model, cost_model, prefill_flops, machine_info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="preset (mixtral-8x7b, qwen1.5-moe-a2.7b, ...) or a config directory")
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variant", action="append", default=None,
                    help="native | topk:K | PLAN+hook:L (repeatable; the first is the base)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (the engine runs in this process on --threads threads; excludes "
                         "time lost to other processes on a shared machine); wall: perf_counter. Both are recorded")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def build_exports(args, workdir: Path):

    from hookmoe.hook import insert_hooks, remove_hooks
    from hookmoe.serving import export_for_engine

    random_model = _speed_api()[0]
    mm = random_model(args.model, scale=args.scale, layers=args.layers, device="cpu", dtype="float32",
                      seed=args.seed)
    from hookmoe.models import tiny_tokenizer

    mm.tokenizer = tiny_tokenizer()  # a tokenizer for save_pretrained; the benchmark feeds token ids
    variants = []
    for v in args.variant:
        plan, _, hook = v.partition("+hook:")
        hook_dir = None
        if hook:
            hs = insert_hooks(mm, [int(hook)], init="paper", seed=args.seed + 1)
            hook_dir = workdir / f"hook-{len(variants)}"
            hs.save_pretrained(hook_dir, plan=plan)
            remove_hooks(mm)
        out = export_for_engine(mm, workdir / f"v{len(variants)}", plan=plan, hook=hook_dir, target="vllm")
        remove_hooks(mm)  # export_for_engine attaches the Hook; the cost model below must see the bare model
        variants.append({"label": v, "plan": plan, "hook_layer": int(hook) if hook else None, "path": out.path,
                         "format": out.format, "architectures": out.architectures})
    return mm, variants


def limits(mm, variants, conc, prompt_len):
    from hookmoe.routing import Plan, TopK

    _, cost_model, prefill_flops, _ = _speed_api()

    def kmap(plan):
        return {i: float(r.k if isinstance(r, TopK) else mm.native_top_k) for i, r in Plan.parse(plan).resolve(mm).items()}

    out = {}
    base = variants[0]
    for v in variants:
        d = {}
        for c in conc:
            cb, cv = cost_model(mm, kmap(base["plan"]), batch_size=c), cost_model(mm, kmap(v["plan"]), batch_size=c)
            d[c] = {"ttft_flops": prefill_flops(mm, cb, prompt_len, c) / prefill_flops(mm, cv, prompt_len, c),
                    "decode_bytes": cb["decode_weight_bytes"] / cv["decode_weight_bytes"],
                    "decode_flops": (cb["flops_per_token"] + cb["head_flops"]) / (cv["flops_per_token"] + cv["head_flops"])}
        out[v["label"]] = d
    return out


def serve_round(llm, prompts, new_tokens, tag, clock="cpu"):
    """Submit all prompts at once and step the engine to completion; per-request token timestamps."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    t0 = {k: f() for k, f in clocks.items()}
    for j, p in enumerate(prompts):
        eng.add_request(f"{tag}-{j}", TokensPrompt(prompt_token_ids=p), sp)
    stamps: dict[str, dict[str, list[float]]] = {k: {f"{tag}-{j}": [] for j in range(len(prompts))} for k in clocks}
    seen: dict[str, int] = {f"{tag}-{j}": 0 for j in range(len(prompts))}
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = {k: f() for k, f in clocks.items()}
        for o in outs:
            n = len(o.outputs[0].token_ids)
            for _ in range(n - seen[o.request_id]):
                for k in clocks:
                    stamps[k][o.request_id].append(now[k])
            seen[o.request_id] = n
    t1 = {k: f() for k, f in clocks.items()}
    res = {}
    for k in clocks:
        st = stamps[k].values()
        ntok = sum(len(s) for s in st)
        res[k] = {"ttft": statistics.mean(s[0] - t0[k] for s in st),
                  "itl": statistics.mean((s[-1] - s[0]) / (len(s) - 1) for s in st if len(s) > 1),
                  "tok_s": ntok / (t1[k] - t0[k]), "e2e": t1[k] - t0[k], "tokens": ntok}
    out = dict(res[clock])
    out["other_clock"] = res["wall" if clock == "cpu" else "cpu"]
    return out


def main(argv=None):
    args = parse_args(argv)
    args.variant = args.variant or ["native", "topk:1"]
    conc = [int(x) for x in args.concurrency.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.manual_seed(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    mm, variants = build_exports(args, workdir)
    lim = limits(mm, variants, conc, args.prompt_len)
    vocab = int(mm.config.vocab_size)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, vocab, (max(conc), args.prompt_len), generator=g).tolist()
    from vllm import LLM

    llms = []
    for v in variants:
        llms.append(LLM(model=str(v["path"]), dtype=args.dtype, enforce_eager=True, seed=args.seed,
                        skip_tokenizer_init=True, max_model_len=args.prompt_len + args.new_tokens + 8,
                        max_num_seqs=max(conc), max_num_batched_tokens=max(conc) * args.prompt_len,
                        enable_prefix_caching=False))
        v["vllm_class"] = llms[-1].apply_model(lambda m: type(m).__name__)[0]
        v["k_per_layer"] = llms[-1].apply_model(
            lambda m: {n: int(x.router.top_k) for n, x in m.named_modules() if hasattr(getattr(x, "router", None), "top_k")})[0]
    samples = {v["label"]: {c: [] for c in conc} for v in variants}
    for rep in range(args.warmup + args.repeats):
        order = list(range(len(variants)))
        if rep % 2:
            order.reverse()
        for c in conc:
            for i in order:
                r = serve_round(llms[i], prompts[:c], args.new_tokens, f"r{rep}-c{c}-v{i}", args.clock)
                if rep >= args.warmup:
                    samples[variants[i]["label"]][c].append(r)
        print(f"repeat {rep + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    base = variants[0]["label"]
    rows = []
    for v in variants:
        entry = {"label": v["label"], "plan": v["plan"], "hook_layer": v["hook_layer"], "export_format": v["format"],
                 "architectures": v["architectures"], "vllm_class": v["vllm_class"],
                 "k_per_layer": v["k_per_layer"], "concurrency": {}}
        for c in conc:
            xs = samples[v["label"]][c]
            bs = samples[base][c]
            st = {}
            for m, better_high in (("ttft", False), ("itl", False), ("tok_s", True)):
                vals = [x[m] for x in xs]
                other = [x["other_clock"][m] for x in xs]
                st[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                         "unit": "tok/s" if m == "tok_s" else "s", "samples": vals,
                         "other_clock_median": statistics.median(other)}
                if v["label"] != base:
                    pr = [(x[m] / b[m]) if better_high else (b[m] / x[m]) for x, b in zip(xs, bs)]
                    st[m]["speedup"] = statistics.median(pr)
                    st[m]["speedup_min"], st[m]["speedup_max"] = min(pr), max(pr)
                    L = lim[v["label"]][c]["ttft_flops" if m == "ttft" else "decode_bytes"]
                    st[m]["limit"] = L
                    st[m]["efficiency"] = (st[m]["speedup"] - 1) / (L - 1) if abs(L - 1) > 0.02 else None
                    if m != "ttft":
                        st[m]["limit_flops"] = lim[v["label"]][c]["decode_flops"]
            entry["concurrency"][str(c)] = st
        rows.append(entry)
    import platform

    import torch as _t
    import vllm

    machine_info = _speed_api()[3]

    res = {
        "format": "hookmoe-bench-vllm/1",
        "command": "OMP_NUM_THREADS=%s .venv-vllm/bin/python benchmarks/bench_vllm.py %s" % (
            args.threads, " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": dict(machine_info(), vllm=vllm.__version__, platform=platform.platform(), torch=_t.__version__),
        "model": {"source": mm.source, "arch": mm.arch, "layers": mm.num_layers, "experts": mm.num_experts,
                  "native_top_k": mm.native_top_k, "hidden_size": int(mm.config.hidden_size),
                  "expert_intermediate_size": mm.expert_intermediate_size, "vocab_size": vocab},
        "settings": {"concurrency": conc, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype, "threads": args.threads,
                     "clock": args.clock, "load_avg_1m_end": os.getloadavg()[0],
                     "engine": "vLLM CPU backend, in-process engine core, enforce_eager, prefix caching off",
                     "ttft": "request submission -> first token; all C requests submitted together",
                     "itl": "mean gap between a request's later tokens", "tok_s": "output tokens / round wall time",
                     "order": "interleaved, ABBA across repeats", "limit": __doc__.split("Theoretical limits")[1].strip()},
        "variants": rows,
    }
    text = json.dumps(res, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    # short table
    print(f"{'variant':<18}{'C':>4}{'tok/s':>9}{'TTFT ms':>9}{'ITL ms':>8}   speed-up tok/s | TTFT | ITL (limit)")
    for r in rows:
        for c, st in r["concurrency"].items():
            s = ""
            if "speedup" in st["tok_s"]:
                s = "   " + " | ".join(f"{st[m]['speedup']:.2f}x ({st[m]['limit']:.2f}x)" for m in ("tok_s", "ttft", "itl"))
            print(f"{r['label']:<18}{c:>4}{st['tok_s']['median']:>9.1f}{st['ttft']['median'] * 1e3:>9.1f}"
                  f"{st['itl']['median'] * 1e3:>8.1f}{s}")
    del llms
    gc.collect()
    return res


if __name__ == "__main__":
    main()
