"""``hookmoe sweep`` / ``search`` / ``compare`` / ``run``: choosing a plan and the whole pipeline."""

from __future__ import annotations

from hookmoe.search.allocators import get_allocator

from hookmoe.layerspec import parse_layer_list

from pathlib import Path
from typing import Optional


from hookmoe.errors import EvalError
from hookmoe.errors import SearchError
from hookmoe.routing.calibrate import DYNAMIC_KINDS
from hookmoe.search.compare import METHODS, compare, compare_markdown, write_compare
from hookmoe.search.paper import QUICK_HOOK_LR, search, search_plan
from hookmoe.search.pipeline import run_pipeline
from hookmoe.search.scorer import _scorer_for
from hookmoe.search.sweep import sweep, write_sweep


def _parse_int_list(text: str | None, what: str) -> list[int] | None:
    return None if text is None else parse_layer_list(text, what, SearchError)


def register_cli(app) -> None:
    import typer

    from hookmoe.cli.common import MODEL_HELP, console, load_model, placement_options

    @app.command("sweep")
    @placement_options
    def sweep_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: str = typer.Option(..., help="text source (ppl) or MC file / builtin-mc (mc)"),
        group: Optional[int] = typer.Option(None, min=1, help="layers per group (default: 8 groups)"),
        k: Optional[int] = typer.Option(None, min=2, help="base k (default: native); k-1 runs in layers l..r"),
        out: Path = typer.Option(Path("sweep_out"), help="output directory (sweep.json, sweep.csv, sweep.png)"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks (with --metric lm-eval)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[int] = typer.Option(None, help="lm-eval: examples per task"),
        n_blocks: int = typer.Option(16, min=1), block_len: int = typer.Option(256, min=2),
        split: str = typer.Option("heldout"), n_items: Optional[int] = typer.Option(None),
        no_cache: bool = typer.Option(False, "--no-cache", help="recompute lower layers for every plan"),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """Sensitivity sweep: k-1 experts in every layer range [l, r] over groups of layers; heatmap."""
        from hookmoe.files import atomic_dir, check_output

        check_output(out, kind="dir", flag="--out")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        sc = _scorer_for(mm, metric, data, n_blocks=n_blocks, block_len=block_len, seed=seed, split=split,
                         batch_size=batch_size, tasks=tasks, n_items=n_items, include_path=include_path, limit=limit)
        res = sweep(mm, sc, group=group, k=k, cache=not no_cache, progress=True)
        res["model"], res["data"] = model, data
        with atomic_dir(out) as work:
            paths = {k: out / Path(v).name for k, v in write_sweep(res, work).items()}
        _print_sweep(console, res)
        console.print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']} ({res['time_s']:.1f} s)")

    @app.command("search")
    @placement_options
    def search_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: str = typer.Option(..., help="text source scored by perplexity (or MC data with --metric mc)"),
        tolerance: float = typer.Option(0.01, help="allowed relative score drop (0.01 = 1%; ppl: relative rise)"),
        out: Path = typer.Option(Path("plan.json"), help="where to write the plan JSON"),
        log: Optional[Path] = typer.Option(None, help="JSONL log of every evaluated point (default: next to --out)"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks (with --metric lm-eval)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[int] = typer.Option(None, help="lm-eval: examples per task"),
        step: Optional[int] = typer.Option(None, min=1, help="layers per step when lowering l (default: L/8)"),
        max_evals: Optional[int] = typer.Option(None, min=1, help="cap on fresh evaluations (budget)"),
        hook: bool = typer.Option(True, "--hook/--no-hook", help="also choose the Hook layer (trains small hooks)"),
        hook_candidates: Optional[str] = typer.Option(None, help="candidate Hook layers, e.g. 8-20 (default: all MoE)"),
        hook_steps: int = typer.Option(20, min=1, help="training steps per Hook candidate"),
        hook_lr: float = typer.Option(QUICK_HOOK_LR, help="Hook learning rate (paper: 1e-4 on far more data)"),
        calib: Optional[str] = typer.Option(None, help="text source for Hook training (default: --data, train split)"),
        n_blocks: int = typer.Option(16, min=1, help="scoring blocks"), block_len: int = typer.Option(256, min=2),
        train_blocks: int = typer.Option(32, min=1, help="Hook training blocks per candidate"),
        split: str = typer.Option("heldout"), n_items: Optional[int] = typer.Option(None),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
        allocator: Optional[str] = typer.Option(None, help="per-layer allocator instead of the §3.3 search: "
                                                "tlnle, greedy, dp, weights (search/allocators.py); no Hook choice"),
        act: Optional[float] = typer.Option(None, help="with --allocator: target Act (default: --tolerance)"),
        calib_blocks: int = typer.Option(8, min=1, help="with --allocator: blocks for the sensitivity"),
    ):
        """TLNLE search (paper §3.3): lower k, then l, within the tolerance; then pick the Hook layer."""
        from hookmoe import report
        from hookmoe.eval.run import _eval_blocks

        from hookmoe.files import check_output

        if not tolerance >= 0:
            raise SearchError(f"--tolerance must be >= 0, got {tolerance}")
        if act is not None and allocator is None:
            raise SearchError("--act needs --allocator (the §3.3 search works from --tolerance)")
        if allocator is not None:
            get_allocator(allocator)  # a bad name fails before the model loads
        out = check_output(out, kind="file", flag="--out")
        if out is None or str(out) == "-":
            raise SearchError("--out must be a file name for the plan JSON")
        log_path = log or out.with_name(out.stem + "_log.jsonl")
        check_output(log_path, kind="file", flag="--log" if log else "--out (its search log)")
        check_output(out.with_name(out.stem + "_search.json"), kind="file", flag="--out (its search summary)")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        sc = _scorer_for(mm, metric, data, n_blocks=n_blocks, block_len=block_len, seed=seed, split=split,
                         batch_size=batch_size, tasks=tasks, n_items=n_items, include_path=include_path, limit=limit)
        if allocator is not None:
            alloc = get_allocator(allocator)
            src = calib or (data if metric == "ppl" else "builtin")
            cb = _eval_blocks(mm, src, calib_blocks, block_len, seed, "train", True) if alloc.needs_sensitivity \
                else None
            plan = alloc.allocate(mm, target_act=act, tolerance=None if act is not None else tolerance, calib=cb,
                                  scorer=sc if act is None else None, progress=True)
            plan.save(out)
            a = plan.meta["allocation"]
            console.print(f"plan ({a['allocator']}) {plan.base}: Act {a['act']:.4g}"
                          + (f" (target {a['target_act']:g}{'' if a['exact'] else ', nearest below'})"
                             if a.get("target_act") is not None else f" (tolerance {100 * tolerance:g}%)"))
            console.print(f"wrote {out}")
            return
        tb = None
        if hook:
            src = calib or (data if metric == "ppl" else "builtin")
            tb = _eval_blocks(mm, src, train_blocks, block_len, seed, "train", True)
        res = search(mm, sc, tolerance=tolerance, step=step, max_evals=max_evals, hook=hook,
                     hook_candidates=_parse_int_list(hook_candidates, "--hook-candidates"), train_blocks=tb,
                     hook_steps=hook_steps, hook_lr=hook_lr, log_path=log_path, console=console)
        plan = search_plan(res)
        plan.save(out)
        report.write_json(out.with_name(out.stem + "_search.json"), {k: v for k, v in res.items() if k != "log"})
        console.print(f"plan {res['plan']}: score {res['score']:.4f} (drop {100 * res['drop']:+.2f}%, "
                      f"Act {res['act']:.3f}) after {res['evals']} evaluations in {res['time_s']:.1f} s")
        if res.get("hook"):
            h = res["hook"]
            console.print(f"hook layer {h['layer']} under {h['plan']}: score {h['score']:.4f} "
                          f"(without hook {h['no_hook_score']:.4f})")
        console.print(f"wrote {out} and {log_path}")

    @app.command("compare")
    @placement_options
    def compare_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        data: str = typer.Option(..., help="text source (ppl) or MC file / builtin-mc (mc)"),
        act: float = typer.Option(..., help="target Act (activated routed experts per token)"),
        methods: Optional[str] = typer.Option(None, help="comma-separated subset of: " + ", ".join(METHODS)),
        out: Path = typer.Option(Path("compare_out"), help="output directory (compare.md/.json/.png)"),
        metric: str = typer.Option("ppl", help="ppl | mc | lm-eval"),
        tasks: Optional[str] = typer.Option(None, help="lm-eval tasks (with --metric lm-eval)"),
        include_path: Optional[Path] = typer.Option(None, help="folder with local lm-eval task YAMLs"),
        limit: Optional[int] = typer.Option(None, help="lm-eval: examples per task"),
        calib: Optional[str] = typer.Option(None, help="text source for calibration and Hook training "
                                            "(train split; default: --data for ppl, builtin otherwise)"),
        hook: Optional[Path] = typer.Option(None, help="use this Hook artifact instead of training one"),
        hook_layer: Optional[int] = typer.Option(None, help="layer for the trained Hook (default: ~0.44 depth)"),
        hook_steps: int = typer.Option(30, min=1),
        hook_lr: float = typer.Option(QUICK_HOOK_LR, help="Hook learning rate"),
        n_blocks: int = typer.Option(16, min=1), block_len: int = typer.Option(256, min=2),
        calib_blocks: int = typer.Option(8, min=1), train_blocks: int = typer.Option(32, min=1),
        split: str = typer.Option("heldout"), n_items: Optional[int] = typer.Option(None),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """All methods at a matched Act on the same data: one table (markdown + JSON) and a plot."""
        from hookmoe.eval.run import _eval_blocks
        from hookmoe.files import atomic_dir, check_output

        check_output(out, kind="dir", flag="--out")
        if hook is not None:  # a bad --hook is refused now, not turned into a note in the table
            from hookmoe.hook.artifact import read_weights

            read_weights(hook)
        ms = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        if ms:
            bad = [m for m in ms if m not in METHODS]
            if bad:
                raise SearchError(f"unknown method(s) {', '.join(bad)} (choose from: {', '.join(METHODS)})")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        if metric == "lm-eval" and not tasks:
            raise EvalError("--metric lm-eval needs --tasks")
        if not 1.0 <= act <= mm.native_top_k:
            raise SearchError(f"target Act must be between 1 and the native k ({mm.native_top_k}), got {act:g}")
        sc = _scorer_for(mm, metric, data, n_blocks=n_blocks, block_len=block_len, seed=seed, split=split,
                         batch_size=batch_size, tasks=tasks, n_items=n_items, include_path=include_path, limit=limit)
        src = calib or (data if metric == "ppl" else "builtin")
        need_cal = any(m in DYNAMIC_KINDS for m in (ms or METHODS))
        need_train = hook is None and any(m in ("hook", "hook+tlnle") for m in (ms or METHODS))
        n_cal = calib_blocks if need_cal else 0
        n_tr = train_blocks if need_train else 0
        cb = tb = None
        if n_cal + n_tr:
            both = _eval_blocks(mm, src, n_cal + n_tr, block_len, seed, "train", True)
            cb, tb = (both[:n_cal] if n_cal else None), (both[n_cal:] if n_tr else None)
        with atomic_dir(out) as work:
            res = compare(mm, sc, act, methods=ms, calib_blocks=cb, train_blocks=tb, hook_dir=hook,
                          hook_layer=hook_layer, hook_steps=hook_steps, hook_lr=hook_lr,
                          hook_out=(work / "hook") if need_train else None, console=console, batch_size=batch_size)
            res["model"], res["data"] = model, data
            paths = {k: out / Path(v).name for k, v in
                     write_compare(res, work, title=f"{model}: methods at Act {act:g}").items()}
        print(compare_markdown(res))
        console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} ({res['time_s']:.1f} s)")

    @app.command("run")
    @placement_options
    def run_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        calib: str = typer.Option(..., help="calibration text source (builtin, c4, math, hf:ID, file or folder)"),
        tolerance: float = typer.Option(0.01, help="allowed relative perplexity rise for the search (0.01 = 1%)"),
        out: Path = typer.Option(..., help="output directory (report.md, plots, hook/, JSON)"),
        data: Optional[str] = typer.Option(None, help="evaluation text source (held-out split; default: --calib)"),
        mc: Optional[str] = typer.Option(None, help="also report multiple-choice accuracy on this MC data "
                                         "(.jsonl, task.json or builtin-mc[:N])"),
        group: Optional[int] = typer.Option(None, min=1, help="layers per sweep group / search step (default L/8)"),
        block_len: int = typer.Option(128, min=2, help="tokens per block"),
        n_train: int = typer.Option(32, min=1, help="Hook training blocks"),
        n_val: int = typer.Option(8, min=1, help="validation blocks (sweep, search, Hook-layer choice)"),
        n_eval: int = typer.Option(16, min=1, help="held-out evaluation blocks"),
        search_hook_steps: int = typer.Option(20, min=1, help="training steps per Hook-layer candidate"),
        hook_steps: int = typer.Option(100, min=1, help="training steps of the final Hook"),
        hook_lr: float = typer.Option(QUICK_HOOK_LR, help="Hook learning rate (paper: 1e-4 on far more data)"),
        hook_batch_size: int = typer.Option(4, min=1),
        objective: Optional[str] = typer.Option(None, help="Hook training objective: kd | lm | hidden "
                                                "(default: hookmoe.train's)"),
        max_evals: Optional[int] = typer.Option(None, min=1, help="cap on search evaluations"),
        hook_candidates: Optional[str] = typer.Option(None, help="candidate Hook layers, e.g. 8-20"),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
        allocator: Optional[str] = typer.Option(None, help="allocate the reduced plan the Hook is trained for "
                                                "per layer: tlnle, greedy, dp, weights (default: uniform k-1)"),
        act: Optional[float] = typer.Option(None, help="with --allocator: its target Act (default: the Act of "
                                            "uniform k-1 after the search)"),
    ):
        """One command: sweep → search → train → eval → report (report.md, plots, hook artifact, JSON)."""
        import sys

        from hookmoe.files import atomic_dir, check_output

        if not tolerance >= 0:
            raise SearchError(f"--tolerance must be >= 0, got {tolerance}")
        if act is not None and allocator is None:
            raise SearchError("--act needs --allocator")
        if allocator is not None:
            get_allocator(allocator)  # a bad name fails before the model loads
        check_output(out, kind="dir", flag="--out")
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        with atomic_dir(out) as work:  # report.md, plots, hook/ land together, or not at all
            res = run_pipeline(mm, calib=calib, out=work, final_out=out, tolerance=tolerance, data=data, mc=mc,
                               group=group, block_len=block_len, n_train=n_train, n_val=n_val, n_eval=n_eval,
                               search_hook_steps=search_hook_steps, hook_steps=hook_steps, hook_lr=hook_lr,
                               hook_batch_size=hook_batch_size, objective=objective, max_evals=max_evals,
                               hook_candidates=_parse_int_list(hook_candidates, "--hook-candidates"),
                               batch_size=batch_size, seed=seed, console=console, model_name=model,
                               command="hookmoe " + " ".join(sys.argv[1:]) if sys.argv else None,
                               allocator=allocator, act=act)
        g = res["gap_recovered"]
        console.print(f"done in {res['wall_time_s']:.1f} s: plan {res['search']['plan']}, hook layer "
                      f"{res['hook']['layer']} under {res['hook']['plan']}; gap recovered "
                      f"{'n/a' if g is None else f'{100 * g:.1f}%'}; report: {Path(out) / 'report.md'}")


def _print_sweep(console, res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"sweep: k={res['k']}->{res['k'] - 1} in layers l..r (base {res['base_score']:.4f})")
    t.add_column("l \\ r")
    rs = sorted({r["r"] for r in res["rows"]})
    for r in rs:
        t.add_column(str(r), justify="right")
    for l in sorted({r["l"] for r in res["rows"]}):
        cells = []
        for r in rs:
            row = next((x for x in res["rows"] if x["l"] == l and x["r"] == r), None)
            cells.append("" if row is None else f"{row['score']:.4g} ({100 * row['drop']:+.1f}%)")
        t.add_row(str(l), *cells)
    console.print(t)
