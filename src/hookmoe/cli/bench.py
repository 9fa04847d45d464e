"""``hookmoe bench``: TTFT / ITL of several plans and Hooks, interleaved, with their theoretical limits (options:
:class:`hookmoe.speed.bench.BenchOptions`)."""

from __future__ import annotations

from pathlib import Path

from hookmoe.report import bench_extra_tables, bench_speedups, bench_table
from hookmoe.speed.bench import BenchOptions, run_bench


def _command_line() -> str:
    """The command as typed (arguments and the options given on the command line), for the results JSON."""
    import shlex

    try:  # typer >= 0.20 vendors its own click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click import get_current_context

    ctx = get_current_context()
    words = ["hookmoe", ctx.info_name or "bench"]
    for param in ctx.command.params:
        try:
            src = ctx.get_parameter_source(param.name)
        except AttributeError:  # pragma: no cover - very old click
            src = None
        if src is not None and getattr(src, "name", "") != "COMMANDLINE":
            continue
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            words.append(shlex.quote(str(value)))
            continue
        if getattr(param, "is_flag", False):
            words.append(max(param.opts, key=len) if value else max(param.secondary_opts or param.opts, key=len))
            continue
        flag = max(param.opts, key=len)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, shlex.quote(str(v))]
    return " ".join(words)


def register_cli(app) -> None:
    from hookmoe.cli.common import check_json_out, console, write_json
    from hookmoe.cli.options import options_command

    @options_command(app, "bench", BenchOptions)
    def bench_cmd(o: BenchOptions) -> None:
        """TTFT / ITL of routing plans (and hooks), interleaved, with theoretical limits and efficiency."""
        as_json = o.as_json
        to_stdout = as_json is not None and str(as_json) == "-"
        check_json_out(as_json)
        png = o.plot_path
        if png is None and as_json is not None and not to_stdout:
            png = Path(as_json).with_suffix(".png")
        check_json_out(png, "--plot")

        def note(line: str) -> None:
            if not to_stdout:
                console.print(f"note: {line}")

        res = run_bench(o, progress=o.progress, note=note)
        res["command"] = _command_line()
        if not to_stdout:
            console.print(bench_table(res))
            for extra in bench_extra_tables(res):
                console.print(extra)
            chk = res["checks"].get("greedy_tokens_identical_to_reference")
            if chk:
                bad = [k for k, x in chk.items() if not x]
                console.print("greedy tokens, fast runtime vs stock transformers: "
                              + ("identical" if not bad else "DIFFERENT for " + ", ".join(bad)))
        if png is not None:
            bench_speedups(res, png)
            res["plot"] = str(png)
        if as_json is not None:
            write_json(res, None if to_stdout else as_json)
            if not to_stdout:
                console.print(f"wrote {as_json}" + (f" and {png}" if png else ""))
