"""Tables (rich and markdown), JSON files and plots (PNG) for evaluations, sweeps, searches and comparisons.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

from hookmoe.files import json_default as _json_default, write_json  # noqa: F401  (re-exported)

import math
from pathlib import Path
from typing import Callable, Any, Iterable, Sequence

# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def fmt_score(result: dict) -> str:
    s = result.get("score")
    if s is None:
        return "-"
    if result.get("metric") in ("mc", "lm-eval"):
        return f"{100 * s:.2f}%"
    return f"{s:.3f}"


def pct(x: float | None, digits: int = 2) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return f"{100 * x:+.{digits}f}%"






# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def results_table(results: Sequence[dict], title: str = "results"):
    """A rich table: plan, score, Act, active params per evaluation result."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("plan")
    t.add_column("hook")
    t.add_column("metric")
    t.add_column("score", justify="right")
    t.add_column("Act", justify="right")
    t.add_column("active params", justify="right")
    t.add_column("detail")
    t.add_column("time", justify="right")
    for r in results:
        hook = r.get("hook")
        detail = ""
        if r.get("metric") == "ppl":
            detail = f"{r.get('tokens', 0):,} tokens"
        elif r.get("metric") == "mc":
            detail = f"acc_norm {100 * r.get('acc_norm', 0):.2f}%, {r.get('items')} items"
        elif r.get("metric") == "lm-eval":
            detail = ", ".join(f"{k} {100 * v['score']:.1f}" for k, v in r.get("tasks", {}).items()
                               if v.get("score") is not None)
        params = r.get("params", {})
        t.add_row(r.get("plan", "?"), ("L" + ",".join(map(str, hook["layers"]))) if hook else "-",
                  r.get("metric", "?"), fmt_score(r), f"{r.get('act', float('nan')):.3f}",
                  f"{params.get('active', 0):,} / {params.get('total', 0):,}", detail,
                  f"{r.get('time_s', 0):.1f}s")
    return t


def act_matrix(results: Sequence[dict], title: str = "Act per MoE layer (rule)"):
    """A rich table with one row per MoE layer and one column per evaluated plan."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("layer", justify="right")
    for i, r in enumerate(results):
        t.add_column(f"{i + 1}: {r.get('plan', '?')}"[:40], justify="right")
    layers = sorted({int(k) for r in results for k in r.get("act_per_layer", {})})
    for layer in layers:
        row = [str(layer)]
        for r in results:
            a = r.get("act_per_layer", {}).get(str(layer))
            rule = r.get("rules", {}).get(str(layer), "")
            row.append("-" if a is None else f"{a:.3f} ({rule})")
        t.add_row(*row)
    t.add_row("all", *[f"{r.get('act', float('nan')):.3f}" for r in results])
    return t


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        s = x if isinstance(x, str) else fmt(x)
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(x) for x in row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _figure(w: float = 6.0, h: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    from hookmoe.files import save_figure

    return save_figure(fig, path)


def sweep_heatmap(rows: Sequence[dict], path: str | Path, *, title: str = "", label: str = "score",
                  higher_is_better: bool = False, base: float | None = None) -> Path:
    """The paper's Fig. 1: first reduced layer l (rows) x last reduced layer r (columns), colour = score."""
    import numpy as np

    ls = sorted({int(r["l"]) for r in rows})
    rs = sorted({int(r["r"]) for r in rows})
    grid = np.full((len(ls), len(rs)), np.nan)
    for r in rows:
        grid[ls.index(int(r["l"])), rs.index(int(r["r"]))] = float(r["score"])
    fig = _figure(1.2 + 0.75 * len(rs), 1.0 + 0.6 * len(ls))
    ax = fig.add_subplot(1, 1, 1)
    cmap = "viridis" if higher_is_better else "viridis_r"
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="upper", aspect="auto")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xticks(range(len(rs)), [str(x) for x in rs])
    ax.set_yticks(range(len(ls)), [str(x) for x in ls])
    ax.set_xlabel("r (last layer with k-1)")
    ax.set_ylabel("l (first layer with k-1)")
    finite = grid[np.isfinite(grid)]
    mid = float(finite.mean()) if finite.size else 0.0
    for i in range(len(ls)):
        for j in range(len(rs)):
            v = grid[i, j]
            if not math.isfinite(v):
                continue
            text = f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
            if base:
                d = (v - base) / abs(base)
                text += f"\n{100 * d:+.1f}%"
            dark = (v > mid) == (not higher_is_better)
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title(title or "TLNLE sensitivity sweep", fontsize=9)
    return _save(fig, path)


def quality_vs_act(points: Sequence[dict], path: str | Path, *, title: str = "", ylabel: str = "score",
                   baseline: float | None = None) -> Path:
    """Scatter of score against Act, one labelled point per method/plan."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*X"
    for n, p in enumerate(points):
        if p.get("score") is None or p.get("act") is None:
            continue
        ax.scatter([p["act"]], [p["score"]], marker=markers[n % len(markers)], s=46, label=p.get("label", "?"),
                   zorder=3)
        ax.annotate(p.get("label", ""), (p["act"], p["score"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=0.8, label="native")
    ax.set_xlabel("Act (activated routed experts per token)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "quality vs Act", fontsize=9)
    return _save(fig, path)


def loss_curve(history: Sequence[dict], path: str | Path, *, title: str = "hook training") -> Path | None:
    """Training (and validation, when logged) loss per step from a training history."""
    train = [h for h in history if isinstance(h, dict) and h.get("loss") is not None]
    evals = [h for h in history if isinstance(h, dict) and h.get("kind") == "eval"]
    vkey = next((k for k in ("val_loss", "val_kd", "val_lm", "val_hidden") if any(k in h for h in evals)), None)
    val = [(h.get("step"), h[vkey]) for h in evals if vkey and h.get(vkey) is not None]
    steps = [h.get("step", n) for n, h in enumerate(train)]
    losses = [h["loss"] for h in train]
    if not losses:
        return None
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=1, label="train loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", lw=1, ms=3, label=vkey.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def gap_closed(nohook: float, hooked: float, native: float) -> float:
    """Fraction of the loss gap between the reduced model and the native model that the Hook closes."""
    gap = nohook - native
    return float("nan") if abs(gap) < 1e-12 else (nohook - hooked) / gap


def training_curve(history: list[dict], path: str | Path, title: str = "hook training") -> Path:
    """Loss curve: training loss per step (raw and smoothed) and held-out KD/LM losses per evaluation."""
    train = [h for h in history if h.get("kind") == "train"]
    evals = [h for h in history if h.get("kind") == "eval"]
    fig = _figure(11 if evals else 6, 4)
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)
    ax = axes[0][0]
    if train:
        xs = [h["step"] for h in train]
        ys = [h["loss"] for h in train]
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="train loss")
        ema, sm = None, []
        for y in ys:
            ema = y if ema is None else 0.9 * ema + 0.1 * y
            sm.append(ema)
        ax.plot(xs, sm, color="tab:blue", lw=2, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("training objective")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if evals:
        ax2 = axes[0][1]
        base = evals[0]
        xs = [h["step"] for h in evals]
        for key, ref, color in (("kd", 0.0, "tab:red"), ("lm", base.get("val_lm_native"), "tab:green"),
                                ("hidden", 0.0, "tab:purple")):
            nh = base.get(f"val_{key}_nohook")
            if nh is None or ref is None or not all(f"val_{key}" in h for h in evals):
                continue
            ys = [100 * gap_closed(nh, h[f"val_{key}"], ref) for h in evals]
            ax2.plot(xs, ys, marker="o", color=color, label=f"{key} (no hook {nh:.4g})")
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("held-out gap closed (%)")
        ax2.set_title("(no hook − hook) / (no hook − native)", fontsize=9)
        ax2.legend(fontsize=8)
    return _save(fig, path)


def bench_speedups(res: dict, path: str | Path) -> Path:
    """Bar plot: measured speed-up of every variant vs its base, with the theoretical limit beside it."""
    rows = [r for r in res["variants"] if any("ratio" in st for st in r["metrics"].values())]
    metrics = list(res["variants"][0]["metrics"].keys())
    names = [metric_name(m) for m in metrics]
    fig = _figure(min(14.0, max(6.0, 2.0 + 1.1 * len(metrics) * max(1, len(rows)))), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(metrics))]
        meas = [r["metrics"][m].get("ratio", float("nan")) for m in metrics]
        lo = [max(0.0, mv - r["metrics"][m].get("ratio_min", mv)) for m, mv in zip(metrics, meas)]
        hi = [max(0.0, r["metrics"][m].get("ratio_max", mv) - mv) for m, mv in zip(metrics, meas)]
        lim = [r["metrics"][m].get("limit", float("nan")) for m in metrics]
        bars = ax.bar(xs, meas, width * 0.9, yerr=[lo, hi], capsize=3, label=f"{r['label']} (Act {r['act']:.2f})")
        ax.hlines(lim, [x - width * 0.45 for x in xs], [x + width * 0.45 for x in xs], colors="black",
                  linestyles="--", linewidth=1.5, zorder=3, label="theoretical limit" if j == 0 else None)
        for b, mv in zip(bars, meas):
            ax.annotate(f"{mv:.2f}×", (b.get_x() + b.get_width() / 2, mv), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(names)
    ax.set_ylabel("speed-up vs base")
    base = res["variants"][0]["label"]
    ax.set_title(f"{res['model']['source']}: speed-up over '{base}'", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(rows) + 1),
              frameon=False)
    return _save(fig, path)


def ppl_bars(rows: Sequence[dict], path: str | Path, *, title: str = "") -> Path:
    """Horizontal bars of held-out perplexity, one per named row (the demo's picture)."""
    fig = _figure(8, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([r["name"] for r in rows][::-1], [r["ppl"] for r in rows][::-1], color="#4477aa")
    ax.set_xlabel("held-out perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Speed benchmark tables
# --------------------------------------------------------------------------------------------------


def metric_name(m: str) -> str:
    return "TTFT@" + m.split("@")[1] if m.startswith("ttft") else "ITL"


def bench_table(res: dict):
    from rich.table import Table

    st = res["settings"]
    t = Table(title=f"hookmoe bench: {res['model']['source']} — {res['model']['device']}, {res['model']['dtype']}, "
                    f"batch {st['batch_size']}, {st['repeats']} interleaved repeats, {st['clock']} clock"
                    + (f", ITL over {st['new_tokens']} new tokens" if st["new_tokens"] else ""))
    for col, just in (("variant", "left"), ("Act¹", "right"), ("metric", "left"), ("median ms", "right"),
                      ("speed-up (min–max)", "right"), ("limit", "right"), ("eff.", "right")):
        t.add_column(col, justify=just, overflow="fold")
    for row in res["variants"]:
        first = True
        for m, x in row["metrics"].items():
            ratio = f"{x['ratio']:.2f}× ({x['ratio_min']:.2f}–{x['ratio_max']:.2f})" if "ratio" in x else "base"
            lim = f"{x['limit']:.2f}×" if "limit" in x else ""
            eff = x.get("efficiency")
            eff_s = f"{eff * 100:.0f}%" if isinstance(eff, (int, float)) else ("" if "ratio" not in x else "n/a")
            a, d = row["act"], row.get("act_decode", row["act"])
            act_s = f"{a:.2f}" if abs(a - d) < 0.005 else f"{a:.2f}/{d:.2f}"
            t.add_row(row["label"] if first else "", act_s if first else "", metric_name(m),
                      f"{x['median_ms']:.1f}", ratio, lim, eff_s)
            first = False
        t.add_section()
    t.caption = ("¹ activated experts per token (prefill/decode where they differ); speed-up = median of the "
                 "per-repeat paired ratios; limit = active FLOPs (TTFT) or weight bytes per step (ITL); "
                 "eff. = (speed-up − 1)/(limit − 1)")
    return t


def _bench_pairs_table(title: str, items: list[dict], name: Callable[[dict], str], key: str):
    from rich.table import Table

    if not items:
        return None
    t = Table(title=title)
    t.add_column("comparison", overflow="fold")
    metrics = [k for k in items[0] if k.startswith(("ttft@", "itl"))]
    for m in metrics:
        t.add_column(metric_name(m), justify="right")
    for o in items:
        t.add_row(name(o), *[f"{o[m][key] * 100:+.1f}% ({o[m]['min'] * 100:+.1f}, {o[m]['max'] * 100:+.1f})"
                             + (f"; work +{o[m]['expected'] * 100:.1f}%" if "expected" in o[m] else "")
                             for m in metrics])
    return t


def bench_extra_tables(res: dict) -> list:
    out = [_bench_pairs_table("Hook overhead (time with / without, paired median (min, max))", res["hook_overhead"],
                        lambda o: f"{o['variant']} vs {o['without_hook']}", "overhead"),
           _bench_pairs_table("Dynamic rule vs static plan at the same Act (time, paired median (min, max))",
                        res["dynamic_vs_static"],
                        lambda o: f"{o['dynamic']} (Act {o['act_dynamic']:.2f}/{o['act_decode_dynamic']:.2f}) vs "
                                  f"{o['static']} (Act {o['act_static']:.2f}/{o['act_decode_static']:.2f})",
                        "slowdown")]
    return [t for t in out if t is not None]


