"""``hookmoe export``: a self-contained directory with the model, its plan and its Hooks."""

from __future__ import annotations

from hookmoe.errors import ArtifactError

from pathlib import Path
from typing import Optional
from hookmoe.hook.artifact import _check_compat, read_manifest
from hookmoe.hook.export import export_model




def register_cli(app) -> None:
    import typer

    from hookmoe.cli.common import MODEL_HELP, PLAN_HELP, console, load_model, placement_options

    @app.command("export")
    @placement_options
    def export_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        hook: Optional[Path] = typer.Option(None, help="hook artifact directory (from `hookmoe train`)"),
        out: Path = typer.Option(..., help="output directory"),
        plan: Optional[str] = typer.Option(None, help=PLAN_HELP + " (default: the plan the hook was trained for)"),
        target: Optional[str] = typer.Option(None, help="vllm | transformers: an engine-ready export (a plain "
                                             "checkpoint for a uniform topk:K without --hook; see docs/serving.md)"),
        device: str = typer.Option("cpu", help="cpu | cuda | auto"),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        seed: int = typer.Option(0, help="seed for tiny:<arch> models"),
    ):
        """Write MODEL + hook + plan to one directory that `hookmoe.load(OUT)` restores (--target: for an engine)."""
        from hookmoe.files import check_output

        check_output(out, kind="dir", flag="--out")
        if target is not None:
            from hookmoe.serving.export import TARGETS, export_for_engine

            if target not in TARGETS:
                raise ArtifactError(f"unknown --target '{target}' (use one of: {', '.join(TARGETS)})")
            if hook is not None:
                read_manifest(hook)
            mm = load_model(model, device=device, dtype=dtype, seed=seed)
            r = export_for_engine(mm, out, plan=plan, hook=hook, target=target)
            console.print(f"exported {model} ({r.format} checkpoint for {r.target}: {', '.join(r.architectures)}; "
                          f"plan {r.plan}; hooks {r.hook_layers or 'none'}) to {r.path}")
            return
        if hook is None:
            raise ArtifactError("export needs --hook DIR (or --target vllm|transformers for an engine export)")
        m = read_manifest(hook)  # fail early on a bad artifact, before loading the model
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        _check_compat(mm, m, hook, strict=True)
        path = export_model(mm, out, plan=plan, hook=hook)
        from hookmoe.routing.plan import Plan

        p = Plan.parse(plan).describe() if plan else (Plan.from_dict(m["plan"]).describe() if m.get("plan") else "native")
        console.print(f"exported {model} + hook {hook} (layers {m['_layers']}) + plan {p} to {path}")
