"""``hookmoe train``: train a Hook (or another compensator) while the model runs a reduced plan.

Options: :class:`hookmoe.training.config.TrainOptions`. Steps: check ``--out`` (never replace a run without
``--overwrite``; ``--resume`` needs a checkpoint) → join the process group under torchrun → load the model and
the calibration blocks → train (in place, or next to an existing folder when overwriting) → print the summary.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hookmoe.hook.inject import parse_layers
from hookmoe.training.checkpoint import _find_checkpoint
from hookmoe.training.config import LOG_NAME, PLOT_NAME, TRAINER_STATE, TrainOptions
from hookmoe.training.loop import train_hook


def register_cli(app) -> None:
    from hookmoe.cli.options import options_command

    options_command(app, "train", TrainOptions)(train_cmd)


def train_cmd(o: TrainOptions) -> None:
    """Train a Hook (or another --kind of compensator) at --layer while the model runs --plan; writes the artifact
    to --out."""
    from hookmoe.cli.common import check_json_out
    from hookmoe.files import atomic_dir
    from hookmoe.training import distributed

    out, in_place = _check_out(o)
    check_json_out(o.as_json)
    ctx = distributed.init_from_env()  # torchrun / accelerate launch: rank 0 alone writes and shows progress
    progress = o.progress and ctx.is_main
    mm, layers, train_blocks, val_blocks = _load(o, ctx, progress)
    # a new (or empty) --out, or a resumed run: train in place, so a checkpoint survives Ctrl-C;
    # --overwrite of an existing folder: train next to it and swap only once the new artifact is complete
    where = contextlib.nullcontext(out) if in_place or not ctx.is_main else atomic_dir(out)
    try:
        with where as work:
            result = train_hook(
                mm, layers=layers, plan=o.plan, train_blocks=train_blocks, val_blocks=val_blocks, out_dir=work,
                resume=o.resume, progress=progress, **o.settings(),
                data_info={"calib": o.calib, "val_data": o.val_data or o.calib, "samples": o.samples,
                           "seq_len": o.seq_len, "val_samples": o.val_samples, "model": o.model})
    except KeyboardInterrupt as e:
        _say_what_was_kept(e, out, in_place, ctx)
        raise
    if ctx.is_main:
        _report(o, out, result)


def _check_out(o: TrainOptions) -> tuple[Path, bool]:
    """``--out`` checked against ``--resume`` / ``--overwrite`` before any work; returns it and whether the run
    trains in place (a new or empty folder, or a resumed run)."""
    from hookmoe.cli.common import fail
    from hookmoe.files import check_output, overwrite_allowed

    def has_checkpoint(p: Path) -> bool:
        return _find_checkpoint(p) is not None

    out = check_output(o.out, kind="dir", flag="--out", resumable=lambda p: o.resume or has_checkpoint(p))
    if o.resume and not (out.is_dir() and has_checkpoint(out)):
        fail(f"--resume: {out} holds no checkpoint to continue (start a new run without --resume)")
    in_place = o.resume or not (out.is_dir() and any(out.iterdir()))
    if not in_place and not overwrite_allowed() and has_checkpoint(out):
        fail(f"--out {out} holds a training run's checkpoint; pass --resume to continue it or --overwrite to start "
             "over")
    return out, in_place


def _load(o: TrainOptions, ctx, progress: bool):
    """The model (on this rank's devices), the layers to compensate and the train / validation blocks."""
    from hookmoe.cli.common import fail
    from hookmoe.data.blocks import make_blocks
    from hookmoe.errors import DataError
    from hookmoe.hook import load

    load_kw = o.load_kwargs()
    placement = {k: load_kw.pop(k) for k in ("device_map", "max_memory", "offload_folder") if k in load_kw}
    load_kw["device"] = ctx.device(o.device)
    mm = load(o.model, seed=o.seed, **load_kw, **ctx.localize_placement(placement))
    layers = o.layer if o.layer.strip().lower() == "auto" else parse_layers(o.layer, mm)
    try:
        train_blocks = make_blocks(mm.tokenizer, o.calib, o.samples, o.seq_len, seed=o.seed, split="train",
                                   progress=progress)
        val_blocks = None
        if o.val_samples > 0:
            val_blocks = make_blocks(mm.tokenizer, o.val_data or o.calib, o.val_samples, o.seq_len, seed=o.seed,
                                     split="heldout", progress=progress)
    except DataError as e:
        fail(str(e))
    return mm, layers, train_blocks, val_blocks


def _say_what_was_kept(e: BaseException, out: Path, in_place: bool, ctx) -> None:
    """On Ctrl-C or another rank's failure: the line that says what survived and how to go on."""
    from hookmoe.cli.common import INTERRUPTED
    from hookmoe.training import distributed

    why = "interrupted"
    if isinstance(e, distributed.RankStopped):
        why = f"rank {ctx.rank} stopped because another rank failed (see the launcher's report)"
    ck = _find_checkpoint(out) if in_place and out.is_dir() and ctx.is_main else None
    if ck is not None:
        try:
            step_no = json.loads((ck / TRAINER_STATE).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            step_no = "?"
        INTERRUPTED.set(f"{why}: checkpoint of step {step_no} kept in {ck}; continue with the same command and "
                        "--resume")
    elif not ctx.is_main:
        INTERRUPTED.set(why)
    elif in_place:
        INTERRUPTED.set(f"{why} before the first checkpoint: nothing to resume in {out}; run the command again to "
                        "start over")
    else:
        INTERRUPTED.set(f"{why}: {out} was left as it was (nothing replaced); run the command again to start over")


def _report(o: TrainOptions, out: Path, result) -> None:
    """The held-out table (KD and LM loss without / with the compensator), the run's numbers, and --json."""
    from rich.table import Table

    from hookmoe.cli.common import console, write_json

    m = result.metrics
    layers = result.config.layers
    hs = result.hookset
    summary = {"out": str(out), "model": o.model, "plan": hs.plan.describe() if hs.plan else o.plan,
               "kind": hs.kind, "layers": layers, "objective": o.objective, **m}
    if o.as_json is not None and str(o.as_json) == "-":
        write_json(summary, None)
        return
    t = Table(title=f"hookmoe train: {o.model} · {o.plan} · {hs.kind} at {layers}", show_header=True)
    for col, justify in (("held-out", "left"), ("no hook", "right"), ("with hook", "right"), ("native", "right"),
                         ("gap closed", "right")):
        t.add_column(col, justify=justify)
    if "val_kd" in m:
        t.add_row("KD (KL to native)", f"{m['val_kd_nohook']:.4f}", f"{m['val_kd']:.4f}", "0",
                  f"{100 * m['kd_gap_closed']:.1f}%")
        t.add_row("LM loss", f"{m['val_lm_nohook']:.4f}", f"{m['val_lm']:.4f}", f"{m['val_lm_native']:.4f}",
                  f"{100 * m['lm_gap_closed']:.1f}%")
        console.print(t)
    frac = hs.describe()["params_fraction_of_model"]
    console.print(f"{m['steps']} steps, {m['tokens']:,} tokens, {m['tokens_per_s']:,.0f} tok/s, "
                  f"{m['wall_time_s']:.1f} s; hook params {m['hook_params']:,} ({100 * frac:.2f}% of the model)"
                  + (" — stopped early" if m["stopped_early"] else ""))
    console.print(f"artifact: {out}/hook.safetensors + hookmoe.json; log {out}/{LOG_NAME}; plot {out}/{PLOT_NAME}")
    if o.as_json is not None:
        write_json(summary, o.as_json)
