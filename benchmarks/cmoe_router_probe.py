"""How close can a router get to its oracle? Router calibration variants on the demo's CMoE conversion.

SmolLM2-135M converted as in ``hookmoe demo`` (builtin corpus, ``train`` split for conversion and calibration,
``heldout`` split for evaluation), at any shape ``--shape E,S,K``. Prints held-out KL / perplexity
training-free, then either with a non-causal oracle router (``--oracle``: every token keeps the K routed
experts with the largest outputs |y_e|^2) or after layer-local router calibration
(``convert.calibrate_routers``) with the chosen target and loss. Two variants not in the library:
``--mlp-rank R`` adds a rank-R SiLU MLP term to every router's scores; ``--bce`` replaces the ranking
cross-entropy by a per-expert binary cross-entropy on top-K membership (token-centred logits).

    python benchmarks/cmoe_router_probe.py --shape 184,8,136 --oracle --eval-blocks 8
    python benchmarks/cmoe_router_probe.py --shape 184,8,136 --target norm --mse 0 --steps 300 --eval-blocks 8

Results of session 7 are in benchmarks/results/cmoe_probe.log.
"""

from __future__ import annotations

import argparse
import time
import types

import torch
import torch.nn.functional as F
from torch import nn


def install_norm_oracle(moe) -> None:
    """Every router returns the top-k experts by |y_e|^2, computed from the experts themselves (the
    calibration target ``convert.expert_gains(..., "norm")``)."""
    from hookmoe.cmoe import expert_gains

    for block in moe.moe_blocks():
        def forward(self, x, block=block):
            x = x.reshape(-1, x.shape[-1])
            scores = expert_gains(block, x, None, "norm")
            index = scores.topk(self.top_k, dim=-1).indices
            return scores, torch.ones(index.shape, dtype=x.dtype), index

        block.gate.forward = types.MethodType(forward, block.gate)


def add_mlp_term(moe, rank: int) -> None:
    """scores += W_out silu(W_in x) (W_out zero at start), trained with the other router parameters."""
    for block in moe.moe_blocks():
        g = block.gate
        g.mlp_in = nn.Parameter(torch.randn(rank, g.hidden_dim) / g.hidden_dim ** 0.5)
        g.mlp_out = nn.Parameter(torch.zeros(g.num_experts, rank))

        def scores(self, x, base=g.scores):
            x = x.reshape(-1, self.hidden_dim)
            return base(x) + F.linear(F.silu(F.linear(x, self.mlp_in)), self.mlp_out).float()

        g.scores = types.MethodType(scores, g)


def bce_local_loss(cmoe_model, data, token_idx, rank_weight, mse_weight):
    """Per-expert BCE against membership of the top-k by target score (replaces convert._local_loss)."""
    total = 0.0
    for block, d in zip(cmoe_model.moe_blocks(), data):
        logits, _, _ = block.gate(d["x"][token_idx])
        best = d["g"][token_idx].topk(block.gate.top_k, dim=-1).indices
        labels = torch.zeros_like(logits).scatter(1, best, 1.0)
        total = total + F.binary_cross_entropy_with_logits(logits - logits.mean(-1, keepdim=True), labels)
    return total / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="184,8,136", help="E,S,K")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--target", default="gain", choices=["gain", "norm"])
    ap.add_argument("--rank-weight", type=float, default=1.0)
    ap.add_argument("--mse", type=float, default=1.0, help="weight of the routed-output MSE term")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--mlp-rank", type=int, default=0)
    ap.add_argument("--bce", action="store_true")
    args = ap.parse_args()

    from hookmoe import cmoe as cv
    from hookmoe.data import make_blocks
    from hookmoe.demo import locate_model
    from hookmoe.models import load_causal_lm

    t0 = time.time()
    dense, tok = load_causal_lm(str(locate_model("smollm2")), dtype="float32", device="cpu")
    conv = make_blocks(tok, "builtin", 8, 512, split="train", seed=0)
    held = make_blocks(tok, "builtin", args.eval_blocks, 512, split="heldout", seed=0)
    e, s, k = map(int, args.shape.split(","))
    moe = cv.convert_dense(dense, tok, conv, num_experts=e, num_shared=s, top_k=k, seed=0, progress=False)
    print(f"converted E{e} S{s} K{k} in {time.time() - t0:.1f} s", flush=True)
    t = time.time()
    print("training-free", cv.heldout_kl(moe, dense, held), f"({time.time() - t:.1f} s)", flush=True)
    if args.oracle:
        install_norm_oracle(moe)
        print("norm oracle", cv.heldout_kl(moe, dense, held), flush=True)
        return
    if args.mlp_rank:
        add_mlp_term(moe, args.mlp_rank)
    if args.bce:
        cv._local_loss = bce_local_loss
    router_blocks = make_blocks(tok, "builtin", 16, 512, split="train", seed=1)  # as the demo
    m = cv.calibrate_routers(moe, dense, router_blocks, steps=args.steps, lr=args.lr, rank_weight=args.rank_weight,
                             mse_weight=args.mse, rank_target=args.target, eval_blocks=held, progress=False)
    print(f"calibrated ({args.steps} steps, {m['train_seconds']} s, gather {m['gather_seconds']} s)", m["after"],
          flush=True)


if __name__ == "__main__":
    main()
