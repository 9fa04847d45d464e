"""The TLNLE sensitivity sweep: k-1 on groups of layers [l, r], the quality drop of each, a heatmap."""

from __future__ import annotations

from hookmoe import progress as progress_bars

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from hookmoe.eval.scope import finish_result
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import Options, argument, option
from hookmoe.routing.patch import eval_mode, routing_scope
from hookmoe.eval.perplexity import perplexity_core
from hookmoe.errors import SearchError
from hookmoe.routing.partial import _batches, run_partial
from hookmoe.search.scorer import Scorer, ScoreOptions


@dataclass(kw_only=True)
class SweepSettings(Options):
    """The settings of a sensitivity sweep: :func:`sweep`'s keyword arguments (with their defaults)."""

    error: ClassVar[type] = SearchError

    group: Optional[int] = option(None, "layers per group (default: 8 groups)", min=1)
    k: Optional[int] = option(None, "base k (default: native); k-1 runs in layers l..r", min=2)
    cache: bool = option(True, "ppl: compute the states entering each first reduced layer once (--no-cache: "
                         "recompute the lower layers for every plan)")


@dataclass(kw_only=True)
class SweepOptions(SweepSettings, ScoreOptions, LoadOptions):
    """``hookmoe sweep``: the model, the scoring (:class:`ScoreOptions`) and the :class:`SweepSettings`."""

    model: str = argument(MODEL_HELP)
    out: Path = option(Path("sweep_out"), "output directory (sweep.json, sweep.csv, sweep.png)")


def layer_groups(mm, group: int | None = None) -> list[tuple[int, int]]:
    """Consecutive decoder-layer groups of ``group`` layers (default: 8 groups) that hold an MoE layer."""
    n = mm.num_layers
    g = int(group) if group else max(1, n // 8)
    if g < 1:
        raise SearchError(f"group size must be >= 1, got {group}")
    moe = set(mm.moe_layer_indices)
    out = []
    for s in range(0, n, g):
        e = min(s + g, n) - 1
        if any(s <= i <= e for i in moe):
            out.append((s, e))
    return out


def sweep_plans(mm, group: int | None = None, k: int | None = None) -> list[dict]:
    """One ``tlnle:k=K,l=l,r=r`` plan per range of groups [group_i .. group_j], i <= j."""
    k = int(k or mm.native_top_k)
    if k < 2:
        raise SearchError(f"the sweep runs k-1 experts in a layer range, so it needs base k >= 2 (this model's "
                          f"native k is {mm.native_top_k}; pass a larger k)")
    groups = layer_groups(mm, group)
    out = []
    for gi, (l, _) in enumerate(groups):
        for gj in range(gi, len(groups)):
            r = groups[gj][1]
            out.append({"l": l, "r": r, "group_l": gi, "group_r": gj, "plan": f"tlnle:k={k},l={l},r={r}"})
    return out


def _row(res: dict, base: dict, scorer: Scorer, extra: dict) -> dict:
    return {**extra, "score": res["score"], "drop": scorer.drop(base["score"], res["score"]), "act": res["act"],
            "act_per_layer": res["act_per_layer"], "params_active": res["params"]["active"]}


def sweep(mm, scorer: Scorer, *, progress: bool = True, **settings) -> dict:
    """Score every layer-range plan; perplexity reuses the states entering each first reduced layer.

    ``settings``: :class:`SweepSettings` fields (``group``, ``k``, ``cache``), with its defaults."""
    t0 = time.perf_counter()
    s = SweepSettings(**settings)
    group = s.group
    k = int(s.k or mm.native_top_k)
    plans = sweep_plans(mm, group, k)
    base_plan = "native" if k == mm.native_top_k else f"topk:{k}"
    base = scorer(base_plan)
    use_cache = bool(s.cache and scorer.metric == "ppl" and not scorer.eval_kw.get("window")
                     and not scorer.eval_kw.get("stride"))
    rows = []
    with progress_bars.bar(progress, f"sweep ({len(plans)} plans)", len(plans)) as advance:
        if not use_cache:
            for p in plans:
                res = scorer(p["plan"])
                rows.append(_row(res, base, scorer, p))
                advance(1)
        else:
            by_l: dict[int, list[dict]] = {}
            for p in plans:
                by_l.setdefault(p["l"], []).append(p)
            blocks = scorer.blocks.long()
            bs = scorer.batch_size
            batches = [b.to(mm.device) for b in _batches(blocks, bs)]
            base_per = {int(i): a for i, a in base["act_per_layer"].items()}
            states: list[torch.Tensor] | None = None
            prev_l = 0
            for l in sorted(by_l):
                todo = [p for p in by_l[l] if scorer.cached(p["plan"]) is None]
                if todo and l > 0:
                    with routing_scope(mm, base_plan), eval_mode(mm.model):
                        states = [run_partial(mm, ids, start=prev_l, hidden=None if states is None else states[bi],
                                              stop=l) for bi, ids in enumerate(batches)]
                    prev_l = l
                for p in by_l[l]:
                    res = scorer.cached(p["plan"])
                    if res is None:
                        res = _cached_ppl(mm, scorer, p["plan"], l, states if l > 0 else None, base_per)
                        scorer.remember(p["plan"], res)
                        scorer.evals += 1
                    rows.append(_row(res, base, scorer, p))
                    advance(1)
            states = None
    return {"group": int(group) if group else max(1, mm.num_layers // 8), "groups": layer_groups(mm, group),
            "k": k, "metric": scorer.metric,
            "higher_is_better": scorer.higher_is_better, "base_plan": base_plan, "base_score": base["score"],
            "base_act": base["act"], "rows": rows, "layer_cache": use_cache, "time_s": time.perf_counter() - t0}


def _cached_ppl(mm, scorer: Scorer, plan: str, l: int, states, base_per: dict[int, float]) -> dict:
    t0 = time.perf_counter()
    with routing_scope(mm, plan) as patch:
        if states is None:
            fwd = None
        else:
            def fwd(bi: int, ids: torch.Tensor) -> torch.Tensor:
                return run_partial(mm, ids, start=l, hidden=states[bi])
        core = perplexity_core(mm, scorer.blocks, batch_size=scorer.batch_size, forward=fwd)
        per = patch.stats.act_per_layer()
        merged = {i: (base_per[i] if i < l and i in base_per else per.get(i, base_per.get(i))) for i in base_per}
        out = finish_result(mm, patch, {"metric": "ppl", "score": core["ppl"], "higher_is_better": False, **core,
                                        "layer_cache": states is not None}, act_per_layer=merged)
    out["time_s"] = time.perf_counter() - t0
    return out


def write_sweep(result: dict, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """sweep.json, sweep.csv and the heatmap sweep.png."""
    from hookmoe import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(out / "sweep.json", result)}
    import io

    from hookmoe.files import atomic_write_text

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["l", "r", "group_l", "group_r", "plan", "score", "drop", "act", "params_active"])
    for r in result["rows"]:
        w.writerow([r["l"], r["r"], r["group_l"], r["group_r"], r["plan"], f"{r['score']:.6g}",
                    f"{r['drop']:.6g}", f"{r['act']:.6g}", r["params_active"]])
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    paths["csv"] = out / "sweep.csv"
    label = {"ppl": "perplexity", "mc": "accuracy", "lm-eval": "score"}.get(result["metric"], "score")
    paths["png"] = report.sweep_heatmap(result["rows"], out / "sweep.png", label=label,
                                        higher_is_better=result["higher_is_better"], base=result["base_score"],
                                        title=title or f"k={result['k']}->{result['k'] - 1} in layers l..r "
                                                       f"(base {label} {result['base_score']:.4g})")
    return paths
