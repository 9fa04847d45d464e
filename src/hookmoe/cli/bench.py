"""``hookmoe bench``: TTFT / ITL of several plans and Hooks, interleaved, with their theoretical limits."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer
from hookmoe.errors import BenchError
from hookmoe.speed.shapes import PRESETS
from hookmoe.speed.bench import BenchConfig, DEFAULT_LENGTHS, DEFAULT_LENGTHS_TEXT, _busy_note, _max_positions, bench, parse_variants
from hookmoe.report import bench_extra_tables, bench_speedups, bench_table
from hookmoe.speed.shapes import random_model



def _command_line(ctx) -> str:
    """The command as typed (arguments and the options given on the command line), for the results JSON."""
    import shlex

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
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value:
                words.append(flag)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, shlex.quote(str(v))]
    return " ".join(words)


def _int_list(text: str, what: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise BenchError(f"{what} must be comma-separated whole numbers (or none), got '{text}'") from None
    if any(v < 1 for v in vals):
        raise BenchError(f"{what} must be positive whole numbers, got '{text}'")
    return vals


def register_cli(app) -> None:
    from hookmoe.cli.common import MODEL_HELP, PLAN_HELP, console, placement_kwargs, placement_options
    from hookmoe.cli.common import check_json_out, write_json

    @app.command("bench")
    @placement_options
    def bench_cmd(
        ctx: typer.Context,
        model: str = typer.Argument(..., help=MODEL_HELP + "; with --random-weights also a preset: "
                                    + ", ".join(PRESETS)),
        plan: Optional[list[str]] = typer.Option(None, "--plan", help=PLAN_HELP + " (repeat; the first is the base; "
                                                 "PLAN@HOOK adds a hook; default: native and topk:1)"),
        hook: Optional[list[str]] = typer.Option(None, "--hook", help="hook directory or random[:LAYER] "
                                                 "(repeat); each is added to every plan after the first"),
        random_weights: bool = typer.Option(False, "--random-weights", help="build the model from its config "
                                            "(or preset) with random weights"),
        layers: Optional[int] = typer.Option(None, "--layers", help="with --random-weights: decoder layers"),
        scale: float = typer.Option(1.0, "--scale", help="with --random-weights: divide hidden/intermediate/"
                                    "vocab sizes and heads by this"),
        lengths: str = typer.Option(DEFAULT_LENGTHS_TEXT, "--lengths",
                                    help="TTFT prompt lengths (comma-separated; none = ITL only)"),
        new_tokens: int = typer.Option(256, "--new-tokens", help="new tokens for ITL (0 = TTFT only)"),
        itl_prompt: int = typer.Option(128, "--itl-prompt", help="prompt length for the ITL run"),
        batch_size: int = typer.Option(1, "--batch-size", help="sequences per batch"),
        repeats: int = typer.Option(5, "--repeats", help="interleaved timed repeats"),
        warmup: int = typer.Option(1, "--warmup", help="warm-up passes per variant"),
        runtime: str = typer.Option("fast", "--runtime", help="fast (hookmoe runtime) | reference (stock "
                                    "transformers generate) | both"),
        compile_: str = typer.Option("auto", "--compile", help="auto | on | off: torch.compile the decode step"),
        act: Optional[float] = typer.Option(None, "--act", help="calibrate dynamic plans to this Act first"),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (torch.set_num_threads)"),
        clock: str = typer.Option("wall", "--clock", help="wall | cpu (process CPU time, needs --threads 1: "
                                  "excludes preemption on a shared machine)"),
        device: str = typer.Option("auto", help="cpu | cuda | auto"),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        seed: int = typer.Option(0, "--seed"),
        as_json: Optional[Path] = typer.Option(None, "--json", help="write the results JSON here ('-' = stdout)"),
        plot_path: Optional[Path] = typer.Option(None, "--plot", help="bar plot PNG (default: next to --json)"),
        decode_tokens: Optional[str] = typer.Option(None, "--decode-tokens", help="greedy | random: what the "
                                                    "ITL decode steps are fed (default: random for random-weight "
                                                    "models, whose greedy outputs repeat; greedy otherwise)"),
        no_check: bool = typer.Option(False, "--no-check", help="skip the greedy-token check against the "
                                      "reference path"),
        no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    ):
        """TTFT / ITL of routing plans (and hooks), interleaved, with theoretical limits and efficiency."""
        check_json_out(as_json)
        to_file = as_json is not None and str(as_json) != "-"
        check_json_out(plot_path if plot_path is not None else
                       (Path(as_json).with_suffix(".png") if to_file else None), "--plot")
        if threads is not None:
            if threads < 1:
                raise BenchError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        comp = {"auto": "auto", "on": True, "off": False}.get(compile_)
        if comp is None:
            raise BenchError(f"--compile must be auto, on or off, got '{compile_}'")
        runtimes = {"fast": ["fast"], "reference": ["reference"], "both": ["fast", "reference"]}.get(runtime)
        if runtimes is None:
            raise BenchError(f"--runtime must be fast, reference or both, got '{runtime}'")
        name = model.split(":", 1)[1] if model.startswith("preset:") else model
        if not random_weights and (name in PRESETS or model.startswith("preset:")):
            raise BenchError(f"'{model}' is a random-weight preset: add --random-weights")
        if not random_weights and (layers is not None or scale != 1.0):
            raise BenchError("--layers and --scale need --random-weights")
        note = None
        if random_weights:
            mm = random_model(model, scale=scale, layers=layers, device=device, dtype=dtype, seed=seed)
        else:
            from hookmoe.hook import load

            mm = load(model, device=device, dtype=dtype, seed=seed, **placement_kwargs())
        maxpos = _max_positions(mm)
        if lengths == DEFAULT_LENGTHS_TEXT and maxpos is not None and max(DEFAULT_LENGTHS) >= maxpos:
            fit = tuple(sorted({max(8, maxpos // d) for d in (8, 4, 2)}))
            lengths = ",".join(map(str, fit))
            note = (f"this model takes at most {maxpos} positions: TTFT prompt lengths {lengths} instead of "
                    f"{DEFAULT_LENGTHS_TEXT}")
            if not (as_json is not None and str(as_json) == "-"):
                console.print(f"note: {note}")
        cfg = BenchConfig(lengths=_int_list(lengths, "--lengths"), new_tokens=new_tokens, itl_prompt=itl_prompt,
                          batch_size=batch_size, repeats=repeats, warmup=warmup, compile=comp, clock=clock, act=act,
                          seed=seed, check_outputs=not no_check,
                          decode_tokens=decode_tokens or ("random" if random_weights or model.startswith("tiny:")
                                                          else "greedy"))
        cfg.validate()
        variants = parse_variants(plan or [], hook or [], runtimes)
        res = bench(mm, variants, cfg, progress=not no_progress)
        res["command"] = _command_line(ctx)
        if note:
            res["settings"]["lengths_note"] = note
        busy = _busy_note(mm, clock)
        if busy and not (as_json is not None and str(as_json) == "-"):
            console.print(f"note: {busy}")
        res["model"]["random_weights"] = bool(random_weights or model.startswith("tiny:"))
        res["model"]["scale"], res["model"]["layers_arg"] = scale, layers
        to_stdout = as_json is not None and str(as_json) == "-"
        if not to_stdout:
            console.print(bench_table(res))
            for extra in bench_extra_tables(res):
                console.print(extra)
            chk = res["checks"].get("greedy_tokens_identical_to_reference")
            if chk:
                bad = [k for k, x in chk.items() if not x]
                console.print("greedy tokens, fast runtime vs stock transformers: "
                              + ("identical" if not bad else "DIFFERENT for " + ", ".join(bad)))
        png = plot_path
        if png is None and as_json is not None and not to_stdout:
            png = Path(as_json).with_suffix(".png")
        if png is not None:
            bench_speedups(res, png)
            res["plot"] = str(png)
        if as_json is not None:
            write_json(res, None if to_stdout else as_json)
            if not to_stdout:
                console.print(f"wrote {as_json}" + (f" and {png}" if png else ""))
