"""``hookmoe run``: sweep -> search -> train -> eval -> report, in one output directory."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Sequence


from hookmoe.eval.run import evaluate
from hookmoe.routing.plan import Plan
from hookmoe.errors import SearchError
from hookmoe.search.paper import QUICK_HOOK_LR, _remove_hooks, default_hook_layer, search, search_plan, train_hook_at
from hookmoe.search.scorer import Scorer
from hookmoe.search.sweep import sweep, write_sweep


def run_pipeline(mm, *, calib: str, out: str | Path, tolerance: float = 0.01, data: str | None = None,
                 mc: str | None = None, group: int | None = None, block_len: int = 128, n_train: int = 32,
                 n_val: int = 8, n_eval: int = 16, search_hook_steps: int = 20, hook_steps: int = 100,
                 hook_lr: float | None = QUICK_HOOK_LR, hook_batch_size: int = 4, objective: str | None = None,
                 max_evals: int | None = None, hook_candidates: Sequence[int] | None = None, batch_size: int = 8,
                 seed: int = 0, console=None, progress: bool = True, model_name: str | None = None,
                 command: str | None = None, allocator: str | None = None, act: float | None = None,
                 final_out: str | Path | None = None) -> dict:
    """sweep → search → train → eval → report, all on one loaded model; everything lands in ``out``."""
    from hookmoe import report
    from hookmoe.data.blocks import make_blocks
    from hookmoe.files import atomic_write_text

    t_start = time.perf_counter()
    out = Path(out)
    if (out / "hook").exists() and any((out / "hook").iterdir()):
        raise SearchError(f"--out: {out / 'hook'} already holds a Hook run; choose a new --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if mm.tokenizer is None:
        raise SearchError("this model has no tokenizer, so text data cannot be tokenised")

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False, markup=False)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    say(f"1/6 data: {n_train}+{n_val} blocks from the train split of {calib}, {n_eval} held-out "
        f"blocks from {data or calib} ({block_len} tokens each)")
    tv = make_blocks(mm.tokenizer, calib, n_train + n_val, block_len, seed=seed, split="train", progress=progress)
    train_blocks, val_blocks = tv[:n_train], tv[n_train:]
    eval_blocks = make_blocks(mm.tokenizer, data or calib, n_eval, block_len, seed=seed, split="heldout",
                              progress=progress)
    mc_items = None
    if mc:
        from hookmoe.eval.mc import load_mc_source

        mc_items = load_mc_source(mc, seed=seed)
    timings["data"] = time.perf_counter() - t

    val = Scorer(mm, "ppl", blocks=val_blocks, batch_size=batch_size)
    t = time.perf_counter()
    sw = None
    if mm.native_top_k >= 2:
        say("2/6 sweep: k-1 experts in every layer range (validation perplexity)")
        sw = sweep(mm, val, group=group, progress=progress)
        write_sweep(sw, out)
    else:
        say("2/6 sweep: skipped (native k is 1)")
    timings["sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"3/6 search: tolerance {100 * tolerance:g}% (relative perplexity rise on validation blocks)")
    sr = search(mm, val, tolerance=tolerance, step=group, max_evals=max_evals, hook=True,
                hook_candidates=hook_candidates, train_blocks=train_blocks,
                hook_steps=search_hook_steps, hook_lr=hook_lr, hook_batch_size=hook_batch_size,
                hook_objective=objective, log_path=out / "search_log.jsonl", console=console)
    splan = search_plan(sr)
    splan.save(out / "plan.json")
    report.write_json(out / "search.json", {k: v for k, v in sr.items() if k != "log"})
    timings["search"] = time.perf_counter() - t

    hook_plan = sr["hook"]["plan"] if sr.get("hook") else f"topk:{max(1, sr['k'] - 1)}"
    hook_layer = sr["hook"]["layer"] if sr.get("hook") else default_hook_layer(mm)
    allocation = None
    if allocator is not None:  # the reduced plan comes from an allocator (search/allocators.py) at the same Act
        from hookmoe.search.allocators import get_allocator, plan_ks

        ks0 = plan_ks(mm, hook_plan)
        target = float(act) if act is not None else sum(ks0.values()) / len(ks0)
        say(f"3/6 allocate: {allocator} at Act {target:g} (sensitivity on the validation blocks)")
        ap = get_allocator(allocator).allocate(mm, target_act=target, calib=val_blocks, progress=progress)
        allocation = ap.meta["allocation"]
        hook_plan = ap.base
    Plan(base=hook_plan, meta={"hook_layer": hook_layer, "hook_dir": "hook"}).save(out / "hook_plan.json")
    t = time.perf_counter()
    say(f"4/6 train: Hook at layer {hook_layer} under {hook_plan}, {hook_steps} steps")
    tr = train_hook_at(mm, hook_layer, hook_plan, train_blocks, val_blocks, steps=hook_steps, lr=hook_lr,
                       batch_size=hook_batch_size, objective=objective, out_dir=out / "hook", progress=progress)
    history = list(getattr(tr, "history", []) or [])
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    say("5/6 eval: held-out perplexity" + (" and multiple choice" if mc_items else ""))
    from hookmoe.hook.inject import get_hooks

    hs = get_hooks(mm)
    if hs is None:
        raise SearchError("hook training finished but left no Hook attached to the model")
    evals: dict[str, dict] = {}
    plans = [("native", "native", False), ("searched plan", sr["plan"], False),
             ("reduced (no hook)", hook_plan, False), ("reduced + hook", hook_plan, True)]
    if sr["plan"] != "native" and sr["plan"] != hook_plan:
        plans.append(("searched plan + hook", sr["plan"], True))
    done: dict[tuple, dict] = {}
    for label, plan, with_hook in plans:
        key = (Plan.parse(plan).describe(), with_hook)
        if key not in done:
            with contextlib.nullcontext() if with_hook else hs.disabled():
                r = evaluate(mm, plan, metric="ppl", blocks=eval_blocks, batch_size=batch_size, progress=progress)
                if mc_items is not None:
                    r["mc"] = evaluate(mm, plan, metric="mc", items=mc_items, batch_size=batch_size,
                                       progress=progress)
            done[key] = r
        r = dict(done[key], label=label, with_hook=with_hook)
        evals[label] = r
    _remove_hooks(mm)
    timings["eval"] = time.perf_counter() - t

    nat, red, hk = evals["native"], evals["reduced (no hook)"], evals["reduced + hook"]
    gap = _gap_recovered(nat["score"], red["score"], hk["score"])
    gap_mc = None
    if mc_items is not None:
        gap_mc = _gap_recovered(nat["mc"]["score"], red["mc"]["score"], hk["mc"]["score"])
    t = time.perf_counter()
    say("6/6 report")
    pts = [{"label": k, "score": v["score"], "act": v["act"]} for k, v in evals.items()]
    report.quality_vs_act(pts, out / "quality_vs_act.png", baseline=nat["score"], ylabel="held-out perplexity",
                          title="held-out perplexity vs Act")
    report.loss_curve(history, out / "hook_loss.png")
    summary = {
        "model": model_name or mm.source, "command": command, "calib": calib, "data": data or calib,
        "tolerance": tolerance, "block_len": block_len, "n_train": n_train, "n_val": n_val, "n_eval": n_eval,
        "search": {k: v for k, v in sr.items() if k != "log"}, "plan": splan.to_dict(), "allocation": allocation,
        "hook": {"layer": hook_layer, "plan": hook_plan, "dir": str(Path(final_out or out) / "hook"), "steps": hook_steps,
                 "metrics": _jsonable(getattr(tr, "metrics", None))},
        "evals": evals, "gap_recovered": gap, "gap_recovered_mc": gap_mc, "timings_s": timings,
        "sweep": None if sw is None else {k: v for k, v in sw.items() if k != "rows"},
    }
    timings["report"] = time.perf_counter() - t
    summary["wall_time_s"] = time.perf_counter() - t_start
    report.write_json(out / "results.json", summary)
    atomic_write_text(out / "report.md", _report_md(mm, summary, sw, sr, evals, history))
    summary["wall_time_s"] = time.perf_counter() - t_start
    report.write_json(out / "results.json", summary)
    return summary


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        return json.loads(json.dumps(x, default=str))


def _gap_recovered(native: float, reduced: float, hooked: float) -> float | None:
    """Share of the native-vs-reduced gap won back by the Hook (same for perplexity and accuracy)."""
    if reduced == native:
        return None
    return (reduced - hooked) / (reduced - native)


def _report_md(mm, s: dict, sw: dict | None, sr: dict, evals: dict, history: list) -> str:
    from hookmoe import report

    L = []
    L.append(f"# hookmoe run: {s['model']}\n")
    if s.get("command"):
        L.append(f"Command: `{s['command']}`\n")
    L.append(f"Calibration data: `{s['calib']}` (train split: {s['n_train']} training + {s['n_val']} validation "
             f"blocks of {s['block_len']} tokens); evaluation: held-out split of `{s['data']}` ({s['n_eval']} "
             f"blocks). Tolerance {100 * s['tolerance']:g}% (relative perplexity rise). "
             f"Model: {mm.arch}, {mm.num_layers} layers ({len(mm.layers)} MoE), {mm.num_experts} experts, "
             f"native top-{mm.native_top_k}.\n")
    L.append(f"Wall time: {s['wall_time_s']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings_s"].items())
             + ").\n")
    # results
    L.append("## Results (held-out)\n")
    mc = any("mc" in v for v in evals.values())
    head = ["", "plan", "hook", "perplexity", "Act", "active params", "vs native"]
    if mc:
        head += ["MC acc", "MC acc_norm"]
    rows = []
    nat = evals["native"]["score"]
    for label, r in evals.items():
        row = [label, r["plan"], f"layer {s['hook']['layer']}" if r.get("with_hook") else "-", f"{r['score']:.4f}",
               f"{r['act']:.3f}", f"{r['params']['active']:,} / {r['params']['total']:,}",
               report.pct((r["score"] - nat) / nat)]
        if mc:
            m = r.get("mc") or {}
            row += [f"{100 * m.get('acc', float('nan')):.2f}%", f"{100 * m.get('acc_norm', float('nan')):.2f}%"]
        rows.append(row)
    L.append(report.markdown_table(head, rows) + "\n")
    g = s.get("gap_recovered")
    L.append(f"Gap recovered by the Hook (perplexity): "
             f"{'n/a (no gap)' if g is None else f'{100 * g:.1f}%'}"
             + ("" if s.get("gap_recovered_mc") is None else f"; multiple choice: {100 * s['gap_recovered_mc']:.1f}%")
             + ".\n")
    # per-layer plan
    L.append("## Per-layer plan\n")
    sp, hp, hk = evals["searched plan"], evals["reduced (no hook)"], evals["reduced + hook"]
    rows: list[list] = []  # consecutive layers with the same entries share a row
    for layer in sorted(int(i) for i in sp["act_per_layer"]):
        k = str(layer)
        cells = [sp["rules"].get(k, ""), f"{sp['act_per_layer'][k]:.3f}", hp["rules"].get(k, ""),
                 "hook" if layer == s["hook"]["layer"] else "", f"{hk['act_per_layer'][k]:.3f}"]
        if rows and rows[-1][1:] == cells and rows[-1][0][1] == layer - 1:
            rows[-1][0] = (rows[-1][0][0], layer)
        else:
            rows.append([(layer, layer)] + cells)
    rows = [[str(r[0][0]) if r[0][0] == r[0][1] else f"{r[0][0]}-{r[0][1]}"] + r[1:] for r in rows]
    L.append(report.markdown_table(["layers", "searched plan", "Act", "hook plan", "hook", "Act (hook plan)"], rows)
             + "\n")
    # search
    L.append("## Search (validation perplexity)\n")
    L.append(f"Result: `{sr['plan']}` (k={sr['k']}, l={sr['l']}), drop {100 * sr['drop']:+.2f}% at Act "
             f"{sr['act']:.3f}; {sr['evals']} evaluations" + (" (budget exhausted)" if sr["budget_exhausted"] else "")
             + ". Log: `search_log.jsonl`.\n")
    rows = [[e["phase"], e.get("label", e.get("plan")), f"{e['score']:.4f}", report.pct(e.get("drop")),
             f"{e['act']:.3f}", "yes" if e.get("within") else "no"] for e in sr["log"] if "score" in e]
    L.append(report.markdown_table(["phase", "plan", "val ppl", "drop", "Act", "within tolerance"], rows) + "\n")
    if sr.get("hook"):
        h = sr["hook"]
        L.append(f"Hook layer: {h['layer']} (binary search over {h['searched']}; probed "
                 f"{', '.join(h['candidates'])}).\n")
    # sweep
    if sw is not None:
        L.append("## Sensitivity sweep\n")
        L.append(f"k={sw['k']} -> {sw['k'] - 1} in layers l..r; base validation perplexity {sw['base_score']:.4f}; "
                 f"{len(sw['rows'])} plans in {sw['time_s']:.1f} s (layer-input cache: {sw['layer_cache']}).\n")
        L.append("![sweep](sweep.png)\n")
        rows = [[r["l"], r["r"], f"{r['score']:.4f}", report.pct(r["drop"]), f"{r['act']:.3f}"] for r in sw["rows"]]
        L.append(report.markdown_table(["l", "r", "val ppl", "drop", "Act"], rows) + "\n")
    L.append("## Plots\n")
    L.append("![quality vs Act](quality_vs_act.png)\n")
    if history:
        L.append("![hook training loss](hook_loss.png)\n")
    L.append("## Files\n")
    L.append("- `plan.json` — the searched training-free plan (`hookmoe eval MODEL --plan plan.json`)\n"
             "- `hook_plan.json` + `hook/` — the plan the Hook was trained for and the Hook artifact "
             "(`hookmoe eval MODEL --plan hook_plan.json --hook hook`)\n"
             "- `results.json`, `search.json`, `search_log.jsonl`, `sweep.json`, `sweep.csv` — all numbers\n")
    return "\n".join(L)
