"""TODO docstring"""

from __future__ import annotations

from pathlib import Path
from typing import Callable




def _metric_name(m: str) -> str:
    return "TTFT@" + m.split("@")[1] if m.startswith("ttft") else "ITL"


def results_table(res: dict):
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
            t.add_row(row["label"] if first else "", act_s if first else "", _metric_name(m),
                      f"{x['median_ms']:.1f}", ratio, lim, eff_s)
            first = False
        t.add_section()
    t.caption = ("¹ activated experts per token (prefill/decode where they differ); speed-up = median of the "
                 "per-repeat paired ratios; limit = active FLOPs (TTFT) or weight bytes per step (ITL); "
                 "eff. = (speed-up − 1)/(limit − 1)")
    return t


def _pairs_table(title: str, items: list[dict], name: Callable[[dict], str], key: str):
    from rich.table import Table

    if not items:
        return None
    t = Table(title=title)
    t.add_column("comparison", overflow="fold")
    metrics = [k for k in items[0] if k.startswith(("ttft@", "itl"))]
    for m in metrics:
        t.add_column(_metric_name(m), justify="right")
    for o in items:
        t.add_row(name(o), *[f"{o[m][key] * 100:+.1f}% ({o[m]['min'] * 100:+.1f}, {o[m]['max'] * 100:+.1f})"
                             + (f"; work +{o[m]['expected'] * 100:.1f}%" if "expected" in o[m] else "")
                             for m in metrics])
    return t


def extra_tables(res: dict) -> list:
    out = [_pairs_table("Hook overhead (time with / without, paired median (min, max))", res["hook_overhead"],
                        lambda o: f"{o['variant']} vs {o['without_hook']}", "overhead"),
           _pairs_table("Dynamic rule vs static plan at the same Act (time, paired median (min, max))",
                        res["dynamic_vs_static"],
                        lambda o: f"{o['dynamic']} (Act {o['act_dynamic']:.2f}/{o['act_decode_dynamic']:.2f}) vs "
                                  f"{o['static']} (Act {o['act_static']:.2f}/{o['act_decode_static']:.2f})",
                        "slowdown")]
    return [t for t in out if t is not None]


def plot(res: dict, path: str | Path) -> Path:
    """Bar plot: measured speed-up of every variant vs its base, with the theoretical limit beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["variants"] if any("ratio" in st for st in r["metrics"].values())]
    metrics = list(res["variants"][0]["metrics"].keys())
    names = [_metric_name(m) for m in metrics]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 2.0 + 1.1 * len(metrics) * max(1, len(rows)))), 4.5))
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
    fig.tight_layout()
    from hookmoe.files import save_figure

    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
