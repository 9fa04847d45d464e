"""``--config FILE.yaml`` for every command, and the resolved configuration written beside a command's outputs.

A config file holds the command's options by their names or flags (``lr: 1e-3`` or ``hook-steps: 40``; the positional MODEL
is ``model``). Its values become the command's defaults; flags typed on the command line override them. Unknown keys
are refused with their name. A recipe (``recipes/*.yaml``) holds one such mapping per command under ``commands:``
(``commands: {train: {...}, eval: {...}}``); each command reads its own section. After a command that writes into an output directory (``--out DIR``) succeeds, the
fully resolved options (file + flags + defaults) are written to ``DIR/hookmoe_config.yaml``: running
``hookmoe CMD --config DIR/hookmoe_config.yaml`` repeats the run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from hookmoe.errors import UserError

RESOLVED_NAME = "hookmoe_config.yaml"
COMMANDS_KEY = "commands"  # recipes hold one section of options per command under this key
_SKIP = {"config", "overwrite", "resume"}  # flags that steer one invocation, not the run's settings


def split_config(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--config FILE`` / ``--config=FILE``, and FILE."""
    out, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a YAML file")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, path


def command_name(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def load_config(path: str, command: Any) -> dict[str, Any]:
    """The options in ``path`` for the click ``command``, keyed by parameter name; refuses unknown keys."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config: cannot read {path}: {e.__class__.__name__}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold a mapping of option names to values")
    if COMMANDS_KEY in data:  # a recipe: one section per command
        sections = data[COMMANDS_KEY]
        if not isinstance(sections, dict) or command.name not in sections:
            raise UserError(f"--config: {path} has no section for 'hookmoe {command.name}' under '{COMMANDS_KEY}'")
        data = sections[command.name] or {}
        if not isinstance(data, dict):
            raise UserError(f"--config: section '{command.name}' of {path} must be a mapping")
    params = {prm.name: prm for prm in command.params}
    aliases = {o.lstrip("-").replace("-", "_"): prm.name for prm in command.params for o in getattr(prm, "opts", [])
               if o.startswith("--")}
    negated = {o.lstrip("-").replace("-", "_"): prm.name for prm in command.params
               for o in getattr(prm, "secondary_opts", []) if o.startswith("--")}  # no_progress: true
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in negated and name not in params and isinstance(value, bool):
            name, value = negated[name], not value
        name = aliases.get(name, name)
        if name not in params or name in _SKIP:
            known = ", ".join(sorted(n for n in aliases if aliases[n] not in _SKIP))
            raise UserError(f"--config: unknown key '{key}' in {path} for 'hookmoe {command.name}' (known: {known})")
        prm = params[name]
        if getattr(prm, "multiple", False) and not isinstance(value, list):
            value = [value]
        values[name] = [str(v) for v in value] if isinstance(value, list) else value
    return values


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, os.PathLike):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def write_resolved(directory: Path, command: str, params: dict[str, Any]) -> Path | None:
    """Write the resolved options of ``command`` to ``directory/hookmoe_config.yaml`` (atomically)."""
    import yaml

    from hookmoe.files import atomic_write_text

    if not directory.is_dir():
        return None
    data = {k: _plain(v) for k, v in params.items() if k not in _SKIP}
    body = f"# hookmoe {command}: resolved options; repeat with `hookmoe {command} --config {RESOLVED_NAME}`\n"
    body += yaml.safe_dump(data, sort_keys=False)
    return atomic_write_text(directory / RESOLVED_NAME, body)


def record_resolved(command: Any) -> None:
    """Wrap a click command's callback so that, on success, its resolved options land in its ``--out`` folder."""
    inner = command.callback
    if inner is None or getattr(inner, "_hookmoe_records", False):
        return

    @functools.wraps(inner)
    def callback(*args, **kwargs):
        rv = inner(*args, **kwargs)
        out = kwargs.get("out")
        if out is not None and str(out) != "-" and os.environ.get("RANK", "0") in ("", "0"):  # torchrun: rank 0
            write_resolved(Path(out), command.name, kwargs)
        return rv

    callback._hookmoe_records = True
    command.callback = callback
