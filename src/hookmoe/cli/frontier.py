"""``hookmoe frontier``: every allocator x compensator and the dynamic rules at each target Act; table + plot."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from hookmoe.errors import FrontierError
from hookmoe.search.allocators import ALLOCATORS
from hookmoe.search.frontier import COMPENSATORS, DEFAULT_DYNAMIC, DYNAMIC_RULES, FRONTIER_HOOK_LR, _parse_names, frontier, frontier_markdown, parse_acts, write_frontier

def register_cli(app) -> None:
    import json
    import typer

    from hookmoe.cli.common import MODEL_HELP, console, load_model

    @app.command("frontier")
    def frontier_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        calib: str = typer.Option(..., help="calibration text (train split): sensitivity, dynamic-rule calibration "
                                  "and compensator training"),
        data: str = typer.Option(..., help="held-out evaluation text source"),
        acts: str = typer.Option(..., help="target Acts, comma-separated, e.g. 3.0,3.5"),
        out: Path = typer.Option(Path("frontier_out"), help="output directory (frontier.json/.md/.png)"),
        allocators: str = typer.Option(",".join(ALLOCATORS), help="allocators: " + ", ".join(ALLOCATORS)),
        compensators: str = typer.Option("none,hook", help="compensators: " + ", ".join(COMPENSATORS)),
        dynamic: str = typer.Option(",".join(DEFAULT_DYNAMIC), help="dynamic rules calibrated to each Act: "
                                    + ", ".join(DYNAMIC_RULES) + " (empty: none)"),
        steps: int = typer.Option(30, min=1, help="training steps of every compensator (equal budget)"),
        param_budget: Optional[int] = typer.Option(None, min=1, help="max parameters a compensator may add "
                                                   "(default: Hooks of half an expert's width)"),
        lr: float = typer.Option(FRONTIER_HOOK_LR, help="compensator learning rate"),
        mc: Optional[str] = typer.Option(None, help="also report multiple-choice accuracy on this MC data"),
        sensitivity: Optional[Path] = typer.Option(None, help="reuse a sensitivity JSON (from a previous "
                                                   "frontier.json or allocate) instead of measuring it"),
        block_len: int = typer.Option(128, min=2), n_calib: int = typer.Option(8, min=1),
        n_train: int = typer.Option(32, min=1), n_eval: int = typer.Option(16, min=1),
        batch_size: int = typer.Option(8, min=1), device: str = typer.Option("auto"),
        dtype: str = typer.Option("auto"), seed: int = typer.Option(0),
    ):
        """Quality vs Act: every allocator x compensator and the dynamic rules at each target Act."""
        from hookmoe.data import make_blocks

        allocs = _parse_names(allocators, list(ALLOCATORS), "--allocators")
        comps = _parse_names(compensators, list(COMPENSATORS), "--compensators")
        dyn = _parse_names(dynamic, list(DYNAMIC_RULES), "--dynamic")
        parse_acts(acts)
        sens = None
        if sensitivity is not None:
            if not sensitivity.is_file():
                raise FrontierError(f"--sensitivity file not found: {sensitivity}")
            try:
                sens = json.loads(sensitivity.read_text())
            except json.JSONDecodeError:
                raise FrontierError(f"--sensitivity {sensitivity} is not valid JSON") from None
            if isinstance(sens, dict) and "sensitivity" in sens and "rows" in sens:
                sens = sens["sensitivity"]
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        act_list = parse_acts(acts, mm)
        if mm.tokenizer is None:
            raise FrontierError("this model has no tokenizer, so --calib/--data text cannot be tokenised")
        cb = make_blocks(mm.tokenizer, calib, n_calib + (n_train if comps != ["none"] else 0), block_len,
                         seed=seed, split="train", progress=True)
        calib_blocks, train_blocks = cb[:n_calib], (cb[n_calib:] if cb.shape[0] > n_calib else cb[:n_calib])
        eval_blocks = make_blocks(mm.tokenizer, data, n_eval, block_len, seed=seed, split="heldout", progress=True)
        mc_items = None
        if mc:
            from hookmoe.eval import load_mc_source

            mc_items = load_mc_source(mc, seed=seed)
        res = frontier(mm, calib_blocks=calib_blocks, eval_blocks=eval_blocks, acts=act_list, allocators=allocs,
                       compensators=comps, dynamic=dyn, train_blocks=train_blocks, steps=steps,
                       param_budget=param_budget, lr=lr, mc_items=mc_items, sensitivity=sens,
                       batch_size=batch_size, seed=seed, console=console)
        import sys

        res["command"] = "hookmoe " + " ".join(sys.argv[1:]) if sys.argv else None
        res["model"], res["calib"], res["data"] = model, calib, data
        paths = write_frontier(res, out, title=f"{model}: quality vs Act")
        print(frontier_markdown(res))
        console.print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} ({res['time_s']:.1f} s)")
