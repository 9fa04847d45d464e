"""``hookmoe eval``: perplexity, multiple choice or lm-eval tasks under one or more plans, with Act per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


from hookmoe.routing.plan import Plan
from hookmoe.errors import EvalError
from hookmoe.eval.mc import load_mc_source
from hookmoe.eval.run import METRICS, _eval_blocks, evaluate
from hookmoe.eval.scope import _has_dynamic, needs_calibration


def register_cli(app) -> None:
    import typer

    from hookmoe.cli.common import MODEL_HELP, PLAN_HELP, console, load_model, placement_options
    from hookmoe.cli.common import check_json_out, write_json

    @app.command("eval")
    @placement_options
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
        from hookmoe import report
        from hookmoe.routing.calibrate import calibrate_plan

        check_json_out(as_json)
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
