"""``hookmoe frontier``: quality vs Act for every allocator x compensator, and the dynamic rules, at equal budgets.

For each target Act: each allocator (:mod:`hookmoe.allocate`) makes a static per-layer plan; each
compensator (``none``, ``hook``, ... — :data:`COMPENSATORS`, a name -> callable registry so others can be
plugged in later) is trained for that plan with the same step budget and parameter budget; the dynamic
rules (``topp``, ``ratio``, ``naee``, ``entropy``) are calibrated to the same Act
(:func:`hookmoe.routing.calibrate_plan`). Every row gets held-out perplexity, MC accuracy where items are
given, the measured Act and its wall time. Native k and uniform top-k are the reference rows.
Outputs: ``frontier.json``, ``frontier.md`` and ``frontier.png`` (quality vs Act with the Pareto frontier).

A compensator is ``fn(mm, plan, train_blocks, *, steps, param_budget, lr, batch_size, seed, val_blocks,
progress) -> dict``: it attaches its modules to ``mm`` (trained for ``plan``) and returns a dict with at least
``params`` (added parameters) and ``remove`` (a callable that detaches them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from hookmoe.errors import AllocationError
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import argument, option
from hookmoe.search.allocators import ALLOCATORS, get_allocator, measure_sensitivity
from hookmoe.search.scorer import BatchOptions
from hookmoe.errors import UserError
from hookmoe.eval.run import evaluate
from hookmoe.routing.plan import Plan
from hookmoe.errors import FrontierError

DYNAMIC_RULES = ("topp", "ratio", "naee", "entropy")
DEFAULT_DYNAMIC = ("topp", "entropy")
#: Hook learning rate for the short CPU budgets here (as search.QUICK_HOOK_LR)
FRONTIER_HOOK_LR = 1e-3




# --------------------------------------------------------------------------------------------------
# Compensators
# --------------------------------------------------------------------------------------------------


def train_compensator(mm, plan: Any, train_blocks: torch.Tensor, *, kind: str = "hook", steps: int,
                      param_budget: int | None = None, lr: float = FRONTIER_HOOK_LR, batch_size: int = 4, seed: int = 0,
                      val_blocks: torch.Tensor | None = None, progress: bool = False, layers: Any = "all") -> dict:
    """A compensator of ``kind`` (hook, router, output, hook+router, ...) trained with KD for ``plan``.

    Every MoE layer gets one. Size: ``param_budget`` parameters when given (Hook width / output rank chosen by
    :func:`hookmoe.hook.compensators.size_for_budget`; router deltas have a fixed size), else half an expert's
    width for a Hook (as ``hookmoe demo``) and the same width as the output rank.
    """
    from hookmoe.hook.inject import get_hooks, parse_layers, remove_hooks
    from hookmoe.training.loop import train_hook

    ls = parse_layers(layers, mm)
    sizes: dict[str, Any] = {}
    if param_budget is None:
        half = max(1, mm.expert_intermediate_size // 2)
        sizes = {k: half for k, part in (("inner_size", "hook"), ("rank", "output")) if part in kind.split("+")}
    t0 = time.perf_counter()
    res = train_hook(mm, layers=ls, plan=plan, train_blocks=train_blocks, val_blocks=val_blocks, steps=int(steps),
                     lr=float(lr), batch_size=min(int(batch_size), int(train_blocks.shape[0])), kind=kind,
                     budget=None if param_budget is None else str(int(param_budget)), progress=progress, seed=seed,
                     eval_every=max(1, int(steps) // 4) if val_blocks is not None else None,
                     **sizes)
    hs = get_hooks(mm)
    if hs is None:  # pragma: no cover - train_hook leaves its compensators attached
        raise FrontierError(f"{kind} training left nothing attached")
    return {"params": hs.num_params(), "layers": hs.layers, "inner_size": res.config.inner_size,
            "steps": int(steps), "train_time_s": time.perf_counter() - t0, "remove": lambda: remove_hooks(mm),
            "final_loss": (res.metrics or {}).get("final_train_loss")}


def _compensator(kind: str) -> Callable[..., dict]:
    def train(mm, plan, train_blocks, **kw):
        return train_compensator(mm, plan, train_blocks, kind=kind, **kw)

    train.__name__ = f"{kind.replace('+', '_')}_compensator"
    return train


#: Hooks in every MoE layer (the demo's default) — kept by name for existing callers.
hook_compensator = _compensator("hook")

#: name -> compensator callable (None: no compensation). Every kind of hookmoe.hook.compensators is one.
COMPENSATORS: dict[str, Optional[Callable[..., dict]]] = {
    "none": None, "hook": hook_compensator, "router": _compensator("router"), "output": _compensator("output"),
    "hook+router": _compensator("hook+router"),
}


def _parse_names(value: Any, known: Sequence[str], what: str) -> list[str]:
    if value is None:
        return []
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise FrontierError(f"unknown {what} {', '.join(bad)} (choose from: {', '.join(known)})")
    return names


def parse_acts(text: Any, mm=None) -> list[float]:
    """``"3.0,3.5"`` -> [3.0, 3.5] (checked against the model's native k when given)."""
    vals = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for v in vals:
        if str(v).strip() == "":
            continue
        try:
            a = float(v)
        except ValueError:
            raise FrontierError(f"--acts must be numbers like 3.0,3.5, got '{text}'") from None
        if not math.isfinite(a):
            raise FrontierError(f"--acts must be finite numbers, got '{text}'")
        out.append(a)
    if not out:
        raise FrontierError("--acts needs at least one target Act, e.g. --acts 3.0,3.5")
    if mm is not None:
        for a in out:
            if not 1.0 <= a <= mm.native_top_k:
                raise FrontierError(f"--acts {a:g} is out of range: between 1 and the native k ({mm.native_top_k})")
    return out


# --------------------------------------------------------------------------------------------------
# The frontier
# --------------------------------------------------------------------------------------------------


def pareto(points: Sequence[dict], higher_is_better: bool = False) -> list[dict]:
    """Points not dominated by another (lower or equal Act and better or equal score, one strictly)."""
    pts = [p for p in points if p.get("score") is not None and p.get("act") is not None]
    out = []
    for p in pts:
        dominated = False
        for q in pts:
            if q is p:
                continue
            better = q["score"] >= p["score"] if higher_is_better else q["score"] <= p["score"]
            strictly = (q["act"] < p["act"] - 1e-9) or (q["score"] != p["score"])
            if q["act"] <= p["act"] + 1e-9 and better and strictly:
                dominated = True
                break
        if not dominated:
            out.append(p)
    return sorted(out, key=lambda p: p["act"])


@dataclass(kw_only=True)
class FrontierSettings(BatchOptions):
    """The settings of a quality-vs-Act frontier: :func:`frontier`'s keyword arguments (with their defaults).
    ``allocators`` / ``compensators`` / ``dynamic``: comma-separated names or sequences of names."""

    error: ClassVar[type] = FrontierError

    allocators: str = option(",".join(ALLOCATORS), "allocators: " + ", ".join(ALLOCATORS))
    compensators: str = option("none,hook", "compensators: " + ", ".join(COMPENSATORS))
    dynamic: str = option(",".join(DEFAULT_DYNAMIC), "dynamic rules calibrated to each Act: "
                          + ", ".join(DYNAMIC_RULES) + " (empty: none)")
    steps: int = option(30, "training steps of every compensator (equal budget)", min=1)
    param_budget: Optional[int] = option(None, "max parameters a compensator may add (default: Hooks of half an "
                                         "expert's width)", min=1)
    lr: float = option(FRONTIER_HOOK_LR, "compensator learning rate", min=0, min_open=True)
    hook_batch_size: int = option(4, "blocks per compensator training step", min=1, cli=False)
    uniform: bool = option(True, "also score uniform top-k at each Act (reference rows)", cli=False)
    compensate: Optional[list[str]] = option(None, "train the compensators other than none for these allocators "
                                             "only (default: all)", cli=False)

    def check(self) -> None:
        super().check()
        self.names()

    def names(self) -> tuple[list[str], list[str], list[str]]:
        """(allocators, compensators, dynamic rules) as lists of known names."""
        return (_parse_names(self.allocators, list(ALLOCATORS), "--allocators"),
                _parse_names(self.compensators, list(COMPENSATORS), "--compensators"),
                _parse_names(self.dynamic, list(DYNAMIC_RULES), "--dynamic"))


@dataclass(kw_only=True)
class FrontierOptions(FrontierSettings, LoadOptions):
    """``hookmoe frontier``: the model, the data, the target Acts and the :class:`FrontierSettings`."""

    model: str = argument(MODEL_HELP)
    calib: str = option(help="calibration text (train split): sensitivity, dynamic-rule calibration and compensator "
                        "training")
    data: str = option(help="held-out evaluation text source")
    acts: str = option(help="target Acts, comma-separated, e.g. 3.0,3.5")
    out: Path = option(Path("frontier_out"), "output directory (frontier.json/.md/.png)")
    mc: Optional[str] = option(None, "also report multiple-choice accuracy on this MC data")
    sensitivity: Optional[Path] = option(None, "reuse a sensitivity JSON (from a previous frontier.json or allocate) "
                                         "instead of measuring it")
    block_len: int = option(128, "tokens per block", min=2)
    n_calib: int = option(8, "calibration blocks (sensitivity, dynamic rules)", min=1)
    n_train: int = option(32, "compensator training blocks", min=1)
    n_eval: int = option(16, "held-out evaluation blocks", min=1)

    def check(self) -> None:
        super().check()
        parse_acts(self.acts)
        if self.sensitivity is not None and not self.sensitivity.is_file():
            raise FrontierError(f"--sensitivity file not found: {self.sensitivity}")

    def read_sensitivity(self) -> dict | None:
        """The ``--sensitivity`` table (from a frontier.json or an allocate JSON), or None."""
        if self.sensitivity is None:
            return None
        try:
            sens = json.loads(self.sensitivity.read_text())
        except json.JSONDecodeError:
            raise FrontierError(f"--sensitivity {self.sensitivity} is not valid JSON") from None
        if isinstance(sens, dict) and "sensitivity" in sens and "rows" in sens:
            sens = sens["sensitivity"]
        return sens


class _Table:
    """The frontier's rows: held-out scoring (memoised by resolved rules) and the log line of each row."""

    def __init__(self, mm, eval_blocks: torch.Tensor, mc_items: Sequence | None, batch_size: int, console):
        self.mm, self.eval_blocks, self.mc_items, self.batch_size = mm, eval_blocks, mc_items, batch_size
        self.console = console
        self.rows: list[dict] = []
        self.memo: dict[str, dict] = {}

    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, highlight=False)

    def score(self, plan: Any) -> dict:
        """Held-out scores of ``plan``; plans with the same per-layer rules (and no compensator) are scored
        once (uniform top-3 = TLNLE at Act 3, top-4 = native, ...)."""
        from hookmoe.eval.scope import hook_signature

        key = ";".join(f"{i}={r.describe()}" for i, r in sorted(Plan.parse(plan).resolve(self.mm).items())) \
            + "|" + hook_signature(self.mm)
        if key not in self.memo:
            r = evaluate(self.mm, plan, metric="ppl", blocks=self.eval_blocks, batch_size=self.batch_size)
            out = {"ppl": r["score"], "act": r["act"], "params_active": r["params"]["active"],
                   "act_per_layer": r["act_per_layer"]}
            if self.mc_items is not None:
                m = evaluate(self.mm, plan, metric="mc", items=self.mc_items, batch_size=self.batch_size)
                out["mc_acc"] = m["score"]
            self.memo[key] = out
        return dict(self.memo[key])

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if row.get("ppl") is None:
            self.say(f"  {row['method']:<22} skipped: {row.get('note')}")
        else:
            self.say(f"  {row['method']:<22} ppl {row['ppl']:.4f}  Act {row['act']:.3f}  ({row['wall_s']:.1f} s)  "
                     f"{row.get('plan', '')}")


def frontier(mm, *, calib_blocks: torch.Tensor, eval_blocks: torch.Tensor, acts: Sequence[float],
             train_blocks: torch.Tensor | None = None, val_blocks: torch.Tensor | None = None,
             mc_items: Sequence | None = None, sensitivity: dict | None = None, console=None,
             progress: bool = False, **settings) -> dict:
    """Score every allocator x compensator and every dynamic rule at each Act in ``acts``.

    ``calib_blocks`` feed the sensitivity measurement (once, shared by every allocator and Act) and the
    calibration of the dynamic rules; ``train_blocks`` (default: ``calib_blocks``) train the compensators,
    each for ``steps`` steps with at most ``param_budget`` added parameters; ``eval_blocks`` are held out.
    ``settings``: :class:`FrontierSettings` fields, with its defaults (``compensate`` limits the compensators other
    than ``none`` to these allocators).
    """
    t_all = time.perf_counter()
    s = FrontierSettings(**settings)
    allocators, comps, dyn = s.names()
    acts = parse_acts(list(acts), mm)
    tb = train_blocks if train_blocks is not None else calib_blocks
    table = _Table(mm, eval_blocks, mc_items, s.batch_size, console)
    t = time.perf_counter()
    native = table.score("native")
    table.add({"target_act": None, "method": "native", "kind": "reference", "allocator": None, "compensator": "none",
               "plan": "native", **native, "wall_s": time.perf_counter() - t})
    sens_time = 0.0
    need_sens = any(get_allocator(a).needs_sensitivity for a in allocators)
    if need_sens and sensitivity is None:
        table.say("measuring per-layer sensitivity on the calibration blocks ...")
        t = time.perf_counter()
        sensitivity = measure_sensitivity(mm, calib_blocks, batch_size=s.batch_size, progress=progress)
        sens_time = time.perf_counter() - t
        table.say(f"  {sensitivity['evals']} evaluations in {sens_time:.1f} s")
    for act in acts:
        table.say(f"Act {act:g}")
        if s.uniform:
            _uniform_rows(table, act)
        for a in allocators:
            _allocator_rows(table, a, act, comps, s, sensitivity=sensitivity, calib_blocks=calib_blocks,
                            train_blocks=tb, val_blocks=val_blocks, progress=progress)
        for d in dyn:
            _dynamic_row(table, d, act, calib_blocks, s.batch_size)
    rows = table.rows
    front = pareto([{"score": r["ppl"], "act": r["act"], "method": r["method"]} for r in rows
                    if r.get("ppl") is not None])
    return {"format": "hookmoe-frontier/1", "model": getattr(mm, "source", None), "arch": mm.arch,
            "native_k": mm.native_top_k, "moe_layers": len(mm.layers), "acts": acts, "allocators": allocators,
            "compensators": comps, "dynamic": dyn, "steps": s.steps, "param_budget": s.param_budget, "lr": s.lr,
            "eval_tokens": int(eval_blocks.numel()), "calib_tokens": int(calib_blocks.numel()),
            "train_blocks": int(tb.shape[0]), "native_ppl": native["ppl"], "rows": rows,
            "frontier": [p["method"] + f"@{p['act']:.3f}" for p in front], "sensitivity": sensitivity,
            "sensitivity_time_s": sens_time, "time_s": time.perf_counter() - t_all}


def _uniform_rows(table: _Table, act: float) -> None:
    """The uniform top-k plans around ``act`` (reference rows)."""
    for k in sorted({max(1, math.floor(act + 1e-9)), max(1, math.ceil(act - 1e-9))}):
        t = time.perf_counter()
        table.add({"target_act": act, "method": f"uniform top-{k}", "kind": "reference", "allocator": None,
                   "compensator": "none", "plan": f"topk:{k}", **table.score(f"topk:{k}"),
                   "wall_s": time.perf_counter() - t})


def _allocator_rows(table: _Table, a: str, act: float, comps: list[str], s: FrontierSettings, *,
                    sensitivity: dict | None, calib_blocks, train_blocks, val_blocks, progress: bool) -> None:
    """Allocator ``a``'s plan at ``act``, alone and with each compensator trained for it."""
    mm = table.mm
    alloc = get_allocator(a)
    t = time.perf_counter()
    try:
        if not alloc.needs_sensitivity:  # data-free or fixed-shape: computes what it needs itself
            plan = alloc.allocate(mm, target_act=act)
        else:
            plan = alloc.allocate(mm, target_act=act, sensitivity=sensitivity, calib=calib_blocks)
    except AllocationError as e:
        table.add({"target_act": act, "method": a, "kind": "allocator", "allocator": a, "compensator": None,
                   "plan": None, "ppl": None, "act": None, "note": str(e), "wall_s": time.perf_counter() - t})
        return
    t_alloc = time.perf_counter() - t
    info = plan.meta.get("allocation", {})
    for c in comps:
        if c != "none" and s.compensate is not None and a not in s.compensate:
            continue
        t = time.perf_counter()
        fn = COMPENSATORS[c]
        handle = None
        try:
            if fn is not None:
                handle = fn(mm, plan, train_blocks, steps=s.steps, param_budget=s.param_budget, lr=s.lr,
                            batch_size=s.hook_batch_size, seed=s.seed, val_blocks=val_blocks, progress=progress)
            res = table.score(plan)
        finally:
            if handle is not None:
                handle["remove"]()
        row = {"target_act": act, "method": a if c == "none" else f"{a} + {c}", "kind": "allocator",
               "allocator": a, "compensator": c, "plan": plan.base, "ks": info.get("ks"),
               "exact": info.get("exact"), "predicted_cost": info.get("predicted_cost"),
               "uniform_check": info.get("uniform_check"), **res,
               "alloc_s": t_alloc, "wall_s": time.perf_counter() - t + t_alloc}
        if info.get("note"):
            row["note"] = info["note"]
        if handle is not None:
            row.update({"comp_params": handle.get("params"), "comp_steps": handle.get("steps"),
                        "comp_train_s": handle.get("train_time_s")})
        table.add(row)


def _dynamic_row(table: _Table, d: str, act: float, calib_blocks, batch_size: int) -> None:
    """Dynamic rule ``d`` calibrated to ``act`` on the calibration blocks."""
    from hookmoe.routing.calibrate import calibrate_plan

    t = time.perf_counter()
    start = {"topp": "topp:0.5", "ratio": "ratio:0.5", "naee": "naee", "entropy": f"entropy:{act:g}"}[d]
    try:
        plan = calibrate_plan(table.mm, start, calib_blocks, target_act=act, batch_size=batch_size)
    except UserError as e:
        table.add({"target_act": act, "method": d, "kind": "dynamic", "allocator": None, "compensator": "none",
                   "plan": None, "ppl": None, "act": None, "note": str(e), "wall_s": time.perf_counter() - t})
        return
    table.add({"target_act": act, "method": d, "kind": "dynamic", "allocator": None, "compensator": "none",
               "plan": plan.describe(), "plan_json": plan.to_dict(), **table.score(plan),
               "wall_s": time.perf_counter() - t})


def best_rows(result: dict) -> dict[str, dict]:
    """Per target Act, the lowest-perplexity row (reference rows included)."""
    out: dict[str, dict] = {}
    for r in result["rows"]:
        if r.get("ppl") is None or r.get("target_act") is None:
            continue
        key = f"{r['target_act']:g}"
        if key not in out or r["ppl"] < out[key]["ppl"]:
            out[key] = r
    return out


def frontier_markdown(result: dict) -> str:
    from hookmoe import report

    nat = result["native_ppl"]
    mc = any("mc_acc" in r for r in result["rows"])
    head = ["target Act", "method", "perplexity", "vs native", "Act", "wall s", "plan"]
    if mc:
        head.insert(4, "MC acc")
    rows = []
    for r in result["rows"]:
        if r.get("ppl") is None:
            ta = "-" if r["target_act"] is None else f"{r['target_act']:g}"
            rows.append([ta, r["method"], "-", "-", "-", f"{r['wall_s']:.1f}", r.get("note", "")])
            if mc:
                rows[-1].insert(4, "-")
            continue
        ta = "-" if r["target_act"] is None else f"{r['target_act']:g}"
        plan = r.get("plan") or ""
        if len(plan) > 60:
            plan = plan[:57] + "..."
        row = [ta, r["method"], f"{r['ppl']:.4f}", report.pct((r["ppl"] - nat) / nat), f"{r['act']:.3f}",
               f"{r['wall_s']:.1f}", plan]
        if mc:
            row.insert(4, f"{100 * r['mc_acc']:.2f}%" if r.get("mc_acc") is not None else "-")
        rows.append(row)
    return report.markdown_table(head, rows)


def write_frontier(result: dict, out_dir: str | Path, *, title: str = "", stem: str = "frontier") -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (default ``frontier.*``) in ``out_dir``."""
    import os

    from hookmoe import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(out / f"{stem}.json", result)}
    md = [f"# {title or 'Quality vs Act frontier'}", "",
          f"Model `{result['model']}` ({result['arch']}, {result['moe_layers']} MoE layers, native k "
          f"{result['native_k']}); held-out perplexity on {result['eval_tokens']} tokens; compensators trained "
          f"{result['steps']} steps on {result['train_blocks']} blocks"
          + (f" with at most {result['param_budget']:,} parameters" if result.get("param_budget") else "")
          + f"; dynamic rules calibrated on {result['calib_tokens']} tokens. Total {result['time_s']:.1f} s "
          f"(sensitivity {result['sensitivity_time_s']:.1f} s).", "", frontier_markdown(result), "",
          "Pareto frontier (lowest perplexity for its Act): " + ", ".join(result["frontier"]), "",
          f"![quality vs Act]({stem}.png)", ""]
    tmp = out / f".{stem}.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, out / f"{stem}.md")
    paths["md"] = out / f"{stem}.md"
    paths["png"] = frontier_plot(result, out / f"{stem}.png", title=title)
    return paths


def frontier_plot(result: dict, path: str | Path, *, title: str = "") -> Path:
    """Perplexity vs Act: one colour per allocator / rule, one marker per compensator; the frontier drawn."""
    from hookmoe.report import _figure, _save

    fig = _figure(7.2, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in result["rows"] if r.get("ppl") is not None]
    families = []
    def family(r: dict) -> str:
        return r.get("allocator") or ("uniform top-k" if r["method"].startswith("uniform") else r["method"])

    for r in rows:
        fam = family(r)
        if fam not in families:
            families.append(fam)
    from matplotlib import colormaps

    colors = colormaps["tab10"]
    markers = {"none": "o", "hook": "^"}
    seen = set()
    for r in rows:
        fam = family(r)
        comp = r.get("compensator") or "none"
        label = fam if comp == "none" else f"{fam} + {comp}"
        ax.scatter([r["act"]], [r["ppl"]], color=colors(families.index(fam) % 10),
                   marker=markers.get(comp, "s"), s=40, zorder=3, label=None if label in seen else label)
        seen.add(label)
    front = pareto([{"score": r["ppl"], "act": r["act"]} for r in rows])
    if front:
        ax.step([p["act"] for p in front], [p["score"] for p in front], where="post", color="black", lw=1.0,
                ls="--", label="Pareto frontier", zorder=2)
    ax.axhline(result["native_ppl"], color="grey", lw=0.8, ls=":", label="native k")
    ax.set_xlabel("Act (activated routed experts per token)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "quality vs Act", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


