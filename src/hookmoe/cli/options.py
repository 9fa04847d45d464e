"""Commands generated from options dataclasses (:mod:`hookmoe.options`): a field is a flag, its default the
flag's default, its help the flag's help, its bounds typer's ``min``/``max``.

    @options_command(app, "train", TrainOptions)
    def train_cmd(opts: TrainOptions) -> None: ...

The command receives one validated ``opts`` object; a value out of bounds is one ``error:`` line naming the flag.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import MISSING
from typing import Any, Callable

import typer

from hookmoe.options import cli_fields


def _info(f: dataclasses.Field) -> Any:
    """The typer ``Argument``/``Option`` for field ``f``."""
    md = f.metadata
    if f.default is not MISSING:
        default = f.default
    elif f.default_factory is not MISSING:
        default = f.default_factory()
    else:
        default = ...
    text = md.get("help", "")
    if md.get("choices") and "|" not in text:
        text = (text + ": " if text else "") + " | ".join(md["choices"])
    if md.get("zero_means"):
        text += f" (0 = {md['zero_means']})"
    if md.get("positional"):
        return typer.Argument(default, help=text, show_default=default is not ...)
    kw: dict[str, Any] = {"help": text}
    if md.get("min") is not None and not md.get("min_open") and md.get("zero_means") is None:
        kw["min"] = md["min"]
    if md.get("max") is not None:
        kw["max"] = md["max"]
    return typer.Option(default, *md.get("flags", ()), **kw)


def options_signature(cls: type) -> inspect.Signature:
    """A typer-readable signature with one parameter per command-line field of ``cls``."""
    hints = typing.get_type_hints(cls)
    fields = cli_fields(cls)
    # --help order: arguments, then the command's own options, then those of the groups it inherits
    depth = {}  # a field stays with the most basic class that declares it (a subclass may only change a default)
    for i, klass in enumerate(cls.__mro__):
        for name in vars(klass).get("__annotations__", {}):
            depth[name] = i
    fields.sort(key=lambda f: (not f.metadata.get("positional"), depth.get(f.name, 0)))
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_info(f), annotation=hints[f.name])
              for f in fields]
    return inspect.Signature(params)


def options_command(app: typer.Typer, name: str, cls: type, **command_kw: Any) -> Callable:
    """Register ``fn(opts: cls)`` as command ``name`` of ``app``, its options generated from ``cls``."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(cls(**kwargs))

        del command.__wrapped__  # typer must read the generated signature, not fn's
        command.__signature__ = options_signature(cls)
        command.__annotations__ = {}
        app.command(name, **command_kw)(command)
        return fn

    return decorate
