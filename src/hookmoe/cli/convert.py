"""``hookmoe convert``: a dense model into an MoE (CMoE), with optional router calibration and distillation
(options: :class:`hookmoe.cmoe.convert.ConvertOptions`)."""

from __future__ import annotations


def register_cli(app) -> None:
    try:  # the converted-model class needs transformers >= 5.23; every other command works without it
        from hookmoe.cmoe.convert import ConvertOptions
    except ImportError as e:
        _register_unavailable(app, str(e))
        return
    from hookmoe.cli.options import options_command

    @options_command(app, "convert", ConvertOptions)
    def convert(o: ConvertOptions) -> None:
        """CMoE: convert a dense model into an MoE (training-free; optional router calibration and KD fine-tune)."""
        from hookmoe.cli.common import progress_bars
        from hookmoe.cmoe.pipeline import run_convert

        with progress_bars(o.progress):  # transformers' loading bars too
            run_convert(o)
        print(f"converted {o.dense_model}: {o.experts} routed + {o.shared} shared experts per FFN, top-{o.top_k} "
              f"-> {o.out}")


def _register_unavailable(app, reason: str) -> None:
    """``hookmoe convert`` where the converted-model class cannot be imported: one line saying what is missing."""
    from hookmoe.errors import UserError

    @app.command("convert", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                 add_help_option=False)
    def convert() -> None:
        """CMoE: convert a dense model into an MoE (needs transformers >= 5.23)."""
        raise UserError(f"hookmoe convert needs transformers >= 5.23 ({reason})")
