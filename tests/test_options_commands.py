"""eval, bench, info, generate, export and convert are generated from their options dataclasses: every flag's
default in --help is the dataclass default, and a value out of bounds is one `error:` line naming the flag."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import run_cli

from hookmoe.cli import build_app
from hookmoe.cli.info import GenerateOptions, InfoOptions
from hookmoe.cmoe.convert import ConvertOptions
from hookmoe.eval.run import EvalOptions
from hookmoe.options import cli_fields, flag_name
from hookmoe.serving.export import ExportOptions
from hookmoe.speed.bench import BenchOptions

# each command, its options class, and arguments that make the rest of a command line valid
COMMANDS = {
    "eval": (EvalOptions, ["tiny:mixtral", "--data", "builtin"]),
    "bench": (BenchOptions, ["tiny:mixtral"]),
    "info": (InfoOptions, ["tiny:mixtral"]),
    "generate": (GenerateOptions, ["tiny:mixtral", "--prompt", "x"]),
    "export": (ExportOptions, ["tiny:mixtral", "--hook", "h", "--out", "o"]),
    "convert": (ConvertOptions, ["dense", "--out", "o"]),
}


def _command(name):
    from typer.main import get_command

    return get_command(build_app()).get_command(None, name)


_run = run_cli  # conftest: hookmoe ARGV in-process -> (status, stdout, stderr)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_defaults_are_the_dataclass_defaults(name, capsys, monkeypatch):
    cls, _ = COMMANDS[name]
    params = {p.name: p for p in _command(name).params}
    defaults = cls.defaults()
    fields = cli_fields(cls)
    assert {f.name for f in fields} <= set(params)
    for f in fields:
        p = params[f.name]
        if f.name in defaults:
            assert p.default == defaults[f.name], f.name
            assert not p.required, f.name
        else:
            assert p.required, f.name
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = _run([name, "--help"], capsys)
    assert code == 0
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", out))
    for f in fields:
        assert flag_name(f).lower() in text.lower(), f.name
        v = defaults.get(f.name)
        if v is not None and not isinstance(v, bool) and not f.metadata.get("positional"):
            assert f"[default: {v}]" in text, (f.name, v)


def _out_of_bounds(f: dataclasses.Field):
    md = f.metadata
    if md.get("choices"):
        return "no-such-choice"
    lo = md.get("min")
    if lo is None:
        return None
    is_int = f.type in ("int", "Optional[int]") or f.type is int
    if md.get("min_open"):
        return str(int(lo) if is_int else lo)
    return str(int(lo) - 1) if is_int else str(lo - 0.5)


CASES = [(name, f.name) for name, (cls, _) in COMMANDS.items() for f in cli_fields(cls)
         if _out_of_bounds(f) is not None]


def test_every_command_has_bounded_options():
    assert {name for name, _ in CASES} == set(COMMANDS)


@pytest.mark.parametrize("name,field", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_a_value_out_of_bounds_is_one_error_line_naming_the_flag(name, field, capsys):
    cls, base = COMMANDS[name]
    f = next(x for x in cli_fields(cls) if x.name == field)
    flag = flag_name(f)
    code, out, err = _run([name, *base, flag, _out_of_bounds(f)], capsys)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error:") and flag in lines[0] and "Traceback" not in err, err
    assert not out
