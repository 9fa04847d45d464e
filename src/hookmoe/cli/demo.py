"""``hookmoe demo``: the whole story offline on a real-weight model (options: :class:`hookmoe.demo.DemoConfig`)."""

from __future__ import annotations

from pathlib import Path

from hookmoe.demo import DemoConfig, run_demo, table_markdown


def register_cli(app) -> None:
    from hookmoe.cli.options import options_command

    @options_command(app, "demo", DemoConfig)
    def demo(cfg: DemoConfig) -> None:
        """The whole story offline on a real-weight model: dense → MoE → fewer experts → Hook."""
        from rich.console import Console
        from rich.markdown import Markdown

        from hookmoe.cli.common import progress_bars

        with progress_bars(cfg.progress):
            result = run_demo(cfg)
        Console().print(Markdown(table_markdown(result)))
        for name, ok in result["checks"].items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        print(f"report: {Path(cfg.out) / 'report.md'}  (total {result['total_time_s']} s)")
