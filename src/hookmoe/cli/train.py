"""``hookmoe train``: train a Hook at a layer while the model runs a reduced plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


from hookmoe.hook.compensators import DEFAULT_KIND, parse_budget, parse_kind
from hookmoe.hook.module import DEFAULT_INIT
from hookmoe.hook.inject import parse_layers
from hookmoe.training.checkpoint import _find_checkpoint
from hookmoe.training.config import DEFAULT_OBJECTIVE, LOG_NAME, PLOT_NAME, TRAINER_STATE
from hookmoe.training.loop import train_hook


def register_cli(app) -> None:
    import typer

    from hookmoe.cli.common import MODEL_HELP, PLAN_HELP, console, fail, placement_kwargs, placement_options
    from hookmoe.cli.common import write_json

    @app.command("train")
    @placement_options
    def train_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        plan: str = typer.Option(..., help=PLAN_HELP + " (the reduced routing the Hook compensates)"),
        layer: str = typer.Option("auto", help="MoE layer(s) to compensate: 14, 14,15, 12-14, all (every MoE layer) or "
                                  "auto (chosen from a per-layer sensitivity profile)"),
        kind: str = typer.Option(DEFAULT_KIND, help="compensator: hook (the paper's, before the router) | router "
                                 "(router retune) | output (low-rank correction on the MoE output) | hook+router | ..."),
        budget: Optional[str] = typer.Option(None, help="parameter budget, e.g. 0.5% of the model: sets the Hook "
                                             "width / output rank (and how many layers auto picks)"),
        rank: Optional[int] = typer.Option(None, min=1, help="output correction rank (default: half an expert's width)"),
        calib: str = typer.Option("builtin", help="calibration text: builtin, c4, math, hf:ID, a file or folder"),
        out: Path = typer.Option(..., help="output directory (artifact, checkpoint, log, loss.png)"),
        objective: str = typer.Option(DEFAULT_OBJECTIVE, help="kd (KL to the native model) | lm | hidden"),
        steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default: --epochs over the data)"),
        epochs: float = typer.Option(3.0, help="passes over the calibration samples when --steps is not given "
                                     "(LLaMA-Factory's default, which the paper used)"),
        samples: int = typer.Option(128, min=1, help="calibration samples (paper: 512)"),
        seq_len: int = typer.Option(256, min=2, help="tokens per sample (paper: 2048)"),
        val_samples: int = typer.Option(16, min=0, help="held-out samples for validation (0 = none)"),
        val_data: Optional[str] = typer.Option(None, help="held-out text source (default: --calib, heldout split)"),
        batch_size: int = typer.Option(4, min=1, help="blocks per micro-batch (per rank under torchrun)"),
        grad_accum: int = typer.Option(1, min=1, help="micro-batches per optimizer step"),
        lr: float = typer.Option(1e-4, help="AdamW learning rate (paper: 1e-4)"),
        weight_decay: float = typer.Option(0.0),
        warmup: float = typer.Option(0.05, help="warm-up: fraction of the steps (<1) or steps (>=1)"),
        schedule: str = typer.Option("cosine", help="cosine | linear | constant"),
        max_grad_norm: float = typer.Option(1.0, help="gradient clipping (0 = off)"),
        eval_every: Optional[int] = typer.Option(None, min=1, help="steps between validations (default: ~10 per run)"),
        patience: int = typer.Option(0, min=0, help="early stopping: stop after this many validations without "
                                     "improvement and keep the best weights (0 = never)"),
        checkpoint_every: Optional[int] = typer.Option(None, min=1, help="steps between checkpoints (default: eval)"),
        init: str = typer.Option(DEFAULT_INIT, help="zero (starts as the identity) | paper (nn.Linear init)"),
        inner_size: Optional[int] = typer.Option(None, min=1, help="Hook width (default: the paper's, see info)"),
        kd_temperature: float = typer.Option(1.0, help="KD temperature"),
        kd_topk: int = typer.Option(32, min=0, help="kd: cache the teacher's top-K log-probs once instead of "
                                    "running the teacher every step (0 = exact teacher every step)"),
        hidden_layer: Optional[int] = typer.Option(None, help="hidden objective: match this decoder layer's output "
                                                   "(default: after the final norm)"),
        grad_checkpointing: bool = typer.Option(False, help="recompute activations in backward (saves memory)"),
        amp: str = typer.Option("auto", help="auto (bf16 autocast on CUDA) | bf16 | off"),
        resume: bool = typer.Option(False, help="continue the run checkpointed in --out"),
        seed: int = typer.Option(0),
        device: str = typer.Option("auto", help="cpu | cuda | auto"),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        no_progress: bool = typer.Option(False, help="no progress bar"),
        as_json: Optional[Path] = typer.Option(None, "--json", help="also write the final metrics here ('-' = stdout)"),
    ):
        """Train a Hook (or another --kind of compensator) at --layer while the model runs --plan; writes the artifact
        to --out."""
        from hookmoe.errors import DataError
        from hookmoe.data.blocks import make_blocks
        from hookmoe.files import check_output, overwrite_allowed
        from hookmoe.hook import load
        from hookmoe.training import distributed

        parse_kind(kind)  # bad --kind / --budget before the model loads
        if budget is not None:
            parse_budget(budget)
        from hookmoe.cli.common import check_json_out

        def has_checkpoint(p: Path) -> bool:
            return _find_checkpoint(p) is not None

        out = check_output(out, kind="dir", flag="--out", resumable=lambda p: resume or has_checkpoint(p))
        if resume and not (out.is_dir() and has_checkpoint(out)):
            fail(f"--resume: {out} holds no checkpoint to continue (start a new run without --resume)")
        in_place = resume or not (out.is_dir() and any(out.iterdir()))
        if not in_place and not overwrite_allowed() and has_checkpoint(out):
            fail(f"--out {out} holds a training run's checkpoint; pass --resume to continue it or "
                 "--overwrite to start over")
        check_json_out(as_json)
        from hookmoe.routing.plan import Plan

        Plan.parse(plan)  # a malformed plan fails before the model loads and the data is read
        # torchrun / accelerate launch: join the process group; rank 0 alone writes and shows progress
        ctx = distributed.init_from_env()
        if not ctx.is_main:
            no_progress = True
        mm = load(model, device=ctx.device(device), dtype=dtype, seed=seed,
                  **ctx.localize_placement(placement_kwargs()))
        layers = layer if layer.strip().lower() == "auto" else parse_layers(layer, mm)
        try:
            train_blocks = make_blocks(mm.tokenizer, calib, samples, seq_len, seed=seed, split="train",
                                       progress=not no_progress)
            val_blocks = None
            if val_samples > 0:
                val_blocks = make_blocks(mm.tokenizer, val_data or calib, val_samples, seq_len, seed=seed,
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
                    mm, layers=layers, plan=plan, train_blocks=train_blocks, val_blocks=val_blocks,
                    objective=objective, steps=steps, epochs=None if steps else epochs, lr=lr, batch_size=batch_size,
                    out_dir=work, resume=resume, progress=not no_progress, grad_accum=grad_accum,
                    weight_decay=weight_decay, warmup=warmup, schedule=schedule, max_grad_norm=max_grad_norm or None,
                    eval_every=eval_every, patience=patience or None, checkpoint_every=checkpoint_every, init=init,
                    inner_size=inner_size, rank=rank, kind=kind, budget=budget, kd_temperature=kd_temperature,
                    kd_topk=kd_topk or None,
                    hidden_layer=hidden_layer,
                    grad_checkpointing=grad_checkpointing, amp=amp, seed=seed,
                    data_info={"calib": calib, "val_data": val_data or calib, "samples": samples, "seq_len": seq_len,
                               "val_samples": val_samples, "model": model},
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
                   else plan, "kind": result.hookset.kind, "layers": layers, "objective": objective, **m}
        if as_json is not None and str(as_json) == "-":
            write_json(summary, None)
            return
        from rich.table import Table

        t = Table(title=f"hookmoe train: {model} · {plan} · {result.hookset.kind} at {layers}", show_header=True)
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
