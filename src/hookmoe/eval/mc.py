"""Multiple-choice accuracy: each choice ranked by the log-likelihood of ``context + continuation`` (``acc``) and per
character (``acc_norm``), as lm-eval does."""

from __future__ import annotations

from hookmoe import progress as progress_bars

import time
from typing import Any, Sequence

import torch
from hookmoe.errors import EvalError
from hookmoe.eval.scope import finish_result
from hookmoe.routing.patch import eval_mode, routing_scope



def _encode(tok, text: str) -> list[int]:
    return list(map(int, tok(text, add_special_tokens=False)["input_ids"]))


def mc_requests(mm, items: Sequence, *, max_length: int | None = None) -> list[tuple[int, int, list[int], int, int]]:
    """(item, choice, token ids, number of continuation tokens, characters of the choice) per choice."""
    from hookmoe.data.blocks import needs_bos

    tok = mm.tokenizer
    if tok is None:
        raise EvalError("multiple-choice evaluation needs a tokenizer, and this model has none")
    bos = [int(tok.bos_token_id)] if needs_bos(tok) else []
    limit = int(max_length or min(int(getattr(mm.config, "max_position_embeddings", 2048) or 2048), 4096))
    reqs = []
    for ii, item in enumerate(items):
        ctx = item.context
        for ci in range(len(item.choices)):
            cont = item.continuation(ci)
            # lm-eval's split: move trailing context spaces into the continuation
            n_sp = len(ctx) - len(ctx.rstrip())
            c_text, k_text = (ctx[:-n_sp], ctx[-n_sp:] + cont) if n_sp else (ctx, cont)
            n_ctx = len(_encode(tok, c_text))
            whole = _encode(tok, c_text + k_text)
            cont_ids = whole[n_ctx:]
            ctx_ids = whole[:n_ctx]
            if not cont_ids:
                cont_ids = _encode(tok, k_text)
                ctx_ids = _encode(tok, c_text)
            if not cont_ids:
                raise EvalError(f"choice {ci} of item {ii} tokenises to nothing")
            ids = bos + ctx_ids + cont_ids
            if len(ids) > limit:
                ids = ids[-limit:]
            n_cont = min(len(cont_ids), len(ids) - 1)
            reqs.append((ii, ci, ids, n_cont, max(1, len(item.choices[ci]))))  # lm-eval: len(choice)
    return reqs


def loglikelihoods(mm, reqs: Sequence[tuple], *, batch_size: int = 16, progress: bool = False,
                   description: str = "multiple choice") -> list[float]:
    """Summed log-probability of each request's continuation tokens (batched, longest first)."""
    tok = mm.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][2]))
    out = [0.0] * len(reqs)
    dev = mm.device
    n_batches = -(-len(order) // batch_size)
    with eval_mode(mm.model), progress_bars.bar(progress, description, n_batches) as advance:
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            width = max(len(reqs[i][2]) for i in idx)
            ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = reqs[i][2]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            logits = mm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logp = logits.float().log_softmax(-1)
            for row, i in enumerate(idx):
                seq, n_cont = reqs[i][2], reqs[i][3]
                L = len(seq)
                target = ids[row, L - n_cont:L]
                lp = logp[row, L - n_cont - 1:L - 1].gather(-1, target.unsqueeze(-1)).sum()
                out[i] = float(lp)
            advance(1)
    return out


def multiple_choice(mm, items: Sequence, *, plan: Any = None, batch_size: int = 16, progress: bool = False,
                    max_length: int | None = None, description: str | None = None) -> dict:
    """Accuracy of ranking choices by log-likelihood (``acc``) and per character (``acc_norm``)."""
    if not items:
        raise EvalError("no multiple-choice items to evaluate")
    t0 = time.perf_counter()
    reqs = mc_requests(mm, items, max_length=max_length)
    with routing_scope(mm, plan) as patch:
        lls = loglikelihoods(mm, reqs, batch_size=batch_size, progress=progress,
                             description=description or f"mc [{patch.plan.describe()}]")
        per_item: dict[int, list[tuple[float, float]]] = {}
        for (ii, ci, _, _, n_chars), ll in zip(reqs, lls):
            per_item.setdefault(ii, []).append((ll, ll / n_chars))
        correct = correct_norm = 0
        for ii, item in enumerate(items):
            scores = per_item[ii]
            best = max(range(len(scores)), key=lambda c: (scores[c][0], -c))
            best_n = max(range(len(scores)), key=lambda c: (scores[c][1], -c))
            correct += int(best == item.label)
            correct_norm += int(best_n == item.label)
        n = len(items)
        res = {"metric": "mc", "acc": correct / n, "acc_norm": correct_norm / n, "items": n,
               "requests": len(reqs), "tokens": sum(len(r[2]) for r in reqs)}
        res["score"] = res["acc"]
        res["higher_is_better"] = True
        out = finish_result(mm, patch, res)
    out["time_s"] = time.perf_counter() - t0
    return out


def load_mc_source(src: str, *, n_items: int | None = None, seed: int = 0) -> list:
    """Items from ``builtin-mc[:N]`` (offline sentence completion), a JSONL / JSON list or a BIG-bench task."""
    from hookmoe import data

    s = str(src).strip()
    if s == "builtin-mc" or s.startswith("builtin-mc:"):
        n = n_items
        if ":" in s:
            try:
                n = int(s.split(":", 1)[1])
            except ValueError:
                raise EvalError(f"builtin-mc takes a number of items, e.g. builtin-mc:64, got '{s}'") from None
        return data.builtin_mc(n or 64, seed)
    items = data.load_mc(s)
    if n_items is not None and n_items < len(items):
        items = items[:n_items]
    return items
