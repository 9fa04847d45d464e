"""``hookmoe export``: a self-contained directory with the model, its plan and its Hooks (options:
:class:`hookmoe.serving.export.ExportOptions`)."""

from __future__ import annotations

from hookmoe.serving.export import ExportOptions, run_export


def register_cli(app) -> None:
    from hookmoe.cli.common import console
    from hookmoe.cli.options import options_command

    @options_command(app, "export", ExportOptions)
    def export_cmd(o: ExportOptions) -> None:
        """Write MODEL + hook + plan to one directory that `hookmoe.load(OUT)` restores (--target: for an engine)."""
        console.print(run_export(o))
