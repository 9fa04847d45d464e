"""Evaluation: perplexity, multiple-choice accuracy and the lm-evaluation-harness bridge.

Every evaluation runs on one loaded :class:`~hookmoe.models.MoEModel` under a routing plan (applied and
removed around the evaluation, so several plans are scored without re-loading the model; ``plan=None``
means the plan already in force, else ``native``) and with whatever Hooks are attached. Every result is a
JSON-able dict with the same core fields::

    metric            "ppl" | "mc" | "lm-eval"
    score             the headline number (perplexity, accuracy, or the mean of the task scores)
    higher_is_better  False for perplexity
    plan / rules      the plan (its description and JSON) and the rule in force in every MoE layer
    act / act_per_layer   activated routed experts per token, overall and per MoE layer (measured)
    params            accounting.param_counts with the measured per-layer Act (active vs total)
    hook              the hooked layers (or None)

plus the metric's own fields (``ppl``, ``nll``, ``tokens``; ``acc``, ``acc_norm``, ``items``; ``tasks``).

Perplexity (:func:`perplexity`) scores token blocks from :func:`hookmoe.data.make_blocks` (non-overlapping
windows; a block that starts with BOS keeps it as unscored context, and with ``window``/``stride`` every
sliding window is re-prefixed with BOS, as Gemma needs). Multiple choice (:func:`multiple_choice`) ranks
the choices by the log-likelihood of ``context + continuation`` (``acc``) and by that log-likelihood per
character of the choice text (``acc_norm``, exactly as lm-eval does). :func:`lm_eval_tasks` wraps the loaded
model in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate`` (optional extra ``hookmoe[eval]``).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.nn import functional as F

from .errors import UserError
from .routing import Dynamic, Plan, RoutingStats, apply_plan

METRICS = ("ppl", "mc", "lm-eval")

#: lm-eval presets of the paper (task, few-shot).
PRESETS: dict[str, list[tuple[str, int]]] = {
    "paper-general": [(t, 0) for t in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa",
                                       "rte", "winogrande")],
    "paper-math": [("gsm8k", 5), ("minerva_math", 4)],
}


class EvalError(UserError):
    """An evaluation cannot run with the given input."""


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (on stderr) when ``enabled``; yields ``advance(n)``."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


# --------------------------------------------------------------------------------------------------
# Plans in force during an evaluation
# --------------------------------------------------------------------------------------------------


def needs_calibration(mm, plan: Any) -> bool:
    """Whether ``plan`` holds a dynamic rule that must be fitted on data first (``naee``, ``entropy:ACT``)."""
    if plan is None:
        return False
    rules = Plan.parse(plan).resolve(mm)
    return any(isinstance(r, Dynamic) and not r.calibrated for r in rules.values())


def _has_dynamic(mm, plan: Any) -> bool:
    return any(isinstance(r, Dynamic) for r in Plan.parse(plan).resolve(mm).values())


@contextlib.contextmanager
def routing_scope(mm, plan: Any = None):
    """Apply ``plan`` for the duration of the block and yield its patch (with fresh routing stats).

    ``plan=None`` keeps the plan in force (its stats are swapped out and restored), or applies ``native``
    when none is. A plan that was in force before is re-applied afterwards.
    """
    cur = getattr(mm, "_routing_patch", None)
    active = cur is not None and getattr(cur, "_active", False)
    if plan is None and active and getattr(cur, "_count", True):
        saved = cur.stats
        cur.stats = RoutingStats(mm.moe_layer_indices, mm.num_experts)
        try:
            yield cur
        finally:
            cur.stats = saved
        return
    prev_plan = cur.plan if active else None
    patch = apply_plan(mm, plan if plan is not None else (prev_plan or "native"))
    try:
        yield patch
    finally:
        patch.remove()
        if prev_plan is not None:
            restored = apply_plan(mm, prev_plan)
            if getattr(mm, "active_plan", None) is cur:
                mm.active_plan = restored


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def hook_info(mm) -> dict | None:
    """The attached Hooks (layers, params) or None."""
    try:
        from .hook import get_hooks
    except ImportError:  # pragma: no cover - hook.py ships with the package
        return None
    hs = get_hooks(mm)
    if hs is None or not any(getattr(h, "enabled", True) for h in hs.hooks.values()):
        return None
    info = {"layers": hs.layers, "params": hs.num_params()}
    src = hs.manifest.get("source") or hs.manifest.get("directory") if hs.manifest else None
    if src:
        info["source"] = src
    return info


def hook_signature(mm) -> str:
    """Identifies the attached Hooks and their current weights (for memoising scores)."""
    try:
        from .hook import get_hooks
    except ImportError:  # pragma: no cover
        return "none"
    hs = get_hooks(mm)
    if hs is None:
        return "none"
    with torch.no_grad():
        s = sum(float(p.detach().double().abs().sum()) for p in hs.parameters())
    return f"{id(hs)}:{hs.layers}:{s:.12g}"


def finish_result(mm, patch, result: dict, *, act_per_layer: dict[int, float] | None = None) -> dict:
    """Add plan, Act, params and hook fields to a metric result."""
    from .accounting import param_counts

    per = act_per_layer if act_per_layer is not None else patch.stats.act_per_layer()
    per = {int(i): float(a) for i, a in sorted(per.items())}
    act = sum(per.values()) / len(per) if per else float("nan")
    params = param_counts(mm, per or None)
    hook = hook_info(mm)
    idle = _idle_hook_params(mm) if hook is None else 0
    if idle:  # Hooks inserted but disabled (or unused) take no part in this result
        params = {k: (v - idle if k in ("total", "active") else v) for k, v in params.items()}
    out = dict(result)
    out.update({
        "plan": patch.plan.describe(),
        "plan_json": patch.plan.to_dict(),
        "rules": {str(i): r for i, r in patch.per_layer().items()},
        "act": act,
        "act_per_layer": {str(i): a for i, a in per.items()},
        "native_top_k": mm.native_top_k,
        "params": params,
        "hook": hook,
    })
    return out


def _idle_hook_params(mm) -> int:
    try:
        from .hook import get_hooks
    except ImportError:  # pragma: no cover
        return 0
    hs = get_hooks(mm)
    return hs.num_params() if hs is not None else 0


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


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
    with eval_mode(mm.model), progress_bar(progress, description, n_batches * len(spans)) as advance:
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


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------


def _encode(tok, text: str) -> list[int]:
    return list(map(int, tok(text, add_special_tokens=False)["input_ids"]))


def mc_requests(mm, items: Sequence, *, max_length: int | None = None) -> list[tuple[int, int, list[int], int, int]]:
    """(item, choice, token ids, number of continuation tokens, characters of the choice) per choice."""
    from .data import needs_bos

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
    with eval_mode(mm.model), progress_bar(progress, description, n_batches) as advance:
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
    from . import data

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


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge
# --------------------------------------------------------------------------------------------------


def parse_tasks(spec: str | Sequence[str], num_fewshot: int | None = None) -> list[tuple[str, int | None]]:
    """Task names (comma-separated), presets (``paper-general``, ``paper-math``) and ``name:SHOTS``."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str, int | None]] = []
    for p in (x.strip() for x in parts):
        if not p:
            continue
        if p in PRESETS:
            out.extend((t, num_fewshot if num_fewshot is not None else s) for t, s in PRESETS[p])
            continue
        name, _, shots = p.partition(":")
        if shots:
            try:
                k = int(shots)
            except ValueError:
                raise EvalError(f"few-shot count must be a whole number in '{p}' (use task:SHOTS)") from None
            out.append((name, k))
        else:
            out.append((name, num_fewshot))
    if not out:
        raise EvalError("no lm-eval tasks given (e.g. --tasks paper-general or --tasks arc_easy,boolq)")
    return out


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM; fails early when its deps are missing)
    except ImportError:
        raise EvalError("lm-eval tasks need lm-evaluation-harness: run `pip install hookmoe[eval]` "
                        "(or `pip install lm-eval`)") from None
    return lm_eval


_TASK_MANAGERS: dict = {}


def task_manager(include_path: Any = None, needed: Iterable[str] = (), include_defaults: bool | None = None):
    """A cached lm-eval TaskManager; with local tasks only, lm-eval's own task tree is not scanned."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path:
        paths = [str(Path(p).expanduser()) for p in (include_path if isinstance(include_path, (list, tuple))
                                                     else [include_path])]
        for p in paths:
            if not Path(p).exists():
                raise EvalError(f"lm-eval task folder not found: {p}")
    needed = list(needed)
    tries = [include_defaults] if include_defaults is not None else ([False, True] if paths else [True])
    tm = None
    for defaults in tries:
        key = (tuple(paths or ()), defaults)
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(include_path=paths, include_defaults=defaults)
        tm = _TASK_MANAGERS[key]
        known = set(tm.all_tasks)
        if all(n in known for n in needed):
            return tm
    missing = [n for n in needed if n not in set(tm.all_tasks)]
    raise EvalError(f"unknown lm-eval task(s): {', '.join(missing)} (see `lm-eval ls tasks`, or pass a "
                    "folder of task YAMLs with --include-path)")


def _hflm(mm, batch_size: int, max_length: int | None):
    from lm_eval.models.huggingface import HFLM

    from .data import needs_bos

    key = (batch_size, max_length)
    cached = getattr(mm, "_hookmoe_hflm", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if mm.tokenizer is None:
        raise EvalError("lm-eval needs a tokenizer, and this model has none")
    kw: dict[str, Any] = {"batch_size": batch_size, "device": str(mm.device), "add_bos_token": needs_bos(mm.tokenizer)}
    if max_length:
        kw["max_length"] = max_length
    lm = HFLM(pretrained=mm.model, tokenizer=mm.tokenizer, **kw)
    mm._hookmoe_hflm = (key, lm)
    return lm


def _primary_metric(entry: dict) -> tuple[str | None, float | None]:
    metrics = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and "stderr" not in k and k not in ("sample_len",)}
    for want in ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match,none"):
        if want in metrics:
            return want.split(",")[0], float(metrics[want])
    for k, v in metrics.items():
        if k.startswith(("acc", "exact_match", "math_verify")):
            return k.split(",")[0], float(v)
    for k, v in metrics.items():
        return k.split(",")[0], float(v)
    return None, None


def lm_eval_tasks(mm, tasks: str | Sequence[str], *, plan: Any = None, num_fewshot: int | None = None,
                  limit: int | float | None = None, batch_size: int = 8, include_path: Any = None,
                  max_length: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Score the patched model (plan + hooks) on lm-eval tasks through ``lm_eval.simple_evaluate``.

    ``tasks``: names, presets (``paper-general``, ``paper-math``) or ``name:SHOTS``; ``include_path``: a
    folder of local task YAMLs. The score is the mean of each task's primary metric (acc, else
    exact_match); every metric lm-eval reports is kept under ``tasks``.
    """
    lm_eval = _import_lm_eval()
    wanted = parse_tasks(tasks, num_fewshot)
    tm = task_manager(include_path, [t for t, _ in wanted])
    lm = _hflm(mm, batch_size, max_length)
    groups: dict[int | None, list[str]] = {}
    for name, shots in wanted:
        groups.setdefault(shots, []).append(name)
    t0 = time.perf_counter()
    per_task: dict[str, dict] = {}
    with routing_scope(mm, plan) as patch, eval_mode(mm.model):
        for shots, names in groups.items():
            try:
                res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit,
                                              task_manager=tm, log_samples=False, bootstrap_iters=0,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
            except (FileNotFoundError, ConnectionError, OSError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EvalError(f"lm-eval could not load task data for {', '.join(names)}: {msg}") from None
            if res is None:  # non-zero rank in a distributed run
                continue
            results = res.get("results", {})
            for name in names:
                entry = results.get(name)
                if entry is None:
                    continue
                metric, value = _primary_metric(entry)
                per_task[name] = {
                    "metric": metric, "score": value, "num_fewshot": shots,
                    "samples": (res.get("n-samples", {}).get(name) or {}).get("effective"),
                    "metrics": {k: v for k, v in entry.items() if isinstance(v, (int, float))
                                and not isinstance(v, bool)},
                }
        scores = [v["score"] for v in per_task.values() if v["score"] is not None]
        out = finish_result(mm, patch, {
            "metric": "lm-eval", "score": sum(scores) / len(scores) if scores else float("nan"),
            "higher_is_better": True, "tasks": per_task, "limit": limit,
        })
    out["time_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------------
# One entry point for the CLI and the search
# --------------------------------------------------------------------------------------------------


def evaluate(mm, plan: Any = None, *, metric: str = "ppl", blocks: torch.Tensor | None = None,
             items: Sequence | None = None, tasks: Any = None, batch_size: int = 8, progress: bool = False,
             **kw) -> dict:
    """Dispatch to :func:`perplexity`, :func:`multiple_choice` or :func:`lm_eval_tasks`."""
    if metric == "ppl":
        if blocks is None:
            raise EvalError("perplexity needs token blocks")
        return perplexity(mm, blocks, plan=plan, batch_size=batch_size, progress=progress,
                          window=kw.get("window"), stride=kw.get("stride"))
    if metric == "mc":
        if items is None:
            raise EvalError("multiple-choice evaluation needs items")
        return multiple_choice(mm, items, plan=plan, batch_size=batch_size, progress=progress)
    if metric == "lm-eval":
        if tasks is None:
            raise EvalError("lm-eval evaluation needs --tasks")
        return lm_eval_tasks(mm, tasks, plan=plan, batch_size=batch_size, progress=progress,
                             num_fewshot=kw.get("num_fewshot"), limit=kw.get("limit"),
                             include_path=kw.get("include_path"), seed=kw.get("seed", 0))
    raise EvalError(f"unknown metric '{metric}' (use one of: {', '.join(METRICS)})")


def relative_drop(base: float, value: float, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``base``, as a fraction (perplexity: relative increase)."""
    if base == 0 or not math.isfinite(base):
        return float("inf") if value != base else 0.0
    if higher_is_better:
        return (base - value) / abs(base)
    return (value - base) / abs(base)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _eval_blocks(mm, src: str, n_blocks: int, block_len: int, seed: int, split: str, progress: bool):
    from .data import make_blocks

    if mm.tokenizer is None:
        raise EvalError("this model has no tokenizer, so text data cannot be tokenised")
    return make_blocks(mm.tokenizer, src, n_blocks, block_len, seed=seed, split=split, progress=progress)


def register_cli(app) -> None:
    import typer

    from .cli import MODEL_HELP, PLAN_HELP, console, load_model, write_json

    @app.command("eval")
    def eval_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        plan: Optional[list[str]] = typer.Option(None, "--plan", help=PLAN_HELP + " (repeat to compare plans on "
                                                 "one loaded model; default native)"),
        hook: Optional[Path] = typer.Option(None, help="hook artifact directory to attach"),
        data: Optional[str] = typer.Option(None, help="ppl: text source (builtin, c4, math, hf:ID, file or folder); "
                                           "mc: a .jsonl / JSON list / BIG-bench task.json, or builtin-mc[:N]"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval (implied by --tasks)"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks: paper-general, paper-math, or names "
                                            "(comma-separated, name:SHOTS for few-shot)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[float] = typer.Option(None, help="lm-eval: at most this many examples per task"),
        num_fewshot: Optional[int] = typer.Option(None, help="lm-eval: few-shot count for tasks without one"),
        n_blocks: int = typer.Option(16, min=1, help="ppl: number of token blocks"),
        block_len: int = typer.Option(256, min=2, help="ppl: tokens per block"),
        window: Optional[int] = typer.Option(None, help="ppl: sliding-window length (default: the block)"),
        stride: Optional[int] = typer.Option(None, help="ppl: sliding-window stride (default: the window)"),
        split: str = typer.Option("heldout", help="ppl data split: heldout | train | all"),
        n_items: Optional[int] = typer.Option(None, help="mc: use at most this many items"),
        calib: Optional[str] = typer.Option(None, help="text source to calibrate naee / entropy / --act on "
                                            "(train split; default: --data for ppl, builtin otherwise)"),
        calib_blocks: int = typer.Option(8, min=1, help="calibration blocks"),
        act: Optional[float] = typer.Option(None, help="calibrate dynamic plans to this Act (experts per token)"),
        batch_size: int = typer.Option(8, min=1),
        device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"),
        seed: int = typer.Option(0),
        as_json: Optional[Path] = typer.Option(None, "--json", help="write the results here ('-' = stdout only)"),
    ):
        """Perplexity, multiple-choice accuracy or lm-eval scores under one or more routing plans."""
        from . import report
        from .search import calibrate_plan

        if tasks:
            metric = "lm-eval"
        if metric not in METRICS:
            raise EvalError(f"unknown metric '{metric}' (use one of: {', '.join(METRICS)})")
        if metric in ("ppl", "mc") and not data:
            raise EvalError(f"--data is required for --metric {metric}")
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        plans = list(plan or [])
        for p in plans:
            Plan.parse(p)  # syntax errors before the model loads
        mm = load_model(model, hook=hook, device=device, dtype=dtype, seed=seed)
        if not plans:  # a Hook is evaluated under the plan it was trained for
            hs = getattr(mm, "hookset", None)
            hp = hs.plan if hs is not None and hook is not None else None
            plans = [hp] if hp is not None else ["native"]
        for p in plans:
            Plan.parse(p).resolve(mm)  # plans that do not fit this model fail before any data is read
        quiet = as_json is not None and str(as_json) == "-"
        blocks = items = None
        if metric == "ppl":
            blocks = _eval_blocks(mm, data, n_blocks, block_len, seed, split, not quiet)
        elif metric == "mc":
            items = load_mc_source(data, n_items=n_items, seed=seed)
        calib_blocks_t = None
        results = []
        for p in plans:
            concrete: Any = p
            pdesc = p.describe() if isinstance(p, Plan) else str(p)
            note = None
            if needs_calibration(mm, p) or (act is not None and _has_dynamic(mm, p)):
                if calib_blocks_t is None:
                    csrc = calib or (data if metric == "ppl" else "builtin")
                    calib_blocks_t = _eval_blocks(mm, csrc, calib_blocks, block_len, seed, "train", not quiet)
                    csrc_used = csrc
                concrete = calibrate_plan(mm, p, calib_blocks_t, target_act=act, batch_size=batch_size,
                                          progress=not quiet)
                cal = concrete.meta.get("calibration", {})
                note = (f"plan '{pdesc}' calibrated on the train split of {csrc_used} "
                        f"({calib_blocks_t.shape[0]}x{calib_blocks_t.shape[1]} tokens): measured Act "
                        f"{cal.get('measured_act', float('nan')):.3f}")
                if not quiet:
                    console.print(note, style="yellow", markup=False, highlight=False)
            r = evaluate(mm, concrete, metric=metric, blocks=blocks, items=items, tasks=tasks, batch_size=batch_size,
                         progress=not quiet, window=window, stride=stride, num_fewshot=num_fewshot,
                         limit=(int(limit) if limit is not None and limit >= 1 else limit), include_path=include_path,
                         seed=seed)
            r["requested_plan"] = pdesc
            if note:
                r["calibration"] = note
            results.append(r)
        doc = {"model": model, "data": data, "metric": metric, "hook": str(hook) if hook else None,
               "results": results}
        if quiet:
            write_json(doc, None)
            return
        console.print(report.results_table(results, title=f"hookmoe eval: {model}"))
        console.print(report.act_matrix(results))
        if as_json is not None:
            write_json(doc, as_json)
            console.print(f"wrote {as_json}")
