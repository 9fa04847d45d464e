"""``hookmoe run``: sweep -> search -> train -> eval -> report, in one output directory."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional


from hookmoe.eval.run import evaluate
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import argument, option
from hookmoe.routing.plan import Plan
from hookmoe.errors import SearchError
from hookmoe.search.paper import (QUICK_HOOK_LR, SearchSettings, _remove_hooks, default_hook_layer, layer_candidates,
                                  search, search_plan, train_hook_at)
from hookmoe.search.scorer import BatchOptions, Scorer
from hookmoe.search.sweep import sweep, write_sweep
from hookmoe.training.config import OBJECTIVES


@dataclass(kw_only=True)
class PipelineSettings(BatchOptions):
    """The settings of ``hookmoe run``'s pipeline: :func:`run_pipeline`'s keyword arguments (with their defaults)."""

    error: ClassVar[type] = SearchError

    calib: str = option(help="calibration text source (builtin, c4, math, hf:ID, file or folder)")
    tolerance: float = option(SearchSettings.default("tolerance"), "allowed relative perplexity rise for the search "
                              "(0.01 = 1%)", min=0)
    data: Optional[str] = option(None, "evaluation text source (held-out split; default: --calib)")
    mc: Optional[str] = option(None, "also report multiple-choice accuracy on this MC data (.jsonl, task.json or "
                               "builtin-mc[:N])")
    group: Optional[int] = option(None, "layers per sweep group / search step (default L/8)", min=1)
    block_len: int = option(128, "tokens per block", min=2)
    n_train: int = option(32, "Hook training blocks", min=1)
    n_val: int = option(8, "validation blocks (sweep, search, Hook-layer choice)", min=1)
    n_eval: int = option(16, "held-out evaluation blocks", min=1)
    search_hook_steps: int = option(SearchSettings.default("hook_steps"), "training steps per Hook-layer candidate",
                                    min=1)
    hook_steps: int = option(100, "training steps of the final Hook", min=1)
    hook_lr: Optional[float] = option(QUICK_HOOK_LR, "Hook learning rate (paper: 1e-4 on far more data)", min=0,
                                      min_open=True)
    hook_batch_size: int = option(SearchSettings.default("hook_batch_size"), "blocks per Hook training step", min=1)
    objective: Optional[str] = option(None, "Hook training objective: kd | lm | hidden (default: hookmoe.train's)",
                                      choices=OBJECTIVES)
    max_evals: Optional[int] = option(None, "cap on search evaluations", min=1)
    hook_candidates: Optional[str] = option(None, "candidate Hook layers, e.g. 8-20")
    # dp spreads the same Act over the layers by their measured sensitivity: on the demo model it removed 44 % of
    # uniform top-3's perplexity gap before any training (benchmarks/results/allocators_smollm2.md)
    allocator: str = option("dp", "how the reduced plan the Hook is trained for spreads its Act over the layers: dp "
                            "| dp2 | greedy | tlnle | weights | uniform (k-1 everywhere, the paper's)")
    act: Optional[float] = option(None, "target Act of the reduced plan (default: the Act of uniform k-1 after the "
                                  "search)", min=0, min_open=True)

    def check(self) -> None:
        super().check()
        if self.act is not None and self.allocator == "uniform":
            raise SearchError("--act needs an --allocator other than uniform (uniform runs k-1 everywhere)")
        if self.allocator != "uniform":
            from hookmoe.search.allocators import get_allocator

            get_allocator(self.allocator)  # a bad name fails before the model loads
        layer_candidates(self.hook_candidates)


@dataclass(kw_only=True)
class RunOptions(PipelineSettings, LoadOptions):
    """``hookmoe run``: the model, the output directory and the :class:`PipelineSettings`."""

    model: str = argument(MODEL_HELP)
    out: Path = option(help="output directory (report.md, plots, hook/, JSON)")


def run_pipeline(mm, *, out: str | Path, final_out: str | Path | None = None, console=None, progress: bool = True,
                 model_name: str | None = None, command: str | None = None, **settings) -> dict:
    """sweep → search → train → eval → report, all on one loaded model; everything lands in ``out``.

    ``settings``: :class:`PipelineSettings` fields (``calib`` is required), with its defaults."""
    from hookmoe import report
    from hookmoe.files import atomic_write_text

    s = PipelineSettings(**settings)
    t_start = time.perf_counter()
    out = Path(out)
    if (out / "hook").exists() and any((out / "hook").iterdir()):
        raise SearchError(f"--out: {out / 'hook'} already holds a Hook run; choose a new --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if mm.tokenizer is None:
        raise SearchError("this model has no tokenizer, so text data cannot be tokenised")
    say = _sayer(console)
    timings: dict[str, float] = {}
    step = _timer(timings)

    train_blocks, val_blocks, eval_blocks, mc_items = step("data", _pipeline_data, mm, s, say, progress)
    val = Scorer(mm, "ppl", blocks=val_blocks, batch_size=s.batch_size)
    sw = step("sweep", _pipeline_sweep, mm, val, out, s, say, progress)
    sr, splan = step("search", _pipeline_search, mm, val, train_blocks, out, s, say, console)
    hook_plan, hook_layer, allocation = _hook_plan(mm, sr, val_blocks, s, say, progress)
    Plan(base=hook_plan, meta={"hook_layer": hook_layer, "hook_dir": "hook"}).save(out / "hook_plan.json")
    say(f"4/6 train: Hook at layer {hook_layer} under {hook_plan}, {s.hook_steps} steps")
    tr = step("train", train_hook_at, mm, hook_layer, hook_plan, train_blocks, val_blocks, steps=s.hook_steps,
              lr=s.hook_lr, batch_size=s.hook_batch_size, objective=s.objective, out_dir=out / "hook",
              progress=progress)
    history = list(getattr(tr, "history", []) or [])
    say("5/6 eval: held-out perplexity" + (" and multiple choice" if mc_items else ""))
    evals = step("eval", _pipeline_evals, mm, sr["plan"], hook_plan, eval_blocks, mc_items, s, progress)

    t = time.perf_counter()
    say("6/6 report")
    nat = evals["native"]
    pts = [{"label": k, "score": v["score"], "act": v["act"]} for k, v in evals.items()]
    report.quality_vs_act(pts, out / "quality_vs_act.png", baseline=nat["score"], ylabel="held-out perplexity",
                          title="held-out perplexity vs Act")
    report.loss_curve(history, out / "hook_loss.png")
    summary = _summary(mm, s, sw, sr, splan, evals, allocation, timings, model_name=model_name, command=command,
                       hook={"layer": hook_layer, "plan": hook_plan, "dir": str(Path(final_out or out) / "hook"),
                             "steps": s.hook_steps, "metrics": _jsonable(getattr(tr, "metrics", None))})
    timings["report"] = time.perf_counter() - t
    summary["wall_time_s"] = time.perf_counter() - t_start
    report.write_json(out / "results.json", summary)
    atomic_write_text(out / "report.md", _report_md(mm, summary, sw, sr, evals, history))
    summary["wall_time_s"] = time.perf_counter() - t_start
    report.write_json(out / "results.json", summary)
    return summary


def _sayer(console) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False, markup=False)

    return say


def _timer(timings: dict[str, float]) -> Callable[..., Any]:
    """``step(name, fn, *args, **kw)``: ``fn(*args, **kw)``, its wall time recorded as ``timings[name]``."""

    def step(name: str, fn: Callable[..., Any], *args, **kw) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            timings[name] = time.perf_counter() - t

    return step


def _pipeline_data(mm, s: PipelineSettings, say, progress: bool) -> tuple:
    """(training, validation, held-out evaluation blocks, MC items or None)."""
    from hookmoe.data.blocks import make_blocks

    say(f"1/6 data: {s.n_train}+{s.n_val} blocks from the train split of {s.calib}, {s.n_eval} held-out "
        f"blocks from {s.data or s.calib} ({s.block_len} tokens each)")
    tv = make_blocks(mm.tokenizer, s.calib, s.n_train + s.n_val, s.block_len, seed=s.seed, split="train",
                     progress=progress)
    eval_blocks = make_blocks(mm.tokenizer, s.data or s.calib, s.n_eval, s.block_len, seed=s.seed, split="heldout",
                              progress=progress)
    mc_items = None
    if s.mc:
        from hookmoe.eval.mc import load_mc_source

        mc_items = load_mc_source(s.mc, seed=s.seed)
    return tv[:s.n_train], tv[s.n_train:], eval_blocks, mc_items


def _pipeline_sweep(mm, val: Scorer, out: Path, s: PipelineSettings, say, progress: bool) -> dict | None:
    if mm.native_top_k < 2:
        say("2/6 sweep: skipped (native k is 1)")
        return None
    say("2/6 sweep: k-1 experts in every layer range (validation perplexity)")
    sw = sweep(mm, val, group=s.group, progress=progress)
    write_sweep(sw, out)
    return sw


def _pipeline_search(mm, val: Scorer, train_blocks, out: Path, s: PipelineSettings, say, console) -> tuple:
    from hookmoe import report

    say(f"3/6 search: tolerance {100 * s.tolerance:g}% (relative perplexity rise on validation blocks)")
    sr = search(mm, val, tolerance=s.tolerance, step=s.group, max_evals=s.max_evals, hook=True,
                hook_candidates=s.hook_candidates, train_blocks=train_blocks,
                hook_steps=s.search_hook_steps, hook_lr=s.hook_lr, hook_batch_size=s.hook_batch_size,
                hook_objective=s.objective, log_path=out / "search_log.jsonl", console=console)
    splan = search_plan(sr)
    splan.save(out / "plan.json")
    report.write_json(out / "search.json", {k: v for k, v in sr.items() if k != "log"})
    return sr, splan


def _hook_plan(mm, sr: dict, val_blocks, s: PipelineSettings, say, progress: bool) -> tuple:
    """(the reduced plan the Hook is trained for, its layer, the allocation or None)."""
    hook_plan = sr["hook"]["plan"] if sr.get("hook") else f"topk:{max(1, sr['k'] - 1)}"
    hook_layer = sr["hook"]["layer"] if sr.get("hook") else default_hook_layer(mm)
    if s.allocator == "uniform":
        return hook_plan, hook_layer, None
    # the reduced plan comes from an allocator (search/allocators.py) at the same Act
    from hookmoe.search.allocators import get_allocator, plan_ks

    ks0 = plan_ks(mm, hook_plan)
    target = float(s.act) if s.act is not None else sum(ks0.values()) / len(ks0)
    say(f"3/6 allocate: {s.allocator} at Act {target:g} (sensitivity on the validation blocks)")
    ap = get_allocator(s.allocator).allocate(mm, target_act=target, calib=val_blocks, progress=progress)
    return ap.base, hook_layer, ap.meta["allocation"]


def _pipeline_evals(mm, searched: str, hook_plan: str, eval_blocks, mc_items, s: PipelineSettings,
                    progress: bool) -> dict[str, dict]:
    """Held-out scores of native, the searched plan and the Hook's plan with and without the Hook; the Hook is
    removed afterwards."""
    from hookmoe.hook.inject import get_hooks

    hs = get_hooks(mm)
    if hs is None:
        raise SearchError("hook training finished but left no Hook attached to the model")
    evals: dict[str, dict] = {}
    plans = [("native", "native", False), ("searched plan", searched, False),
             ("reduced (no hook)", hook_plan, False), ("reduced + hook", hook_plan, True)]
    if searched != "native" and searched != hook_plan:
        plans.append(("searched plan + hook", searched, True))
    done: dict[tuple, dict] = {}
    for label, plan, with_hook in plans:
        key = (Plan.parse(plan).describe(), with_hook)
        if key not in done:
            with contextlib.nullcontext() if with_hook else hs.disabled():
                r = evaluate(mm, plan, metric="ppl", blocks=eval_blocks, batch_size=s.batch_size, progress=progress)
                if mc_items is not None:
                    r["mc"] = evaluate(mm, plan, metric="mc", items=mc_items, batch_size=s.batch_size,
                                       progress=progress)
            done[key] = r
        evals[label] = dict(done[key], label=label, with_hook=with_hook)
    _remove_hooks(mm)
    return evals


def _summary(mm, s: PipelineSettings, sw: dict | None, sr: dict, splan: Plan, evals: dict, allocation: dict | None,
             timings: dict, *, model_name: str | None, command: str | None, hook: dict) -> dict:
    nat, red, hk = evals["native"], evals["reduced (no hook)"], evals["reduced + hook"]
    gap_mc = None
    if "mc" in nat:
        gap_mc = _gap_recovered(nat["mc"]["score"], red["mc"]["score"], hk["mc"]["score"])
    return {
        "model": model_name or mm.source, "command": command, "calib": s.calib, "data": s.data or s.calib,
        "tolerance": s.tolerance, "block_len": s.block_len, "n_train": s.n_train, "n_val": s.n_val,
        "n_eval": s.n_eval, "search": {k: v for k, v in sr.items() if k != "log"}, "plan": splan.to_dict(),
        "allocation": allocation, "hook": hook, "evals": evals,
        "gap_recovered": _gap_recovered(nat["score"], red["score"], hk["score"]), "gap_recovered_mc": gap_mc,
        "timings_s": timings, "sweep": None if sw is None else {k: v for k, v in sw.items() if k != "rows"},
    }


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
