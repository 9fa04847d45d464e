"""``hookmoe train``: train a Hook at a layer while the model runs a reduced plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


from hookmoe.hook.inject import parse_layers
from hookmoe.training.checkpoint import _find_checkpoint
from hookmoe.training.config import LOG_NAME, PLOT_NAME, TRAINER_STATE, TrainOptions
from hookmoe.training.loop import train_hook


def register_cli(app) -> None:
    from hookmoe.cli.common import console, fail, write_json
    from hookmoe.cli.options import options_command

    @options_command(app, "train", TrainOptions)
    def train_cmd(o: TrainOptions) -> None:
        """Train a Hook (or another --kind of compensator) at --layer while the model runs --plan; writes the artifact
        to --out."""
        from hookmoe.errors import DataError
        from hookmoe.data.blocks import make_blocks
        from hookmoe.files import check_output, overwrite_allowed
        from hookmoe.hook import load
        from hookmoe.training import distributed

        from hookmoe.cli.common import check_json_out

        def has_checkpoint(p: Path) -> bool:
            return _find_checkpoint(p) is not None

        resume, as_json, calib, model = o.resume, o.as_json, o.calib, o.model
        no_progress = not o.progress
        out = check_output(o.out, kind="dir", flag="--out", resumable=lambda p: resume or has_checkpoint(p))
        if resume and not (out.is_dir() and has_checkpoint(out)):
            fail(f"--resume: {out} holds no checkpoint to continue (start a new run without --resume)")
        in_place = resume or not (out.is_dir() and any(out.iterdir()))
        if not in_place and not overwrite_allowed() and has_checkpoint(out):
            fail(f"--out {out} holds a training run's checkpoint; pass --resume to continue it or "
                 "--overwrite to start over")
        check_json_out(as_json)
        # torchrun / accelerate launch: join the process group; rank 0 alone writes and shows progress
        ctx = distributed.init_from_env()
        if not ctx.is_main:
            no_progress = True
        load_kw = o.load_kwargs()
        placement = {k: load_kw.pop(k) for k in ("device_map", "max_memory", "offload_folder") if k in load_kw}
        load_kw["device"] = ctx.device(o.device)
        mm = load(model, seed=o.seed, **load_kw, **ctx.localize_placement(placement))
        layers = o.layer if o.layer.strip().lower() == "auto" else parse_layers(o.layer, mm)
        try:
            train_blocks = make_blocks(mm.tokenizer, calib, o.samples, o.seq_len, seed=o.seed, split="train",
                                       progress=not no_progress)
            val_blocks = None
            if o.val_samples > 0:
                val_blocks = make_blocks(mm.tokenizer, o.val_data or calib, o.val_samples, o.seq_len, seed=o.seed,
                                         split="heldout", progress=not no_progress)
        except DataError as e:
            fail(str(e))
        import contextlib

        from hookmoe.files import atomic_dir

        # a new (or empty) --out, or a resumed run: train in place, so a checkpoint survives Ctrl-C;
        # --overwrite of an existing folder: train next to it and swap only once the new artifact is complete
        where = contextlib.nullcontext(out) if in_place or not ctx.is_main else atomic_dir(out)
        try:
            with where as work:
                result = train_hook(
                    mm, layers=layers, plan=o.plan, train_blocks=train_blocks, val_blocks=val_blocks,
                    out_dir=work, resume=resume, progress=not no_progress, **o.settings(),
                    data_info={"calib": calib, "val_data": o.val_data or calib, "samples": o.samples,
                               "seq_len": o.seq_len, "val_samples": o.val_samples, "model": model},
                )
        except KeyboardInterrupt as e:
            from hookmoe.cli.common import INTERRUPTED

            why = "interrupted"
            if isinstance(e, distributed.RankStopped):
                why = f"rank {ctx.rank} stopped because another rank failed (see the launcher's report)"
            ck = _find_checkpoint(out) if in_place and out.is_dir() and ctx.is_main else None
            if ck is not None:
                try:
                    step_no = json.loads((ck / TRAINER_STATE).read_text())["step"]
                except (OSError, ValueError, KeyError, TypeError):
                    step_no = "?"
                INTERRUPTED.set(f"{why}: checkpoint of step {step_no} kept in {ck}; continue with the same "
                                "command and --resume")
            elif not ctx.is_main:
                INTERRUPTED.set(why)
            elif in_place:
                INTERRUPTED.set(f"{why} before the first checkpoint: nothing to resume in {out}; run the "
                                "command again to start over")
            else:
                INTERRUPTED.set(f"{why}: {out} was left as it was (nothing replaced); run the command again "
                                "to start over")
            raise
        m = result.metrics
        if not ctx.is_main:
            return
        layers = result.config.layers
        summary = {"out": str(out), "model": model, "plan": result.hookset.plan.describe() if result.hookset.plan
                   else o.plan, "kind": result.hookset.kind, "layers": layers, "objective": o.objective, **m}
        if as_json is not None and str(as_json) == "-":
            write_json(summary, None)
            return
        from rich.table import Table

        t = Table(title=f"hookmoe train: {model} · {o.plan} · {result.hookset.kind} at {layers}", show_header=True)
        t.add_column("held-out")
        t.add_column("no hook", justify="right")
        t.add_column("with hook", justify="right")
        t.add_column("native", justify="right")
        t.add_column("gap closed", justify="right")
        if "val_kd" in m:
            t.add_row("KD (KL to native)", f"{m['val_kd_nohook']:.4f}", f"{m['val_kd']:.4f}", "0",
                      f"{100 * m['kd_gap_closed']:.1f}%")
            t.add_row("LM loss", f"{m['val_lm_nohook']:.4f}", f"{m['val_lm']:.4f}", f"{m['val_lm_native']:.4f}",
                      f"{100 * m['lm_gap_closed']:.1f}%")
            console.print(t)
        frac = result.hookset.describe()["params_fraction_of_model"]
        console.print(f"{m['steps']} steps, {m['tokens']:,} tokens, {m['tokens_per_s']:,.0f} tok/s, "
                      f"{m['wall_time_s']:.1f} s; hook params {m['hook_params']:,} ({100 * frac:.2f}% of the model)"
                      + (" — stopped early" if m["stopped_early"] else ""))
        console.print(f"artifact: {out}/hook.safetensors + hookmoe.json; log {out}/{LOG_NAME}; plot {out}/{PLOT_NAME}")
        if as_json is not None:
            write_json(summary, as_json)
