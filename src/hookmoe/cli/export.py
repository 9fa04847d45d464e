"""TODO docstring"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from hookmoe.hook.artifact import _check_compat, read_manifest
from hookmoe.hook.export import export_model




def register_cli(app) -> None:
    import typer

    from hookmoe.cli.common import MODEL_HELP, PLAN_HELP, console, load_model

    @app.command("export")
    def export_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        hook: Path = typer.Option(..., help="hook artifact directory (from `hookmoe train`)"),
        out: Path = typer.Option(..., help="output directory"),
        plan: Optional[str] = typer.Option(None, help=PLAN_HELP + " (default: the plan the hook was trained for)"),
        device: str = typer.Option("cpu", help="cpu | cuda | auto"),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        seed: int = typer.Option(0, help="seed for tiny:<arch> models"),
    ):
        """Write MODEL + hook + plan to one directory that `hookmoe.models.load(OUT)` restores."""
        from hookmoe.files import check_output

        check_output(out, kind="dir", flag="--out")
        m = read_manifest(hook)  # fail early on a bad artifact, before loading the model
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        _check_compat(mm, m, hook, strict=True)
        path = export_model(mm, out, plan=plan, hook=hook)
        from hookmoe.routing.plan import Plan

        p = Plan.parse(plan).describe() if plan else (Plan.from_dict(m["plan"]).describe() if m.get("plan") else "native")
        console.print(f"exported {model} + hook {hook} (layers {m['_layers']}) + plan {p} to {path}")
