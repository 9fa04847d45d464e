"""The ``hookmoe`` command.

Conventions for every command: long work shows a rich progress bar; ``--json`` (or a JSON file in the
output directory) for machines; bad input prints one line ``error: ...`` and exits with status 2.
Commands live in their own modules' ``cli_*`` functions only when they are large; small ones are here.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run MoE LLMs with fewer experts; win the quality back with a trained Hook.")
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "hub id, local directory, .gguf file, tiny:<arch>, or an offline name (smollm2, gemma3-270m)"
PLAN_HELP = "native | topk:K | tlnle:k=K,l=L | layers:K0,K1,.. | topp:T | ratio:T | naee[:B] | entropy:ACT | plan.json"


def fail(message: str) -> None:
    """Print one error line and exit with status 2 (bad input)."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    raise SystemExit(2)


@contextmanager
def progress_bars(enabled: bool):
    """While inside: transformers' / huggingface_hub's own progress bars (weight loading, downloads) on or off
    (``--no-progress``); the previous state is restored on exit."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not enabled:
            hf_logging.enable_progress_bar()


def write_json(obj, path: Optional[Path]) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if path is None or str(path) == "-":
        print(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def load_model(model: str, plan: Optional[str] = None, hook: Optional[Path] = None, device: str = "auto",
               dtype: str = "auto", seed: int = 0):
    from .models import load

    return load(model, plan=plan, hook=hook, device=device, dtype=dtype, seed=seed)


def default_plan(mm, plan: Optional[str]):
    """The plan to run: the one asked for, else an attached hook's training plan, else native."""
    if plan is not None:
        return plan
    from .hook import get_hooks

    hs = get_hooks(mm)
    return hs.plan if hs is not None and hs.plan is not None else "native"


def act_table(per_layer: dict, plan_per_layer: dict | None = None, title: str = "Act per layer") -> Table:
    t = Table(title=title)
    t.add_column("layer", justify="right")
    if plan_per_layer:
        t.add_column("rule")
    t.add_column("Act", justify="right")
    for i, a in per_layer.items():
        row = [str(i)]
        if plan_per_layer:
            row.append(plan_per_layer.get(i, plan_per_layer.get(int(i), "")))
        row.append(f"{a:.3f}")
        t.add_row(*row)
    return t


@app.command()
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="print JSON"),
         device: str = typer.Option("cpu", help="cpu | cuda | auto"),
         dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16")):
    """Architecture, layers, experts, native k, shared experts, total/active parameters."""
    mm = load_model(model, device=device, dtype=dtype)
    d = mm.info()
    if as_json:
        write_json(d, None)
        return
    t = Table(title=f"hookmoe info: {model}", show_header=False)
    for k, v in d.items():
        if isinstance(v, int) and k.startswith("params"):
            v = f"{v:,}"
        t.add_row(k, str(v))
    console.print(t)


@app.command()
def generate(model: str = typer.Argument(..., help=MODEL_HELP),
             prompt: str = typer.Option(..., help="prompt text"),
             plan: Optional[str] = typer.Option(None, help=PLAN_HELP + " (default: the hook's plan, else native)"),
             hook: Optional[Path] = typer.Option(None, help="hook artifact directory"),
             max_new_tokens: int = typer.Option(32, min=1, help="tokens to generate"),
             device: str = typer.Option("auto"),
             dtype: str = typer.Option("auto"),
             as_json: Optional[Path] = typer.Option(None, "--json", help="also write a JSON result here ('-' = stdout)")):
    """Generate text (greedy) under a routing plan and print the per-layer Act table."""
    import torch

    mm = load_model(model, hook=hook, device=device, dtype=dtype)
    with mm.routing(default_plan(mm, plan)) as patch:
        enc = mm.encode(prompt)
        with torch.no_grad():
            out = mm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=mm.tokenizer.pad_token_id)
        text = mm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        per_layer = patch.stats.act_per_layer()
        result = {"model": model, "plan": patch.plan.describe(), "prompt": prompt, "text": text,
                  "act": patch.stats.act(), "act_per_layer": per_layer, "rules": patch.per_layer()}
    if as_json is not None and str(as_json) == "-":
        write_json(result, None)
        return
    shown = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)
    from rich.text import Text

    console.print(Text.assemble((prompt, "bold"), shown))
    console.print(act_table(per_layer, patch.per_layer()))
    console.print(f"overall Act = {result['act']:.3f} (native k = {mm.native_top_k})")
    if as_json is not None:
        write_json(result, as_json)


def _register_optional_commands() -> None:
    """Commands defined in their feature modules register themselves on ``app`` here."""
    import importlib

    for mod in ("hook", "train", "evaluate", "search", "bench", "convert", "demo"):
        try:
            m = importlib.import_module(f".{mod}", __package__)
        except ImportError:
            # a feature that needs a newer transformers (e.g. convert on 5.17) must not take the other
            # commands down with it; on supported versions every module imports (the tests check)
            continue
        register = getattr(m, "register_cli", None)
        if register is not None:
            register(app)


def main(argv: Optional[List[str]] = None) -> None:
    _register_optional_commands()
    try:  # typer >= 0.20 vendors its own click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    try:
        rv = app(args=argv, standalone_mode=False)
    except UserError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except click_exc.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if getattr(e, "ctx", None) else "usage: hookmoe COMMAND --help")
        sys.exit(2)
    except click_exc.ClickException as e:
        fail(" ".join(e.format_message().split()))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
