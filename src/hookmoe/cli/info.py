"""``hookmoe info`` (architecture, experts, parameters; ``--memory`` from the config alone) and ``hookmoe generate``.

Their options (:class:`InfoOptions`, :class:`GenerateOptions`) live here: no library function takes them whole
(``info --memory`` passes :class:`hookmoe.models.memory.MemoryOptions` on to ``estimate_memory``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hookmoe.models.loading import _DTYPES, DEVICE_HELP, DTYPE_HELP, MODEL_HELP, LoadOptions
from hookmoe.models.memory import DTYPE_BYTES, MemoryOptions
from hookmoe.options import argument, option
from hookmoe.routing.plan import PLAN_HELP, Plan


@dataclass(kw_only=True)
class InfoOptions(MemoryOptions, LoadOptions):
    """``hookmoe info``: the model's shape from its weights, or (``--memory``) its memory from the config alone."""

    model: str = argument(MODEL_HELP)
    as_json: bool = option(False, "print JSON", flags=("--json",))
    memory: bool = option(False, "memory estimate from the config alone (no weights)", flags=("--memory",))
    device: str = option("cpu", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP + " (--memory: auto = bf16; also fp8, int8, int4)",
                        choices=tuple(dict.fromkeys((*_DTYPES, *DTYPE_BYTES))))


@dataclass(kw_only=True)
class GenerateOptions(LoadOptions):
    """``hookmoe generate``: greedy text under a routing plan."""

    model: str = argument(MODEL_HELP)
    prompt: str = option(help="prompt text")
    plan: Optional[str] = option(None, PLAN_HELP + " (default: the hook's plan, else native)")
    hook: Optional[Path] = option(None, "hook artifact directory")
    max_new_tokens: int = option(32, "tokens to generate", min=1)
    as_json: Optional[Path] = option(None, "also write a JSON result here ('-' = stdout)", flags=("--json",))

    def check(self) -> None:
        if self.plan is not None:
            Plan.parse(self.plan)  # a malformed plan fails before the model loads


def register_cli(app) -> None:
    """``hookmoe info`` and ``hookmoe generate``."""
    from hookmoe.cli.common import act_table, check_json_out, console, default_plan, write_json
    from hookmoe.cli.options import options_command

    @options_command(app, "info", InfoOptions)
    def info(o: InfoOptions) -> None:
        """Architecture, layers, experts, native k, shared experts, total/active parameters (--memory: bytes)."""
        from rich.table import Table

        if o.memory:  # from the config alone: no weights are loaded
            from hookmoe.models.memory import estimate_memory, memory_rows

            d = estimate_memory(o.model, dtype="bf16" if o.dtype == "auto" else o.dtype, **o.estimate_kwargs())
            rows = None if o.as_json else memory_rows(d)
        else:
            from hookmoe.hook import load

            d = load(o.model, **o.load_kwargs()).info()
            rows = [(k, f"{v:,}" if isinstance(v, int) and k.startswith("params") else str(v)) for k, v in d.items()]
        if o.as_json:
            write_json(d, None)
            return
        t = Table(title=f"hookmoe info{' --memory' if o.memory else ''}: {o.model}", show_header=False)
        for k, v in rows:
            t.add_row(k, v)
        console.print(t)

    @options_command(app, "generate", GenerateOptions)
    def generate(o: GenerateOptions) -> None:
        """Generate text (greedy) under a routing plan and print the per-layer Act table."""
        import torch
        from rich.text import Text

        from hookmoe.hook import load

        check_json_out(o.as_json)
        mm = load(o.model, hook=o.hook, **o.load_kwargs())
        with mm.routing(default_plan(mm, o.plan)) as patch:
            enc = mm.encode(o.prompt)
            with torch.no_grad():
                out = mm.model.generate(**enc, max_new_tokens=o.max_new_tokens, do_sample=False,
                                        pad_token_id=mm.tokenizer.pad_token_id)
            new = [i for i in out[0, enc["input_ids"].shape[1]:].tolist() if i < len(mm.tokenizer)]  # a random
            text = mm.tokenizer.decode(new, skip_special_tokens=True)  # model may emit ids past the tokenizer's
            per_layer = patch.stats.act_per_layer()
            result = {"model": o.model, "plan": patch.plan.describe(), "prompt": o.prompt, "text": text,
                      "act": patch.stats.act(), "act_per_layer": per_layer, "rules": patch.per_layer()}
        if o.as_json is not None and str(o.as_json) == "-":
            write_json(result, None)
            return
        shown = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)
        console.print(Text.assemble((o.prompt, "bold"), shown))
        console.print(act_table(per_layer, patch.per_layer()))
        console.print(f"overall Act = {result['act']:.3f} (native k = {mm.native_top_k})")
        if o.as_json is not None:
            write_json(result, o.as_json)
