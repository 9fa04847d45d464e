"""Perplexity over token blocks, with sliding windows and BOS handling, under a routing plan."""

from __future__ import annotations

from hookmoe import progress as progress_bars

import math
import time
from typing import Any, Callable

import torch
from torch.nn import functional as F
from hookmoe.errors import EvalError
from hookmoe.eval.scope import finish_result
from hookmoe.routing.patch import eval_mode, routing_scope



def _bos_prefixed(mm, blocks: torch.Tensor) -> bool:
    tok = mm.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if bos is None:
        bos = getattr(mm.config, "bos_token_id", None)
    return bos is not None and blocks.shape[1] > 1 and bool((blocks[:, 0] == int(bos)).all())


def _spans(n_stream: int, ctx: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """Sliding windows over a stream: (begin, end, first scored position)."""
    spans, begin, prev_end = [], 0, 0
    while prev_end < n_stream:
        end = min(begin + ctx, n_stream)
        first = max(prev_end, begin + (0 if bos else 1))
        spans.append((begin, end, first))
        prev_end = end
        begin += stride
    return spans


def _sum_nll(logits: torch.Tensor, ids: torch.Tensor, first_q: int) -> tuple[torch.Tensor, int]:
    """Summed NLL of ``ids[:, first_q:]`` given ``logits`` over ``ids`` (positions predict the next token)."""
    pred = logits[:, first_q - 1:-1].float()
    target = ids[:, first_q:]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
    return nll.double(), int(target.numel())


def default_forward(mm) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda batch_index, ids: mm.model(input_ids=ids, use_cache=False).logits


def _check_blocks(blocks: Any) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] == 0:
        raise EvalError("evaluation blocks must be a non-empty 2-D tensor of token ids [n_blocks, block_len]")
    if blocks.shape[1] < 2:
        raise EvalError("evaluation blocks need at least 2 tokens each")
    return blocks.long()


def perplexity_core(mm, blocks: torch.Tensor, *, batch_size: int = 8, window: int | None = None,
                    stride: int | None = None, progress: bool = False, description: str = "perplexity",
                    forward: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Perplexity of ``blocks`` under the routing currently in force (no plan handling, no Act)."""
    blocks = _check_blocks(blocks)
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    n, t = blocks.shape
    bos = _bos_prefixed(mm, blocks)
    stream_len = t - 1 if bos else t
    window = t if window is None else int(window)
    if window < 2 + int(bos):
        raise EvalError(f"window must be at least {2 + int(bos)} tokens, got {window}")
    ctx = window - int(bos)
    stride = ctx if stride is None else int(stride)
    if not 1 <= stride <= ctx:
        raise EvalError(f"stride must be between 1 and the window's {ctx} text tokens, got {stride}")
    spans = _spans(stream_len, ctx, stride, bos)
    if forward is None:
        forward = default_forward(mm)
    elif len(spans) != 1:
        raise EvalError("a custom forward (layer caching) needs whole-block windows (no stride)")
    n_batches = -(-n // batch_size)
    total_nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    dev = mm.device
    with eval_mode(mm.model), progress_bars.bar(progress, description, n_batches * len(spans)) as advance:
        for bi in range(n_batches):
            batch = blocks[bi * batch_size:(bi + 1) * batch_size].to(dev)
            stream = batch[:, 1:] if bos else batch
            for begin, end, first in spans:
                ids = stream[:, begin:end]
                if bos:
                    ids = torch.cat([batch[:, :1], ids], dim=1)
                logits = forward(bi, ids)
                s, c = _sum_nll(logits, ids, first - begin + int(bos))
                total_nll += s.cpu()
                tokens += c
                advance(1)
    nll = float(total_nll / max(1, tokens))
    return {"ppl": math.exp(min(nll, 700.0)), "nll": nll, "tokens": tokens, "blocks": n, "block_len": t,
            "window": window, "stride": stride, "bos": bos}


def perplexity(mm, blocks: torch.Tensor, *, plan: Any = None, batch_size: int = 8, window: int | None = None,
               stride: int | None = None, progress: bool = False, description: str | None = None) -> dict:
    """Perplexity of ``blocks`` (``[N, T]`` token ids) under ``plan``; returns ppl, nll, tokens, Act, params.

    ``window``/``stride``: score each block with sliding windows of ``window`` tokens moved by ``stride``
    (each token scored once, with up to ``window - 1`` tokens of context); default one window per block.
    """
    t0 = time.perf_counter()
    with routing_scope(mm, plan) as patch:
        core = perplexity_core(mm, blocks, batch_size=batch_size, window=window, stride=stride, progress=progress,
                               description=description or f"ppl [{patch.plan.describe()}]")
        out = finish_result(mm, patch, {"metric": "ppl", "score": core["ppl"], "higher_is_better": False, **core})
    out["time_s"] = time.perf_counter() - t0
    return out
