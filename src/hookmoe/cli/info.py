"""``hookmoe info`` (architecture, experts, parameters; ``--memory`` from the config alone) and ``hookmoe generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from hookmoe.cli.common import MODEL_HELP, PLAN_HELP, act_table, console, default_plan, load_model, placement_options
from hookmoe.cli.common import check_json_out, write_json



def register_cli(app) -> None:
    """``hookmoe info`` and ``hookmoe generate``."""

    @app.command()
    @placement_options
    def info(model: str = typer.Argument(..., help=MODEL_HELP),
             as_json: bool = typer.Option(False, "--json", help="print JSON"),
             device: str = typer.Option("cpu", help="cpu | cuda | auto"),
             dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (--memory: auto = bf16; "
                                       "also fp8, int8, int4)"),
             memory: bool = typer.Option(False, "--memory", help="memory estimate from the config alone (no weights)"),
             plan: Optional[str] = typer.Option(None, help="--memory: " + PLAN_HELP + " (default native)"),
             batch: int = typer.Option(1, help="--memory: sequences per step"),
             seq_len: int = typer.Option(2048, help="--memory: tokens per sequence"),
             gpu_memory: float = typer.Option(80.0, help="--memory: GiB per GPU for the device suggestion"),
             gpus: Optional[int] = typer.Option(None, help="--memory: also check the fit on this many GPUs"),
             hook_layer: Optional[str] = typer.Option(None, help="--memory: Hook layer(s), e.g. 14 or 14,20 "
                                                      "(default: the middle MoE layer)")):
        """Architecture, layers, experts, native k, shared experts, total/active parameters (--memory: bytes)."""
        if memory:  # from the config alone: no weights are loaded
            from hookmoe.models.memory import estimate_memory, memory_rows, parse_layers

            d = estimate_memory(model, dtype="bf16" if dtype == "auto" else dtype, plan=plan, batch=batch,
                                seq_len=seq_len, hook_layers=parse_layers(hook_layer), gpu_memory_gib=gpu_memory,
                                devices=gpus)
            rows = None if as_json else memory_rows(d)
        else:
            mm = load_model(model, device=device, dtype=dtype)
            d = mm.info()
            rows = [(k, f"{v:,}" if isinstance(v, int) and k.startswith("params") else str(v)) for k, v in d.items()]
        if as_json:
            write_json(d, None)
            return
        t = Table(title=f"hookmoe info{' --memory' if memory else ''}: {model}", show_header=False)
        for k, v in rows:
            t.add_row(k, v)
        console.print(t)


    @app.command()
    @placement_options
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

        check_json_out(as_json)
        mm = load_model(model, hook=hook, device=device, dtype=dtype)
        with mm.routing(default_plan(mm, plan)) as patch:
            enc = mm.encode(prompt)
            with torch.no_grad():
                out = mm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=mm.tokenizer.pad_token_id)
            new = [i for i in out[0, enc["input_ids"].shape[1]:].tolist() if i < len(mm.tokenizer)]  # a random
            text = mm.tokenizer.decode(new, skip_special_tokens=True)  # model may emit ids past the tokenizer's
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
