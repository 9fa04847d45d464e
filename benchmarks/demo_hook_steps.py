"""How far more Hook steps go on the demo model (issue 19: where does the dp + Hooks recovery saturate?).

Takes a finished demo directory (its converted MoE in ``moe/`` and its ``demo.json``), rebuilds the demo's data
exactly (same source, seeds and sizes), and trains the demo's Hooks (every MoE layer, ``--hook-budget`` of the
model, kd, lr 1e-3, batch 4) under the demo's dp plan at Act 3.0 for ``--steps`` steps (one pass over
``steps x 4`` fresh train blocks), then measures held-out perplexity on the demo's 16 x 512 held-out blocks.

    PYTHONPATH=src python benchmarks/demo_hook_steps.py /tmp/demo-final --steps 180 \
        --out benchmarks/results/demo_hook_steps_180.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import hookmoe
from hookmoe.data.blocks import make_blocks
from hookmoe.demo import DemoConfig, resolve_budgets
from hookmoe.eval.perplexity import perplexity
from hookmoe.files import check_output, write_json
from hookmoe.machine import machine_info
from hookmoe.routing.plan import Plan
from hookmoe.training import train_hook


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("--steps", type=int, default=180)
    ap.add_argument("--budget", default="1%")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    check_output(a.out, kind="file", flag="--out")  # an existing result is never replaced (minutes before it)
    demo = json.loads((a.demo_dir / "demo.json").read_text())
    cfg = resolve_budgets(DemoConfig(model=demo["config"]["model"]))
    mm = hookmoe.load(str(a.demo_dir / "moe"), device="cpu", dtype="float32")
    ks = demo["allocation"]["3"]["ks"]
    plan = Plan(base="layers:" + ",".join(str(ks[str(i)]) for i in range(len(ks))))
    tok = mm.tokenizer
    hook_blocks = make_blocks(tok, cfg.calib_src, a.steps * 4, cfg.hook_seq_len, split="train", seed=cfg.seed + 2,
                              progress=False)
    val_blocks = make_blocks(tok, cfg.calib_src, cfg.val_blocks, cfg.hook_seq_len, split="train", seed=cfg.seed + 3,
                             progress=False)
    eval_blocks = make_blocks(tok, cfg.calib_src, cfg.eval_blocks, cfg.seq_len, split="heldout", seed=cfg.seed,
                              progress=False)
    t0 = time.perf_counter()
    res = train_hook(mm, layers="all", plan=plan, budget=a.budget, train_blocks=hook_blocks, val_blocks=val_blocks,
                     objective="kd", steps=a.steps, lr=a.lr, batch_size=4, progress=False, seed=cfg.seed,
                     eval_every=max(1, a.steps // 4))
    train_s = time.perf_counter() - t0
    ppl = perplexity(mm, eval_blocks, plan=plan, batch_size=4, progress=False)["ppl"]
    rows = {r["name"]: r["ppl"] for r in demo["rows"]}
    native, uniform = rows["MoE native k"], rows["MoE reduced k (uniform)"]
    out = {"command": "PYTHONPATH=src python benchmarks/demo_hook_steps.py " + " ".join(sys.argv[1:]),
           "demo_dir": str(a.demo_dir), "steps": a.steps, "budget": a.budget, "lr": a.lr, "plan": plan.base,
           "hook_params": int(res.metrics.get("hook_params", 0)), "train_time_s": round(train_s, 1),
           "ppl": ppl, "native_ppl": native, "uniform_top3_ppl": uniform,
           "vs_native_pct": 100 * (ppl / native - 1), "gap_recovered_pct": 100 * (uniform - ppl) / (uniform - native),
           "demo_90_steps_ppl": rows.get("MoE dp (Act 3) + Hooks@all 30 layers"), "machine": machine_info()}
    write_json(a.out, out)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
