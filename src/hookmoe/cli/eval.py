"""``hookmoe eval``: perplexity, multiple choice or lm-eval tasks under one or more plans, with Act per layer
(options: :class:`hookmoe.eval.run.EvalOptions`)."""

from __future__ import annotations

from hookmoe.eval.run import EvalOptions, run_eval


def register_cli(app) -> None:
    from hookmoe.cli.common import check_json_out, console, write_json
    from hookmoe.cli.options import options_command

    @options_command(app, "eval", EvalOptions)
    def eval_cmd(o: EvalOptions) -> None:
        """Perplexity, multiple-choice accuracy or lm-eval scores under one or more routing plans."""
        from hookmoe import report

        check_json_out(o.as_json)
        quiet = o.as_json is not None and str(o.as_json) == "-"

        def note(line: str) -> None:
            if not quiet:
                console.print(line, style="yellow", markup=False, highlight=False)

        doc = run_eval(o, progress=not quiet, note=note)
        if quiet:
            write_json(doc, None)
            return
        console.print(report.results_table(doc["results"], title=f"hookmoe eval: {o.model}"))
        console.print(report.act_matrix(doc["results"]))
        if o.as_json is not None:
            write_json(doc, o.as_json)
            console.print(f"wrote {o.as_json}")
