"""Options as documented dataclasses: one place for each setting's name, default, help and bounds.

Every command's settings are a dataclass whose fields are declared with :func:`option` (or :func:`argument` for a
positional one). The same class serves three readers:

- the Python API (``TrainOptions(lr=1e-3)``, validated on construction: a bad value raises a
  :class:`~hookmoe.errors.UserError` that names the command-line flag);
- the command line, which is generated from the fields (``hookmoe.cli.options``): flag, default, help, bounds;
- ``--config FILE.yaml`` and the resolved ``hookmoe_config.yaml`` a command writes, whose keys are the fields.

Groups shared by several commands (how a model is loaded, for one) are dataclasses too; a command's class inherits
them, so ``--dtype`` is declared once for every command that takes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Sequence

from hookmoe.errors import UserError


def option(default: Any = MISSING, help: str = "", *, flags: Sequence[str] = (), min: Optional[float] = None,
           max: Optional[float] = None, min_open: bool = False, choices: Optional[Iterable[str]] = None,
           cli: bool = True, factory: Any = MISSING, zero_means: Optional[str] = None) -> Any:
    """A dataclass field that is also a command-line option.

    ``flags``: the option's spellings (default ``--field-name``; a bool gets ``--x/--no-x``). ``min``/``max``: bounds
    checked on construction (``min_open``: strictly greater than ``min``). ``choices``: the allowed strings.
    ``cli=False``: a setting of the API and the config file only. ``zero_means``: 0 is read as None (e.g. "off"),
    documented in the help.
    """
    meta = {"help": help, "flags": tuple(flags), "min": min, "max": max, "min_open": min_open,
            "choices": tuple(choices) if choices is not None else None, "cli": cli, "zero_means": zero_means}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def argument(help: str = "", default: Any = MISSING) -> Any:
    """A positional command-line argument (required unless it has a default)."""
    return field(default=default, metadata={"help": help, "positional": True, "cli": True, "flags": ()})


def flag_name(f: dataclasses.Field) -> str:
    """How the user spells field ``f`` on the command line (for error messages)."""
    if f.metadata.get("positional"):
        return f.name.upper()
    flags = f.metadata.get("flags") or ()
    return next((x.split("/")[0] for x in flags if x.startswith("--")), "--" + f.name.replace("_", "-"))


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of options class ``cls`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def _check_field(obj: Any, f: dataclasses.Field) -> None:
    value = getattr(obj, f.name)
    md = f.metadata
    if value is None or isinstance(value, bool):
        return
    name, error = flag_name(f), getattr(obj, "error", UserError)
    if md.get("zero_means") is not None and value == 0:
        object.__setattr__(obj, f.name, None)
        return
    if md.get("choices") is not None and isinstance(value, str) and value not in md["choices"]:
        raise error(f"{name} must be one of {', '.join(md['choices'])}, got '{value}'")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{name} must be a finite number, got {value}")
        lo, hi = md.get("min"), md.get("max")
        if lo is not None and (value <= lo if md.get("min_open") else value < lo):
            raise error(f"{name} must be {'>' if md.get('min_open') else '>='} {lo:g}, got {value}")
        if hi is not None and value > hi:
            raise error(f"{name} must be <= {hi:g}, got {value}")


@dataclass(kw_only=True)
class Options:
    """Base of every options dataclass: the bounds and choices declared with :func:`option` are checked on
    construction, then :meth:`check` (a subclass's cross-field rules). ``error``: the UserError subclass raised."""

    error: ClassVar[type] = UserError

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata.get("cli") is not None:
                _check_field(self, f)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields; raise :class:`UserError` naming the flags."""

    def pick(self, cls: type) -> dict[str, Any]:
        """This object's values of the fields of options class ``cls`` (a group it inherits)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each field's default (fields without one are left out)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.defaults()[name]
