"""The lm-evaluation-harness bridge: task presets of the paper, task managers for local YAML tasks, and
:func:`lm_eval_tasks`, which scores a loaded model through the registered ``hookmoe`` lm-eval model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence
from hookmoe.errors import EvalError
from hookmoe.eval.scope import finish_result
from hookmoe.routing.patch import eval_mode, routing_scope




#: lm-eval presets of the paper (task, few-shot).
PRESETS: dict[str, list[tuple[str, int]]] = {
    "paper-general": [(t, 0) for t in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa",
                                       "rte", "winogrande")],
    "paper-math": [("gsm8k", 5), ("minerva_math", 4)],
}


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
    from hookmoe.eval.lm_eval_model import HookMoELM  # the `hookmoe` lm-eval model (counts Act on real tokens only)
    from hookmoe.data.blocks import needs_bos

    key = (batch_size, max_length)
    cached = getattr(mm, "_hookmoe_hflm", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if mm.tokenizer is None:
        raise EvalError("lm-eval needs a tokenizer, and this model has none")
    kw: dict[str, Any] = {"batch_size": batch_size, "device": str(mm.device), "add_bos_token": needs_bos(mm.tokenizer)}
    if max_length:
        kw["max_length"] = max_length
    lm = HookMoELM(pretrained=mm, tokenizer=mm.tokenizer, **kw)
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
