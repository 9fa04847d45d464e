"""Build the demo's MoE (SmolLM2 -> CMoE E6 S2 K4, 60 router-calibration steps, 45-step KD fine-tune of the
experts) exactly as ``hookmoe demo`` does (same data seeds and budgets), without the Hook stage, and save it.

    PYTHONPATH=src python benchmarks/alloc_demo_model.py OUT_DIR [smollm2]

The saved directory loads with ``hookmoe.load(OUT_DIR)``; used by benchmarks/allocators.py.
"""

from __future__ import annotations

import sys
import time

import torch

from hookmoe import cmoe as cv
from hookmoe.data import make_blocks
from hookmoe.demo import DemoConfig, locate_model, resolve_budgets
from hookmoe.models import load_causal_lm


def main(out: str, model: str = "smollm2") -> None:
    cfg = resolve_budgets(DemoConfig(model=model, progress=False))
    t0 = time.perf_counter()
    dense, tok = load_causal_lm(str(locate_model(cfg.model)), dtype="float32", device="cpu")
    convert_blocks = make_blocks(tok, cfg.calib_src, cfg.convert_blocks, cfg.seq_len, split="train", seed=cfg.seed,
                                 progress=False)
    router_blocks = make_blocks(tok, cfg.calib_src, cfg.router_blocks, cfg.seq_len, split="train",
                                seed=cfg.seed + 1, progress=False)
    finetune_blocks = make_blocks(tok, cfg.calib_src, cfg.finetune_blocks, cfg.finetune_seq_len, split="train",
                                  seed=cfg.seed + 4, progress=False)
    moe = cv.convert_dense(dense, tok, convert_blocks, num_experts=cfg.experts, num_shared=cfg.shared,
                           top_k=cfg.top_k, seed=cfg.seed, progress=False)
    print(f"converted in {time.perf_counter() - t0:.1f} s", flush=True)
    if cfg.router_steps > 0:
        cv.calibrate_routers(moe, dense, router_blocks, steps=cfg.router_steps, seed=cfg.seed, progress=False)
        print(f"routers calibrated at {time.perf_counter() - t0:.1f} s", flush=True)
    if cfg.finetune_steps > 0:
        cv.distill_moe(moe, dense, finetune_blocks, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                       batch_size=cfg.finetune_batch, train=cfg.finetune_train, seed=cfg.seed, progress=False)
        print(f"fine-tuned at {time.perf_counter() - t0:.1f} s", flush=True)
    cv.save_converted(moe, tok, out)
    print(f"saved {out} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    import os

    # one thread by default: on a shared 2-core machine OpenMP's spinning threads cost several times their work
    torch.set_num_threads(int(os.environ.get("HOOKMOE_THREADS", "1")))
    torch.manual_seed(0)
    main(*sys.argv[1:])
