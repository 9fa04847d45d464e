"""A frontier on a small *trained* MoE with shared experts (issue 19: evidence beyond the demo model).

Random-weight ``tiny:<arch>`` models carry no signal for allocators or compensators (every method lands within
±0.3 % of native: ``frontier_tiny_random_*``). This script first trains a small MoE of the architecture from
scratch on the offline corpus (train split, every parameter, plain LM loss), saves it as a model directory, then
runs ``hookmoe frontier`` on it (held-out split).

    PYTHONPATH=src python benchmarks/frontier_tiny_trained.py qwen2_moe /tmp/tiny_trained \
        --train-steps 600 --acts 3.0,3.5 --out benchmarks/results/frontier_tiny_trained_qwen2_moe
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import hookmoe
from hookmoe.data.blocks import make_blocks
from hookmoe.files import write_json

# a larger-than-tiny shape (still seconds per step on 2 cores) so the experts can specialise
SHAPES = {
    "qwen2_moe": dict(hidden_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      num_experts=8, num_experts_per_tok=4, num_hidden_layers=4, intermediate_size=256),
    "deepseek_v2": dict(hidden_size=128, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=4, num_hidden_layers=4, intermediate_size=256),
}


def train(arch: str, out: Path, steps: int, lr: float, batch: int, seq_len: int, seed: int) -> dict:
    """Train every parameter of a fresh ``arch`` MoE with LM loss; save it (model + tokenizer) to ``out``."""
    torch.manual_seed(seed)
    mm = hookmoe.load(f"tiny:{arch}", seed=seed, device="cpu", dtype="float32")
    if SHAPES.get(arch):
        from hookmoe.models.tiny import build_tiny

        mm = hookmoe.load(build_tiny(arch, seed=seed, **SHAPES[arch]), tokenizer=mm.tokenizer)
    model = mm.model.train()
    blocks = make_blocks(mm.tokenizer, "builtin", steps * batch // 4, seq_len, split="train", seed=seed,
                         progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        ids = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for grp in opt.param_groups:  # linear warm-up then cosine
            grp["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.1416)).item())
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    mm.tokenizer.save_pretrained(out)
    return {"arch": arch, "steps": steps, "lr": lr, "batch": batch, "seq_len": seq_len, "seed": seed,
            "shape": SHAPES.get(arch), "params": sum(p.numel() for p in model.parameters()),
            "final_loss": sum(losses[-20:]) / 20, "train_time_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arch")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--acts", default="3.0,3.5")
    ap.add_argument("--steps", type=int, default=60, help="compensator training steps")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    record = train(a.arch, a.model_dir, a.train_steps, a.lr, a.batch, a.seq_len, a.seed)
    print(json.dumps(record), flush=True)
    cmd = [sys.executable, "-m", "hookmoe.cli", "frontier", str(a.model_dir), "--calib", "builtin", "--data",
           "builtin", "--acts", a.acts, "--compensators", "none,hook,router,output,hook+router", "--steps",
           str(a.steps), "--n-train", "64", "--n-eval", "32", "--out", str(a.out), "--device", "cpu"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads((a.out / "frontier.json").read_text())
    res["trained_model"] = record
    res["command"] = "PYTHONPATH=src python benchmarks/frontier_tiny_trained.py " + " ".join(sys.argv[1:])
    write_json(a.out / "frontier.json", res)


if __name__ == "__main__":
    main()
