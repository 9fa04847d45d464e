"""``hookmoe compare``: every method (static k, TLNLE, dynamic rules, Hooks) at a matched Act."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from hookmoe.errors import UserError
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import Options, argument, option
from hookmoe.routing.plan import Plan
from hookmoe.errors import SearchError
from hookmoe.routing.calibrate import DYNAMIC_KINDS, calibrate_plan
from hookmoe.search.paper import QUICK_HOOK_LR, _remove_hooks, default_hook_layer, tlnle_for_act, train_hook_at
from hookmoe.search.scorer import Scorer, ScoreOptions


METHODS = ("native", "topk", "tlnle", "topp", "ratio", "naee", "entropy", "hook", "hook+tlnle")


def parse_methods(value: Any) -> list[str]:
    """``"topk,hook"`` or a sequence of method names -> the list (all :data:`METHODS` when none is named)."""
    names = [m.strip() for m in (value.split(",") if isinstance(value, str) else value or ()) if str(m).strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise SearchError(f"unknown method(s) {', '.join(bad)} (choose from: {', '.join(METHODS)})")
    return names or list(METHODS)


def check_act(mm, act: float) -> None:
    if not 1.0 <= act <= mm.native_top_k:
        raise SearchError(f"target Act must be between 1 and the native k ({mm.native_top_k}), got {act:g}")


@dataclass(kw_only=True)
class CompareSettings(Options):
    """The settings of a method comparison: :func:`compare`'s keyword arguments (with their defaults)."""

    error: ClassVar[type] = SearchError

    methods: Optional[str] = option(None, "comma-separated subset of: " + ", ".join(METHODS))
    hook_dir: Optional[Path] = option(None, "use this Hook artifact instead of training one", flags=("--hook",))
    hook_layer: Optional[int] = option(None, "layer for the trained Hook (default: ~0.44 depth)")
    hook_steps: int = option(30, "training steps of the Hook", min=1)
    hook_lr: Optional[float] = option(QUICK_HOOK_LR, "Hook learning rate", min=0, min_open=True)
    hook_batch_size: int = option(4, "blocks per Hook training step", min=1, cli=False)
    hook_objective: Optional[str] = option(None, "Hook training objective (default: hookmoe.train's)", cli=False)

    def check(self) -> None:
        super().check()
        parse_methods(self.methods)


@dataclass(kw_only=True)
class CompareOptions(CompareSettings, ScoreOptions, LoadOptions):
    """``hookmoe compare``: the model, the scoring (:class:`ScoreOptions`), the target Act, the calibration and
    Hook-training data, and the :class:`CompareSettings`."""

    model: str = argument(MODEL_HELP)
    act: float = option(help="target Act (activated routed experts per token)", min=1)
    out: Path = option(Path("compare_out"), "output directory (compare.md/.json/.png)")
    calib: Optional[str] = option(None, "text source for calibration and Hook training (train split; default: "
                                  "--data for ppl, builtin otherwise)")
    calib_blocks: int = option(8, "blocks for calibrating the dynamic rules", min=1)
    train_blocks: int = option(32, "Hook training blocks", min=1)

    def check(self) -> None:
        super().check()
        if self.hook_dir is not None:  # a bad --hook is refused now, not turned into a note in the table
            from hookmoe.hook.artifact import read_weights

            read_weights(self.hook_dir)

    def block_counts(self) -> tuple[int, int]:
        """(calibration blocks, Hook training blocks) the chosen methods need."""
        ms = parse_methods(self.methods)
        n_cal = self.calib_blocks if any(m in DYNAMIC_KINDS for m in ms) else 0
        trains = self.hook_dir is None and any(m in ("hook", "hook+tlnle") for m in ms)
        return n_cal, self.train_blocks if trains else 0


def compare(mm, scorer: Scorer, act: float, *, calib_blocks: torch.Tensor | None = None,
            train_blocks: torch.Tensor | None = None, val_blocks: torch.Tensor | None = None,
            hook_out: str | Path | None = None, console=None, progress: bool = False,
            batch_size: int | None = None, **settings) -> dict:
    """Score every method at Act ≈ ``act`` on the scorer's data; dynamic rules calibrated on ``calib_blocks``
    (``batch_size``: the scorer's by default). ``settings``: :class:`CompareSettings` fields, with its defaults
    (``methods``: a sequence or ``"topk,hook"``; ``hook_dir``: a Hook artifact to use instead of training one)."""
    s = CompareSettings(**settings)
    methods = parse_methods(s.methods)
    hook_dir, hook_layer = s.hook_dir, s.hook_layer
    batch_size = batch_size or scorer.batch_size
    check_act(mm, act)
    t0 = time.perf_counter()
    rows: list[dict] = []
    native = scorer("native")

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False)

    def add(method: str, plan: Any, res: dict | None, note: str | None = None, **extra) -> None:
        row = {"method": method, "plan": Plan.parse(plan).describe() if plan is not None else None, **extra}
        if res is not None:
            row.update({"score": res["score"], "act": res["act"], "params_active": res["params"]["active"],
                        "params_total": res["params"]["total"], "drop": scorer.drop(native["score"], res["score"]),
                        "rules": res["rules"], "plan_json": res["plan_json"]})
        if note:
            row["note"] = note
        rows.append(row)
        if res is not None:
            say(f"  {method:<11} score {res['score']:.4f}  Act {res['act']:.3f}  {row['plan']}")
        else:
            say(f"  {method:<11} skipped: {note}")

    k_ceil = max(1, min(mm.native_top_k, int(math.ceil(act - 1e-9))))
    k_floor = max(1, min(mm.native_top_k, int(math.floor(act + 1e-9))))
    tl = None
    try:
        tl = tlnle_for_act(mm, act)
    except SearchError as e:
        tl_err = str(e)
    hook_ready = False
    for m in methods:
        try:
            if m == "native":
                add(m, "native", native)
            elif m == "topk":
                for kk in sorted({k_floor, k_ceil}):
                    add(m, f"topk:{kk}", scorer(f"topk:{kk}"))
            elif m == "tlnle":
                if tl is None:
                    add(m, None, None, tl_err)
                else:
                    add(m, tl, scorer(tl))
            elif m in DYNAMIC_KINDS:
                if calib_blocks is None:
                    raise SearchError("dynamic rules need calibration blocks")
                start = {"topp": "topp:0.5", "ratio": "ratio:0.5", "naee": "naee", "entropy": f"entropy:{act:g}"}[m]
                plan = calibrate_plan(mm, start, calib_blocks, target_act=act, batch_size=batch_size)
                add(m, plan, scorer(plan), calibration=plan.meta.get("calibration"))
            elif m in ("hook", "hook+tlnle"):
                if not hook_ready:
                    layer = hook_layer if hook_layer is not None else default_hook_layer(mm)
                    if hook_dir is not None:
                        from hookmoe.hook.inject import attach_hooks

                        hs = attach_hooks(mm, hook_dir)
                        say(f"  attached hook {hook_dir} (layers {hs.layers})")
                    else:
                        if train_blocks is None:
                            raise SearchError("the hook methods need training blocks or --hook DIR")
                        say(f"  training a hook at layer {layer} under topk:{k_floor} ({s.hook_steps} steps)")
                        train_hook_at(mm, layer, f"topk:{k_floor}", train_blocks, val_blocks, steps=s.hook_steps,
                                      lr=s.hook_lr, batch_size=s.hook_batch_size, objective=s.hook_objective,
                                      out_dir=hook_out, progress=progress)
                    hook_ready = True
                from hookmoe.hook.inject import get_hooks

                hs = get_hooks(mm)
                plan = f"topk:{k_floor}" if m == "hook" else tl
                if plan is None:
                    add(m, None, None, tl_err)
                else:
                    add(m, plan, scorer(plan), hook_layers=hs.layers if hs else None)
        except UserError as e:
            add(m, None, None, str(e))
    if hook_ready:
        _remove_hooks(mm)
    return {"act": act, "metric": scorer.metric, "higher_is_better": scorer.higher_is_better,
            "native_score": native["score"], "rows": rows, "time_s": time.perf_counter() - t0}


def compare_markdown(result: dict) -> str:
    from hookmoe import report

    pct_metric = result["metric"] in ("mc", "lm-eval")
    rows = []
    for r in result["rows"]:
        if r.get("score") is None:
            rows.append([r["method"], r.get("plan") or "-", "-", "-", "-", "-", r.get("note", "")])
            continue
        score = f"{100 * r['score']:.2f}%" if pct_metric else f"{r['score']:.4f}"
        rows.append([r["method"], r["plan"], score, f"{r['act']:.3f}", f"{r['params_active']:,}",
                     report.pct(-r["drop"] if result["higher_is_better"] else r["drop"]), r.get("note", "")])
    head = ["method", "plan", "accuracy" if pct_metric else "perplexity", "Act", "active params",
            "vs native", "note"]
    return report.markdown_table(head, rows)


def write_compare(result: dict, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    from hookmoe import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": report.write_json(out / "compare.json", result)}
    md = f"# {title or 'Method comparison'}\n\nTarget Act {result['act']:g}; metric {result['metric']}.\n\n"
    md += compare_markdown(result) + "\n"
    from hookmoe.files import atomic_write_text

    atomic_write_text(out / "compare.md", md)
    paths["md"] = out / "compare.md"
    pts = [{"label": r["plan"] if r["method"] == "topk" else r["method"], "score": r["score"], "act": r["act"]}
           for r in result["rows"] if r.get("score") is not None]
    paths["png"] = report.quality_vs_act(pts, out / "compare.png", baseline=result["native_score"],
                                         ylabel={"ppl": "perplexity"}.get(result["metric"], "accuracy"),
                                         title=title or f"quality vs Act (target {result['act']:g})")
    return paths
