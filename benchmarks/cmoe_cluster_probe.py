"""Can a token-clustered neuron selection replace expert partitions? A bound on SmolLM2-135M.

Every FFN keeps, for each token, the ``--keep`` fraction of its neurons chosen for the token's *cluster*:
tokens are clustered (k-means on the unit-normalised FFN input, 16 x 512 calibration tokens of the builtin
corpus's ``train`` split) and each cluster keeps the neurons with the largest mean contribution
``|h_j| x |W_down[:, j]|`` over its tokens. The cluster of a new token is its nearest centroid — a linear router,
so this is realisable (top-1 routing over overlapping experts of ``keep`` x FFN neurons). ``--clusters 1`` is
static pruning. Held-out perplexity on 8 x 512 ``heldout`` tokens; all neurons are computed and masked (a quality
bound, not a speed path).

    python benchmarks/cmoe_cluster_probe.py --keep 0.75 --clusters 1,8,64
"""

from __future__ import annotations

import argparse
import time
import types
from types import SimpleNamespace

import torch


def kmeans(x: torch.Tensor, n: int, iters: int = 15, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=gen)[:n]].clone()
    for _ in range(iters):
        a = (x @ c.T - 0.5 * (c * c).sum(1)).argmax(1)
        for j in range(n):
            m = a == j
            if m.any():
                c[j] = x[m].mean(0)
    return c, (x @ c.T - 0.5 * (c * c).sum(1)).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=float, default=0.75)
    ap.add_argument("--clusters", default="1,8,64")
    args = ap.parse_args()

    from hookmoe.data import make_blocks
    from hookmoe.demo import locate_model
    from hookmoe.eval import perplexity_core
    from hookmoe.models import load_causal_lm

    dense, tok = load_causal_lm(str(locate_model("smollm2")), dtype="float32", device="cpu")
    calib = make_blocks(tok, "builtin", 16, 512, split="train", seed=0)
    held = make_blocks(tok, "builtin", 8, 512, split="heldout", seed=0)
    layers = dense.model.layers
    xs, contrib = [[] for _ in layers], [[] for _ in layers]

    def grab(i):
        def hook(mod, a):
            x = a[0].reshape(-1, a[0].shape[-1]).detach()
            xs[i].append(x)
            h = mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)
            contrib[i].append(h.detach().abs() * mod.down_proj.weight.norm(dim=0))
        return hook

    handles = [layer.mlp.register_forward_pre_hook(grab(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for s in range(0, calib.shape[0], 4):
            dense(input_ids=calib[s:s + 4], use_cache=False)
    for h in handles:
        h.remove()
    xs = [torch.cat(v) for v in xs]
    contrib = [torch.cat(v) for v in contrib]
    view = SimpleNamespace(model=dense, tokenizer=tok, config=dense.config, device=torch.device("cpu"))

    def ppl() -> float:
        return perplexity_core(view, held, batch_size=4, progress=False)["ppl"]

    print(f"dense {ppl():.3f}", flush=True)
    for n in [int(v) for v in args.clusters.split(",")]:
        t0 = time.perf_counter()
        for i, layer in enumerate(layers):
            xn = xs[i] / xs[i].norm(dim=1, keepdim=True)
            cent, assign = kmeans(xn, n) if n > 1 else (xn[:1] * 0, torch.zeros(xn.shape[0], dtype=torch.long))
            keep = int(args.keep * contrib[i].shape[1])
            masks = torch.zeros(n, contrib[i].shape[1])
            for j in range(n):
                m = assign == j
                imp = contrib[i][m].mean(0) if m.any() else contrib[i].mean(0)
                masks[j, imp.topk(keep).indices] = 1.0

            def forward(self, x, cent=cent, masks=masks):
                flat = x.reshape(-1, x.shape[-1])
                a = ((flat / flat.norm(dim=1, keepdim=True)) @ cent.T - 0.5 * (cent * cent).sum(1)).argmax(1)
                h = self.act_fn(self.gate_proj(flat)) * self.up_proj(flat) * masks[a]
                return self.down_proj(h).reshape(x.shape)

            layer.mlp.forward = types.MethodType(forward, layer.mlp)
        print(f"keep {args.keep} clusters {n}: ppl {ppl():.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
