"""Allocators on the demo model (SmolLM2 -> CMoE E6 S2 K4, as ``hookmoe demo`` builds it): held-out perplexity
per allocator (and with Hooks) at target Acts, plus native k, uniform top-k and the calibrated dynamic rules.

    PYTHONPATH=src python benchmarks/alloc_demo_model.py /tmp/alloc/smollm2_moe         # build the model once
    PYTHONPATH=src python benchmarks/allocators.py /tmp/alloc/smollm2_moe OUT_STEM \\
        --acts 3.0,3.5 --allocators tlnle,greedy,dp,weights --compensators none [--sensitivity FILE]

Data as in the demo: 16 x 512 held-out tokens of the builtin corpus (seed 0) for perplexity; Hooks (all 30
layers, half an expert wide, KD, lr 1e-3) trained on the demo's 360 x 256 train-split blocks; sensitivity and
the dynamic rules calibrated on 8 x 256 train-split blocks (seed 5). Writes OUT_STEM.json/.md/.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hookmoe import load
from hookmoe.data import make_blocks
from hookmoe.search.frontier import frontier, write_frontier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_stem")
    ap.add_argument("--acts", default="3.0,3.5")
    ap.add_argument("--allocators", default="tlnle,greedy,dp,weights")
    ap.add_argument("--compensators", default="none")
    ap.add_argument("--compensate", default=None, help="allocators that get the compensators (default all)")
    ap.add_argument("--dynamic", default="topp,entropy")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--hook-blocks", type=int, default=360)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--calib-blocks", type=int, default=8)
    ap.add_argument("--sensitivity", default=None)
    ap.add_argument("--no-uniform", action="store_true")
    ap.add_argument("--ks", default=None, help="sensitivity: k values to measure (default native-2..native+1)")
    ap.add_argument("--only-sensitivity", action="store_true", help="measure the sensitivity, write OUT_STEM.json")
    a = ap.parse_args()
    import os

    # one thread by default: on a shared 2-core machine OpenMP's spinning threads cost several times their work
    torch.set_num_threads(int(os.environ.get("HOOKMOE_THREADS", "1")))
    t0 = time.perf_counter()
    mm = load(a.model_dir, device="cpu")
    tok = mm.tokenizer
    eval_blocks = make_blocks(tok, "builtin", a.eval_blocks, 512, split="heldout", seed=0, progress=False)
    calib_blocks = make_blocks(tok, "builtin", a.calib_blocks, 256, split="train", seed=5, progress=False)
    if a.only_sensitivity:
        from hookmoe.search.allocators import measure_sensitivity
        from hookmoe.report import write_json

        ks = [int(k) for k in a.ks.split(",")] if a.ks else None
        sens = measure_sensitivity(mm, calib_blocks, ks=ks, batch_size=4)
        sens["command"] = "PYTHONPATH=src python " + " ".join(sys.argv)
        write_json(Path(a.out_stem + ".json"), sens)
        print(f"wrote {a.out_stem}.json: {sens['evals']} evaluations in {sens['time_s']:.0f} s")
        return
    comps = [c for c in a.compensators.split(",") if c]
    train_blocks = val_blocks = None
    if comps != ["none"]:
        train_blocks = make_blocks(tok, "builtin", a.hook_blocks, 256, split="train", seed=2, progress=False)
        val_blocks = make_blocks(tok, "builtin", 4, 256, split="train", seed=3, progress=False)
    sens = None
    if a.sensitivity:
        sens = json.loads(Path(a.sensitivity).read_text())
        sens = sens.get("sensitivity", sens)
    from rich.console import Console

    res = frontier(mm, calib_blocks=calib_blocks, eval_blocks=eval_blocks,
                   acts=[float(x) for x in a.acts.split(",")], allocators=a.allocators.split(","),
                   compensators=comps, dynamic=[d for d in a.dynamic.split(",") if d], train_blocks=train_blocks,
                   val_blocks=val_blocks, steps=a.steps, sensitivity=sens, batch_size=4, uniform=not a.no_uniform,
                   compensate=a.compensate.split(",") if a.compensate else None, console=Console(), progress=False)
    res["command"] = "PYTHONPATH=src python " + " ".join(sys.argv)
    res["model"] = f"{a.model_dir} (SmolLM2 CMoE E6 S2 K4, demo build: benchmarks/alloc_demo_model.py)"
    res["torch_threads"] = torch.get_num_threads()
    res["total_s"] = time.perf_counter() - t0
    out = Path(a.out_stem)
    write_frontier(res, out.parent, title=f"{out.name}: quality vs Act", stem=out.name)
    print(f"wrote {out}.json/.md/.png in {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
