"""How far does the KD fine-tune take the converted MoE at its native k? A held-out curve.

Same model, data and conversion as ``hookmoe demo`` (SmolLM2-135M by default, CMoE E6 S2 K4, the builtin
corpus's ``train`` split for conversion and fine-tuning, 16 x 512 ``heldout`` tokens for evaluation), then
``convert.distill_moe`` for ``--steps`` steps with the held-out KL and perplexities recorded every
``--eval-every`` steps. Optional layer-wise hidden-state distillation (``--hidden-weight``) and layer-local
router calibration before it (``--calibrate-steps``).

    python benchmarks/cmoe_finetune_curve.py --steps 160 --eval-every 40 --out benchmarks/results/ft_curve.json

Writes the JSON (machine, versions, the exact command, the curve).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--calibrate-steps", type=int, default=0, help="layer-local router calibration first (0 = off)")
    ap.add_argument("--calibrate-target", default="auto", choices=["auto", "gain", "norm"])
    ap.add_argument("--calibrate-mse-weight", type=float, default=None, help="default: per shape (auto)")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--train", default="moe", choices=["moe", "experts", "routers"])
    ap.add_argument("--finetune-blocks", type=int, default=1024, help="distinct 256-token training blocks")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hookmoe import cmoe as cv
    from hookmoe.kernels.cpu_gemm import describe
    from hookmoe.data import make_blocks
    from hookmoe.demo import locate_model
    from hookmoe.models import load_causal_lm

    t0 = time.perf_counter()
    dense, tok = load_causal_lm(str(locate_model(args.model)), dtype="float32", device="cpu")
    conv = make_blocks(tok, "builtin", 8, 512, split="train", seed=args.seed)
    train = make_blocks(tok, "builtin", args.finetune_blocks, 256, split="train", seed=args.seed + 4)
    held = make_blocks(tok, "builtin", args.eval_blocks, 512, split="heldout", seed=args.seed)
    moe = cv.convert_dense(dense, tok, conv, num_experts=args.experts, num_shared=args.shared, top_k=args.top_k,
                           seed=args.seed, progress=False)
    print(f"loaded + converted in {time.perf_counter() - t0:.1f} s", flush=True)
    calibration = None
    if args.calibrate_steps:
        router_blocks = make_blocks(tok, "builtin", 16, 512, split="train", seed=args.seed + 1)  # as the demo
        calibration = cv.calibrate_routers(moe, dense, router_blocks, steps=args.calibrate_steps, eval_blocks=held,
                                           rank_target=args.calibrate_target, mse_weight=args.calibrate_mse_weight,
                                           seed=args.seed, progress=True)
        print(f"router calibration: {calibration['before']} -> {calibration['after']} "
              f"({calibration['train_seconds']} s)", flush=True)
    metrics = cv.distill_moe(moe, dense, train, steps=args.steps, lr=args.lr, batch_size=args.batch,
                             train=args.train, hidden_weight=args.hidden_weight, eval_blocks=held,
                             eval_every=args.eval_every, seed=args.seed, progress=True)
    for p in metrics.get("eval_curve", []):
        print(f"step {p['step']:5d}  {p['seconds']:8.1f} s  KL {p['kl']:.4f}  ppl dense {p['ppl_dense']:.2f}  "
              f"MoE {p['ppl_moe']:.2f} ({100 * (p['ppl_moe'] / p['ppl_dense'] - 1):+.1f} %)", flush=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "before": metrics.get("before"),
        "router_calibration": calibration,
        "metrics": metrics,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "cpu_gemm": describe()},
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
