"""Shared helpers of the vLLM tests: tiny checkpoints vLLM's CPU backend runs, vLLM runs, hookmoe references."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

# vLLM's CPU attention supports head sizes 32, 64, ...: tiny models with 2 heads of 32 (hidden 64)
TINY_VLLM = {"num_attention_heads": 2, "num_key_value_heads": 1}
TINY_VLLM_ARCH = {"qwen3_moe": {"head_dim": 32}, "mixtral": {"head_dim": 32}}
PROMPTS = [[87, 107, 104, 35, 102, 100, 115, 35, 105, 114, 33, 72, 117],
           [50, 60, 70, 80, 90, 100, 110, 120, 130]]
NEW_TOKENS = 6
LOGPROBS = 5
# float32 everywhere; vLLM's kernels (fused MoE, CPU attention, RMSNorm) sum in other orders than PyTorch's,
# measured max |Δ logprob| ≈ 1e-5 on these models; 1e-3 is 100x that and still 20x below the smallest
# logprob change a plan or a Hook makes here (asserted in each test)
LOGPROB_TOL = 1e-3


def tiny_mm(arch: str, seed: int = 0):
    from hookmoe.models import MoEModel, build_tiny, tiny_tokenizer

    kw = dict(TINY_VLLM, **TINY_VLLM_ARCH.get(arch, {}))
    return MoEModel(build_tiny(arch, seed=seed, **kw), tiny_tokenizer(), source=f"tiny:{arch}")


def make_hook(mm, layers, directory: Path, plan: str, seed: int = 1) -> Path:
    """A Hook with random non-zero weights (init 'paper': linear2 != 0, r = 0.5), saved and removed from mm."""
    from hookmoe.hook import insert_hooks, remove_hooks

    hs = insert_hooks(mm, layers, init="paper", seed=seed)
    with torch.no_grad():
        for h in hs.hooks.values():
            h.linear2.weight.mul_(4.0)  # a clearly visible effect on the tiny model
    hs.save_pretrained(directory, plan=plan)
    remove_hooks(mm)
    return directory


def run_vllm(path, prompts=PROMPTS, new_tokens=NEW_TOKENS, **llm_kw):
    """Greedy generation in vLLM (CPU, float32, eager) -> dict with tokens, top-k logprobs, model facts."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0,
              skip_tokenizer_init=True, **llm_kw)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0, max_tokens=new_tokens, logprobs=LOGPROBS, detokenize=False,
                                           ignore_eos=True),
                            use_tqdm=False)
        facts = llm.apply_model(_model_facts)[0]
    finally:
        del llm
        gc.collect()
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "logprobs": [[{int(t): float(lp.logprob) for t, lp in step.items()} for step in o.outputs[0].logprobs]
                        for o in outs]}
    res.update(facts)
    return res


def _model_facts(model) -> dict:
    import re

    ks = {}
    for name, m in model.named_modules():
        router = getattr(m, "router", None)
        if router is not None and hasattr(router, "top_k"):
            hit = re.search(r"layers\.(\d+)\.", name)
            if hit:
                ks[int(hit.group(1))] = int(router.top_k)
    hooks = sorted(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n, _ in model.named_modules()
                   if n.endswith("hookmoe_hook"))
    return {"model_class": type(model).__name__, "k_per_layer": ks, "hook_layers": hooks}


def reference_logprobs(mm, prompts, generated):
    """hookmoe's log-softmax at each generated position, teacher-forced on vLLM's tokens (mm as loaded/patched)."""
    out = []
    with torch.no_grad():
        for p, g in zip(prompts, generated):
            ids = torch.tensor([list(p) + list(g)])
            logits = mm.model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, -1)[len(p) - 1: len(p) - 1 + len(g)]
            out.append(lp)
    return out


def hookmoe_greedy(mm, prompts, new_tokens=NEW_TOKENS):
    """``hookmoe generate``'s greedy tokens (each prompt alone, no padding)."""
    res = []
    with torch.no_grad():
        for p in prompts:
            g = mm.model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            res.append(g[0, len(p):].tolist())  # may stop early at eos (vLLM runs with ignore_eos)
    return res


def max_logprob_diff(vllm_res, ref) -> float:
    """Largest |vLLM top-k logprob - hookmoe logprob| over every listed token of every step."""
    worst = 0.0
    for steps, lp in zip(vllm_res["logprobs"], ref):
        for j, d in enumerate(steps):
            for t, v in d.items():
                worst = max(worst, abs(v - float(lp[j, t])))
    return worst


def min_change(ref_a, ref_b, generated) -> float:
    """Largest |Δ logprob| of the generated tokens between two references (how much a plan/Hook changes)."""
    worst = 0.0
    for a, b, g in zip(ref_a, ref_b, generated):
        idx = torch.tensor(g)
        pos = torch.arange(len(g))
        worst = max(worst, float((a[pos, idx] - b[pos, idx]).abs().max()))
    return worst
