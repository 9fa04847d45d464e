"""``hookmoe demo``: the whole story offline on a real-weight model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from hookmoe.demo import DemoConfig, run_demo, table_markdown




def register_cli(app) -> None:
    import typer

    @app.command()
    def demo(model: str = typer.Option("smollm2", help="smollm2 | gemma3-270m | path/to/dense.gguf"),
             out: Path = typer.Option(Path("demo-out"), help="report directory"),
             experts: int = typer.Option(DemoConfig.experts, help="routed experts per FFN"),
             shared: int = typer.Option(DemoConfig.shared, help="shared experts per FFN"),
             top_k: int = typer.Option(DemoConfig.top_k, help="native k of the converted MoE"),
             reduced_k: int = typer.Option(DemoConfig.reduced_k, help="reduced k for the Hook to compensate"),
             router_steps: int = typer.Option(DemoConfig.router_steps, "--calibrate-steps",
                                              help="router calibration steps (0 = training-free CMoE)"),
             finetune_steps: Optional[int] = typer.Option(
                 None, "--finetune-steps",
                 help="KD fine-tune steps of the MoE blocks (0 = off; default per model: smollm2 45, gemma3-270m 0)"),
             finetune_train: str = typer.Option(DemoConfig.finetune_train, "--finetune-train",
                                                help="what the KD fine-tune trains: moe (routers + experts), "
                                                     "experts (routers frozen) or routers"),
             hook_layers: str = typer.Option(DemoConfig.hook_layers, "--hook-layers", "--hook-layer",
                                             help="all (one Hook per MoE layer) or layers: 15, 4,15, 12-14"),
             hook_inner_size: Optional[int] = typer.Option(
                 DemoConfig.hook_inner_size, help="Hook width (default: half an expert's width; 0 = the paper's)"),
             save_moe: bool = typer.Option(DemoConfig.save_moe, "--save-moe/--no-save-moe",
                                           help="write the converted MoE to <out>/moe (hookmoe.load-able)"),
             hook_steps: Optional[int] = typer.Option(
                 None, help="Hook training steps (default per model: smollm2 90, gemma3-270m 40)"),
             eval_blocks: Optional[int] = typer.Option(
                 None, help="held-out blocks of 512 tokens (default per model: smollm2 16, gemma3-270m 4)"),
             seed: int = typer.Option(0),
             no_progress: bool = typer.Option(False, "--no-progress")):
        """The whole story offline on a real-weight model: dense → MoE → fewer experts → Hook."""
        from rich.console import Console
        from rich.markdown import Markdown

        from hookmoe.cli.common import progress_bars

        cfg = DemoConfig(model=model, out=str(out), experts=experts, shared=shared, top_k=top_k,
                         reduced_k=reduced_k, router_steps=router_steps, finetune_steps=finetune_steps,
                         finetune_train=finetune_train, save_moe=save_moe,
                         hook_layers=hook_layers, hook_inner_size=hook_inner_size,
                         hook_steps=hook_steps, eval_blocks=eval_blocks, seed=seed, progress=not no_progress)
        with progress_bars(not no_progress):
            result = run_demo(cfg)
        Console().print(Markdown(table_markdown(result)))
        for name, ok in result["checks"].items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        print(f"report: {out / 'report.md'}  (total {result['total_time_s']} s)")
