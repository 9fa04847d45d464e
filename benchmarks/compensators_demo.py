"""Compensators on the demo model (SmolLM2 -> CMoE E6 S2 K4, see compensators_build_moe.py) at top-3 (Act 3.0):
no compensation, hook, router, output, hook+router; each trained with the same data, steps and objective (KD to
the native model), held-out perplexity on the builtin heldout split. Appends each result to the JSON file as soon as
it is measured.

    PYTHONPATH=src python benchmarks/compensators_demo.py /tmp/comp/moe benchmarks/results/compensators_demo.json \
        --steps 40 --runs base,router:all,hook:all:1%,output:all:1%,hook+router:all:1%

A run is KIND:LAYERS[:BUDGET[:INNER]] (INNER: a fixed Hook width instead of the budget's, e.g. the paper's).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import hookmoe
from hookmoe.data.blocks import make_blocks
from hookmoe.eval.perplexity import perplexity
from hookmoe.hook.inject import remove_hooks
from hookmoe.training.loop import train_hook

ap = argparse.ArgumentParser()
ap.add_argument("moe")
ap.add_argument("out")
ap.add_argument("--runs", default="base,router:all,hook:all:1%,output:all:1%,hook+router:all:1%")
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--plan", default="topk:3")
ap.add_argument("--eval-blocks", type=int, default=16)
ap.add_argument("--seq-len", type=int, default=512)
ap.add_argument("--train-seq-len", type=int, default=256)
ap.add_argument("--batch", type=int, default=4)
args = ap.parse_args()

out = Path(args.out)
res = json.loads(out.read_text()) if out.is_file() else {"command": " ".join(sys.argv), "runs": {}}
res.setdefault("commands", []).append("PYTHONPATH=src python " + " ".join(sys.argv))


def save():
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)


t0 = time.perf_counter()
mm = hookmoe.load(args.moe)
n_params = sum(p.numel() for p in mm.model.parameters())
# the demo's data: hook blocks seed 2 (train split), eval blocks seed 0 (heldout split)
train_blocks = make_blocks(mm.tokenizer, "builtin", args.steps * args.batch, args.train_seq_len, split="train", seed=2,
                           progress=False)
eval_blocks = make_blocks(mm.tokenizer, "builtin", args.eval_blocks, args.seq_len, split="heldout", seed=0,
                          progress=False)
res.update(model=args.moe, model_params=n_params, plan=args.plan, steps=args.steps, batch=args.batch, lr=args.lr,
           train_seq_len=args.train_seq_len, eval=f"{args.eval_blocks} x {args.seq_len} builtin heldout", objective="kd",
           torch_threads=torch.get_num_threads())
for spec in args.runs.split(","):
    t = time.perf_counter()
    if spec == "base":
        for plan in ("native", args.plan):
            r = perplexity(mm, eval_blocks, plan=plan, batch_size=4)
            res["runs"][f"none@{plan}"] = {"ppl": r["ppl"], "act": r["act"], "params": 0, "time_s": r["time_s"]}
            print(plan, r["ppl"], flush=True)
        save()
        continue
    kind, layers, *rest = spec.split(":")
    budget = rest[0] if rest and rest[0] else None
    inner = int(rest[1]) if len(rest) > 1 else None
    tr = train_hook(mm, layers=layers, plan=args.plan, train_blocks=train_blocks, kind=kind, budget=budget,
                    inner_size=inner, steps=args.steps, lr=args.lr, batch_size=args.batch, progress=False,
                    seed=0, eval_every=args.steps)
    hs = tr.hookset
    r = perplexity(mm, eval_blocks, plan=args.plan, batch_size=4)
    rec = {"kind": hs.kind, "layers": spec.split(":")[1], "budget": budget, "params": hs.num_params(),
           "params_pct": 100.0 * hs.num_params() / n_params, "inner_size": hs.inner_size, "rank": hs.rank,
           "part_layers": {k: len(v) for k, v in hs.part_layers().items()}, "ppl": r["ppl"], "act": r["act"],
           "train_time_s": tr.metrics["train_time_s"], "final_train_loss": tr.metrics["final_train_loss"],
           "time_s": time.perf_counter() - t}
    if tr.config.part_layers or layers == "auto":
        rec["layers_chosen"] = hs.part_layers()
    remove_hooks(mm)
    res["runs"][spec] = rec
    print(spec, json.dumps(rec), flush=True)
    base = res["runs"].get(f"none@{args.plan}", {}).get("ppl")
    native = res["runs"].get("none@native", {}).get("ppl")
    if base and native:
        rec["gap_recovered_pct"] = 100.0 * (base - r["ppl"]) / (base - native)
        rec["vs_native_pct"] = 100.0 * (r["ppl"] / native - 1.0)
    save()
res["total_time_s"] = res.get("total_time_s", 0) + time.perf_counter() - t0
save()
