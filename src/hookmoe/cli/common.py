"""The ``hookmoe`` command.

Conventions for every command: long work shows a rich progress bar; ``--json`` (or a JSON file in the
output directory) for machines; bad input prints one line ``error: ...`` and exits with status 2.
Commands live in their own modules' ``cli_*`` functions only when they are large; small ones are here.
"""

from __future__ import annotations

import contextvars
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from hookmoe.errors import UserError


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run MoE LLMs with fewer experts; win the quality back with a trained Hook.")


# markup off: a model name, path or plan the user typed (``runs/x[/bold]``) is printed as is, never as rich markup
console = Console(markup=False)


err_console = Console(stderr=True, markup=False)


def fail(message: str) -> None:
    """Print one error line and exit with status 2 (bad input). ``message`` is plain text: whatever the user typed
    or a file held is shown as is, never read as markup."""
    from rich.text import Text

    line = " ".join(str(message).split()) or "bad input"
    err_console.print(Text.assemble(("error:", "red"), " ", line), highlight=False, soft_wrap=True)
    raise SystemExit(2)


@contextmanager
def progress_bars(enabled: bool):
    """While inside: transformers' / huggingface_hub's own progress bars (weight loading, downloads) on or off
    (``--no-progress``); the previous state is restored on exit."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    gguf_bar = None
    if not enabled:
        hf_logging.disable_progress_bar()
        try:  # transformers' GGUF loader uses tqdm directly, outside its own switch
            import functools

            from transformers import modeling_gguf_pytorch_utils as gguf_utils

            gguf_bar = gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
        except (ImportError, AttributeError):
            gguf_utils = None
    try:
        yield
    finally:
        if was_on and not enabled:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar


def write_json(obj, path: Optional[Path]) -> None:
    """``obj`` as JSON on stdout (``path`` None or ``-``) or to ``path``, atomically (check it first with
    :func:`check_json_out`)."""
    from hookmoe.files import atomic_write_text, json_default

    text = json.dumps(obj, indent=2, default=json_default)
    if path is None or str(path) == "-":
        print(text)
    else:
        atomic_write_text(path, text + "\n")


def check_json_out(path: Optional[Path], flag: str = "--json") -> Optional[Path]:
    """Refuse a ``--json FILE`` that is a folder, cannot be written, or exists (without --overwrite) — before
    any work."""
    from hookmoe.files import check_output

    return check_output(path, kind="file", flag=flag)


#: What a command wants said on Ctrl-C (what was kept, how to resume); set by the command while it works.
INTERRUPTED = contextvars.ContextVar("hookmoe_interrupted", default=None)


def default_plan(mm, plan: Optional[str]):
    """The plan to run: the one asked for, else an attached hook's training plan, else native."""
    if plan is not None:
        return plan
    from hookmoe.hook.inject import get_hooks

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


OVERWRITE_HELP = "replace outputs that already exist (otherwise they are refused)"

#: Commands that write no file, hence take no --overwrite.
_NO_OUTPUT = {"info"}


def _overwrite_param():
    """A typer-made ``--overwrite`` flag (so that typer's help lists it like any other option)."""
    from typer.main import get_command

    one = typer.Typer()

    @one.command()
    def _cmd(overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP)):  # pragma: no cover
        pass

    return get_command(one).params[0]


def add_overwrite(command) -> None:
    """Give a click command the generic ``--overwrite`` flag: it sets :data:`hookmoe.files.OVERWRITE` for the run
    (checked by :func:`hookmoe.files.check_output`), so command signatures need not carry it."""
    inner = command.callback
    if inner is None or getattr(inner, "_hookmoe_overwrite", False):
        return
    import functools

    own = any(p.name == "overwrite" for p in command.params) or command.name in _NO_OUTPUT
    if not own:
        command.params.append(_overwrite_param())

    @functools.wraps(inner)
    def callback(*args, **kwargs):
        from hookmoe.files import overwriting

        flag = kwargs.get("overwrite", False) if own else kwargs.pop("overwrite", False)
        token = INTERRUPTED.set(None)
        try:
            with overwriting(bool(flag)):
                return inner(*args, **kwargs)
        except KeyboardInterrupt:  # typer turns it into exit status 130 without a word: say what was kept
            err_console.print(INTERRUPTED.get() or "interrupted: no existing output was replaced; run the command "
                              "again to start over", highlight=False)
            raise
        finally:
            INTERRUPTED.reset(token)

    callback._hookmoe_overwrite = True
    command.callback = callback


def _version(argv: List[str]) -> bool:
    if argv[:1] in (["--version"], ["-V"]):
        from hookmoe._version import __version__

        print(f"hookmoe {__version__}")
        return True
    return False


def _invoke(argv: List[str]):
    """Resolve ``--config FILE.yaml`` into the command's defaults, then run the click command tree."""
    from typer.main import get_command

    from hookmoe.cli.config import command_name, load_config, record_resolved, split_config

    argv, config = split_config(argv)
    group = get_command(app)
    for name in group.list_commands(None):
        record_resolved(group.get_command(None, name))
        add_overwrite(group.get_command(None, name))
    default_map = None
    if config is not None:
        name = command_name(argv)
        command = group.get_command(None, name) if name else None
        if command is None:
            raise UserError("--config needs a command before it, e.g. `hookmoe train --config recipe.yaml`")
        default_map = {name: load_config(config, command)}
    return group.main(args=argv, prog_name="hookmoe", standalone_mode=False, default_map=default_map)


def run(argv: Optional[List[str]] = None) -> None:
    """Run ``app`` with hookmoe's error conventions (one ``error:`` line and exit 2 for bad input)."""
    try:  # typer >= 0.20 vendors its own click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    args = list(sys.argv[1:] if argv is None else argv)
    if _version(args):
        sys.exit(0)
    try:
        rv = _invoke(args)
    except UserError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except click_exc.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if getattr(e, "ctx", None) else "usage: hookmoe COMMAND --help")
        sys.exit(2)
    except click_exc.ClickException as e:
        fail(" ".join(e.format_message().split()))
    except KeyboardInterrupt:
        err_console.print(INTERRUPTED.get() or "interrupted: nothing was written over existing outputs; run the "
                          "command again to start over", highlight=False)
        sys.exit(130)
    except RecursionError:  # e.g. a JSON file nested thousands deep
        fail("input nested too deeply to read")
    except OSError as e:  # a file that vanished, a full disk, a folder made read-only mid-run: one line
        if getattr(e, "filename", None) is None:
            raise
        fail(f"cannot use {e.filename}: {e.strerror or type(e).__name__}")
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)
