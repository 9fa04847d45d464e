"""Which Hook objective (lm / kd / hidden) and init (paper / zero) recover the most, and how fast?

For small MoE models on CPU, train a Hook at one layer while every MoE layer runs ``topk:1`` and
measure, on held-out ``builtin`` text, the KD-loss gap closed

    gap closed (%) = 100 · (KD_nohook − KD_hook) / (KD_nohook − KD_native),   KD_native = 0,

against optimizer steps and training wall time (evaluation time excluded), plus training throughput
(tokens/s). KD = KL(native model ‖ reduced model) on next-token distributions: the quantity every
objective ultimately tries to shrink. The LM-loss gap closed is recorded too.

The models are random ``tiny:<arch>``-style configs (6 layers, hidden 128) first pre-trained for a few
hundred steps as byte-level LMs on the ``builtin`` corpus (all weights, native routing), so that the
native model is a real (if small) language model: on a purely random model the LM objective chases
text statistics the "native" model does not have, and the comparison would say nothing. The
pre-trained weights are cached (safetensors) under ``~/.cache/hookmoe/bench``.

Writes ``benchmarks/results/hook_objectives.json`` (machine, versions, exact command, per-run curves and
a summary table). Usage::

    python benchmarks/hook_objectives.py                       # the default study (a few minutes)
    python benchmarks/hook_objectives.py --steps 40 --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hookmoe.data import make_blocks  # noqa: E402
from hookmoe import load
from hookmoe.models import build_tiny, tiny_tokenizer  # noqa: E402
from hookmoe.training import train_hook  # noqa: E402

# Slightly larger than tiny:<arch> so that top-1 routing opens a clear gap: 6 layers, hidden 128.
MODELS = {
    "mixtral-h128-l6": ("mixtral", dict(hidden_size=128, num_hidden_layers=6, intermediate_size=256)),
    "qwen2_moe-h128-l6": ("qwen2_moe", dict(hidden_size=128, num_hidden_layers=6, moe_intermediate_size=64,
                                            shared_expert_intermediate_size=128, intermediate_size=256)),
}
OBJECTIVES = ("kd", "lm", "hidden")
INITS = ("zero", "paper")


def machine() -> dict:
    import transformers

    from hookmoe import __version__

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_start": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "hookmoe": __version__,
            "cuda": torch.cuda.is_available()}


def pretrained(arch: str, over: dict, tok, steps: int, seed: int, cache_dir: Path) -> torch.nn.Module:
    """A tiny MoE pre-trained as a byte-level LM on builtin text (cached)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from hookmoe.data import iter_batches
    from hookmoe.training import lm_loss

    model = build_tiny(arch, seed=seed, **over)
    if steps <= 0:
        return model
    key = hashlib.sha256(json.dumps([arch, over, steps, seed, 3e-3, 8, 128], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"pretrained-{arch}-{key}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    blocks = make_blocks(tok, "builtin", steps * 8, 128, seed=seed + 1, split="train", cache_dir=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for i, b in enumerate(iter_batches(blocks, 8, shuffle=True, seed=seed)):
        loss = lm_loss(model(input_ids=b, use_cache=False).logits, b)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (i + 1) % 100 == 0:
            print(f"  pre-training {arch}: step {i + 1}/{steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def curve(history: list[dict]) -> list[dict]:
    """Eval points with the training time (s) spent up to each, evaluation excluded."""
    out, t, base = [], 0.0, None
    train_time = {}
    for h in history:
        if h["kind"] == "train":
            t += h["step_s"]
            train_time[h["step"]] = t
    for h in history:
        if h["kind"] != "eval":
            continue
        if base is None:
            base = h
        kd0, lm0, lmn = base["val_kd_nohook"], base["val_lm_nohook"], base["val_lm_native"]
        out.append({
            "step": h["step"], "train_time_s": round(train_time.get(h["step"], 0.0), 3),
            "val_kd": h["val_kd"], "kd_gap_closed_pct": 100 * (kd0 - h["val_kd"]) / kd0,
            "val_lm": h["val_lm"], "lm_gap_closed_pct": 100 * (lm0 - h["val_lm"]) / (lm0 - lmn)
            if abs(lm0 - lmn) > 1e-9 else None,
            "val_hidden": h["val_hidden"],
        })
    return out


def one_run(name: str, state: dict, tok, train, val, args, objective: str, init: str, topk: int | None,
            seed: int) -> dict:
    arch, over = MODELS[name]
    model = build_tiny(arch, seed=args.seed, **over)
    model.load_state_dict(state)
    mm = load(model.eval(), tokenizer=tok)
    layer = mm.moe_layer_indices[len(mm.moe_layer_indices) // 3]
    t0 = time.perf_counter()
    r = train_hook(mm, layers=layer, plan=args.plan, train_blocks=train, val_blocks=val, objective=objective,
                   init=init, kd_topk=topk, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                   eval_every=args.eval_every, progress=False, seed=seed, restore_best=False)
    wall = time.perf_counter() - t0
    c = curve(r.history)
    m, h0 = r.metrics, r.history[0]
    row = {"model": name, "arch": arch, "layer": layer, "objective": objective, "init": init, "kd_topk": topk,
           "seed": seed, "steps": m["steps"], "hook_params": m["hook_params"],
           "train_time_s": round(m["train_time_s"], 2), "wall_time_s": round(wall, 2),
           "tokens_per_s": round(m["tokens_per_s"], 1),
           "kd_nohook": h0["val_kd_nohook"], "kd_final": c[-1]["val_kd"],
           "lm_native": h0["val_lm_native"], "lm_nohook": h0["val_lm_nohook"], "lm_final": c[-1]["val_lm"],
           "kd_gap_closed_pct_final": round(c[-1]["kd_gap_closed_pct"], 2),
           "kd_gap_closed_pct_best": round(max(p["kd_gap_closed_pct"] for p in c), 2),
           "lm_gap_closed_pct_final": round(c[-1]["lm_gap_closed_pct"], 2)
           if c[-1]["lm_gap_closed_pct"] is not None else None,
           "curve": c}
    tag = f"{objective}{'+top' + str(topk) if topk else ''}/{init}/s{seed}"
    print(f"{name:18s} {tag:16s} KD gap closed {row['kd_gap_closed_pct_final']:6.2f}% "
          f"(best {row['kd_gap_closed_pct_best']:6.2f}%)  LM gap closed {row['lm_gap_closed_pct_final']}%  "
          f"{row['train_time_s']:6.1f}s train  {row['tokens_per_s']:7.0f} tok/s", flush=True)
    return row


def throughput(name: str, state: dict, tok, train, args, rounds: int = 3, steps: int = 12, epochs: int = 3) -> dict:
    """Training tokens/s per objective, measured interleaved (A B C D A B C D ...) so that load from other
    processes hits every variant alike; the median over rounds is reported. ``steps`` steps cover ``epochs``
    passes over the data (the CLI's default is 3 epochs), and the top-K cache build is included."""
    arch, over = MODELS[name]
    variants = [("kd", None), ("kd", 32), ("lm", None), ("hidden", None)]
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for objective, topk in variants:
            model = build_tiny(arch, seed=args.seed, **over)
            model.load_state_dict(state)
            mm = load(model.eval(), tokenizer=tok)
            layer = mm.moe_layer_indices[len(mm.moe_layer_indices) // 3]
            r = train_hook(mm, layers=layer, plan=args.plan, train_blocks=train[: steps * args.batch_size // epochs],
                           objective=objective, kd_topk=topk, steps=steps, lr=args.lr, batch_size=args.batch_size,
                           progress=False)
            key = objective + (f"+top{topk}" if topk else "")
            times.setdefault(key, []).append(r.metrics["tokens_per_s"])
    return {k: {"median_tokens_per_s": round(statistics.median(v), 1), "all": [round(x, 1) for x in v]}
            for k, v in times.items()}


def summarize(runs: list[dict], speed: dict, tokens_per_run: int) -> list[dict]:
    """Mean over seeds per (model, objective+cache, init); per-minute figures use the interleaved throughput."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["objective"] + (f"+top{r['kd_topk']}" if r["kd_topk"] else ""), r["init"]),
                          []).append(r)
    out = []
    for (model, obj, init), rs in groups.items():
        mean = lambda k: round(statistics.fmean(r[k] for r in rs if r[k] is not None), 2)  # noqa: E731
        steps_curve = [p["step"] for p in rs[0]["curve"]]
        out.append({"model": model, "objective": obj, "init": init, "seeds": [r["seed"] for r in rs],
                    "kd_gap_closed_pct_final": mean("kd_gap_closed_pct_final"),
                    "kd_gap_closed_pct_by_step": dict(zip(steps_curve, [round(statistics.fmean(
                        r["curve"][i]["kd_gap_closed_pct"] for r in rs), 2) for i in range(len(steps_curve))])),
                    "lm_gap_closed_pct_final": mean("lm_gap_closed_pct_final"),
                    "train_time_s": mean("train_time_s"), "tokens_per_s": mean("tokens_per_s")})
        tps = (speed.get(model) or {}).get(obj, {}).get("median_tokens_per_s")
        if tps:
            minutes = tokens_per_run / tps / 60
            out[-1]["interleaved_tokens_per_s"] = tps
            out[-1]["kd_gap_closed_pct_per_min"] = round(out[-1]["kd_gap_closed_pct_final"] / minutes, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=3e-3, help="random tiny models need more than the paper's 1e-4")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--val-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--plan", default="topk:1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    ap.add_argument("--seed", type=int, default=0, help="model/data seed; also the first hook seed")
    ap.add_argument("--init-seeds", type=int, default=2, help="hook seeds for the kd zero-vs-paper init study")
    ap.add_argument("--pretrain-steps", type=int, default=400, help="LM pre-training of the tiny model (0 = random)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "hookmoe" / "bench"))
    ap.add_argument("--quick", action="store_true", help="only the first model, kd/lm, zero init")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hook_objectives.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mach = machine()

    tok = tiny_tokenizer()
    train = make_blocks(tok, "builtin", args.samples, args.seq_len, seed=args.seed, split="train", cache_dir=False)
    val = make_blocks(tok, "builtin", args.val_samples, args.seq_len, seed=args.seed, split="heldout",
                      cache_dir=False)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [(o, i, None, args.seed) for o in OBJECTIVES for i in INITS] + [("kd", "zero", 32, args.seed)]
    variants += [("kd", i, None, args.seed + s) for s in range(1, args.init_seeds) for i in INITS]
    if args.quick:
        names, variants = names[:1], [("kd", "zero", None, args.seed), ("lm", "zero", None, args.seed)]
    t_all = time.perf_counter()
    runs, speed = [], {}
    for name in names:
        arch, over = MODELS[name]
        base = pretrained(arch, over, tok, args.pretrain_steps, args.seed, Path(args.cache_dir))
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for objective, init, topk, seed in variants:
            runs.append(one_run(name, state, tok, train, val, args, objective, init, topk, seed))
        if not args.quick:
            speed[name] = throughput(name, state, tok, train, args)
            print(f"{name:18s} interleaved training throughput (median tok/s): "
                  + ", ".join(f"{k} {v['median_tokens_per_s']:.0f}" for k, v in speed[name].items()), flush=True)
    mach["load_avg_end"] = list(os.getloadavg())
    result = {
        "benchmark": "hook_objectives",
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "machine": mach,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "data": {"train_blocks": list(train.shape), "val_blocks": list(val.shape), "source": "builtin"},
        "metric": "held-out KD gap closed (%) = 100*(KD_nohook - KD_hook)/(KD_nohook - 0), KD = KL(native || "
                  "reduced) per token; LM gap closed (%) = 100*(LM_nohook - LM_hook)/(LM_nohook - LM_native); "
                  "train time excludes evaluation and includes the teacher top-K cache build",
        "total_time_s": round(time.perf_counter() - t_all, 1),
        "summary": summarize(runs, speed, args.steps * args.batch_size * args.seq_len),
        "throughput_interleaved": speed,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['total_time_s']} s)")


if __name__ == "__main__":
    main()
