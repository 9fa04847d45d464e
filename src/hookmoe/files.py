"""Writing files without ever leaving a half-written one, and reading hookmoe's files strictly.

The output policy (issue 18), one for every command: :func:`check_output` runs before any work and refuses an output
that exists (unless it is the command's own resumable state, or ``--overwrite`` was given: :data:`OVERWRITE`), a
folder given for a file and the reverse, and a place that cannot be written. Folders are filled in a temporary
sibling and moved into place (:func:`atomic_dir` / :func:`replace_dir`: an old folder is moved aside and deleted
only after the new one is in place); single files go through :func:`atomic_write_text` / :func:`save_figure`.
Files hookmoe reads are parsed with :func:`read_json_file` (UTF-8, one-line errors) and checked with
:func:`check_keys` (unknown keys and wrong types refused by name); paths inside an artifact with :func:`inside`.

Every artifact, report and JSON hookmoe writes goes through :func:`atomic_write_text` / :func:`write_json`: the bytes
go to a temporary sibling that is renamed over the target only once complete, so an interrupted or failed run never
leaves a truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from hookmoe.errors import UserError


def json_default(o: Any) -> Any:
    """JSON for the values hookmoe results hold: config objects, paths, dtypes, tensors, sets and tuples."""
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    try:
        import torch

        if isinstance(o, torch.dtype):
            return str(o).replace("torch.", "")
        if isinstance(o, torch.Tensor):
            return o.item() if o.numel() == 1 else o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=json_default) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    return atomic_write_text(path, to_json(obj))


# ---------------------------------------------------------------------------------------------------------------
# The output policy: an existing output is never replaced without ``--overwrite``; checked before any work.


#: Set for one command invocation by the CLI's generic ``--overwrite`` flag (library callers pass ``overwrite=``).
OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("hookmoe_overwrite", default=False)


def overwrite_allowed(overwrite: Optional[bool] = None) -> bool:
    return OVERWRITE.get() if overwrite is None else bool(overwrite)


@contextlib.contextmanager
def overwriting(value: bool) -> Iterator[None]:
    """While inside: outputs may be replaced (the CLI's ``--overwrite``)."""
    token = OVERWRITE.set(bool(value))
    try:
        yield
    finally:
        OVERWRITE.reset(token)


def _writable_parent(path: Path, flag: str, error: type = UserError) -> None:
    """Refuse ``path`` when no folder can be created or written where it goes."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag}: cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag}: cannot write {path}: {parent} is not writable")


def check_output(path: str | Path | None, *, kind: str = "dir", flag: str = "--out",
                 resumable: Optional[Callable[[Path], bool]] = None, overwrite: Optional[bool] = None,
                 error: type = UserError) -> Optional[Path]:
    """Check an output path before any work is done; returns it as a Path (``None`` / ``-`` pass through).

    ``kind="dir"``: a folder the command fills; an existing empty folder is fine. ``kind="file"``: one file.
    An existing output is refused (UserError naming ``flag`` and ``--overwrite``) unless overwriting is allowed
    or ``resumable(path)`` says it is this command's own resumable state. A folder given for a file, a file given
    for a folder, and a place that cannot be written are refused even with ``--overwrite``.
    """
    if path is None or str(path) == "-":
        return None if path is None else Path(str(path))
    if str(path).strip() == "":
        raise error(f"{flag} must not be empty")
    p = Path(path).expanduser()
    if kind == "file":
        if p.is_dir():
            raise error(f"{flag}: {p} is a folder; give a file name")
    elif p.exists() and not p.is_dir():
        raise error(f"{flag}: {p} is a file; give a folder (new or empty)")
    _writable_parent(p, flag, error)
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise error(f"{flag}: {p} is not writable")
    exists = p.is_file() or (p.is_dir() and any(p.iterdir()))
    if exists and kind == "dir" and overwrite_allowed(overwrite) and not (resumable is not None and resumable(p)):
        _replaceable(p, flag, error)
    if exists and not (resumable is not None and resumable(p)) and not overwrite_allowed(overwrite):
        what = "file" if kind == "file" else "folder"
        raise error(f"{flag}: {p} already exists and is not empty; choose another {what} or pass --overwrite "
                        "to replace it" if kind == "dir" else
                        f"{flag}: {p} already exists; choose another file name or pass --overwrite to replace it")
    return p


#: Files by which a folder is recognised as hookmoe's own output: --overwrite replaces only such folders.
OUTPUT_MARKERS = ("hookmoe_config.yaml", "hookmoe.json", "hookmoe_export.json", "cmoe.json", "demo.json",
                  "results.json", "sweep.json", "compare.json", "report.md", "checkpoint")


def _replaceable(p: Path, flag: str, error: type) -> None:
    """--overwrite may replace a folder only when it is a hookmoe output: never the current folder or one above it,
    the home folder or the root, nor a folder of files hookmoe did not write."""
    r = p.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if r == cwd or r in cwd.parents or r == home or r == Path(r.anchor):
        raise error(f"{flag}: {p} holds the current, home or root folder; --overwrite will not replace it, "
                    "choose a folder of its own")
    if not any((r / m).exists() for m in OUTPUT_MARKERS):
        raise error(f"{flag}: {p} holds files hookmoe did not write; --overwrite replaces only hookmoe outputs, "
                    "choose another folder")


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def replace_dir(tmp: Path, path: Path) -> Path:
    """Move the finished folder ``tmp`` to ``path``; an existing ``path`` is moved aside first and deleted only
    once the new one is in place (so a failure leaves the old one where it was)."""
    old = None
    if path.exists() or path.is_symlink():
        old = _sibling(path, "old")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path`` to fill; on success it replaces ``path`` (see
    :func:`replace_dir`), on failure or Ctrl-C it is deleted and ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# Strict reading of the files hookmoe reads.

_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(dict.fromkeys(_type_name(x) for x in t))
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def check_keys(obj: Any, schema: Mapping[str, Any], *, where: str, required: Iterable[str] = (),
               error: type = UserError) -> dict:
    """Check a JSON object: every key known (``schema`` maps key -> allowed type or tuple of types), ``required``
    present, each value of an allowed type. Raises ``error`` naming the key and ``where``; returns ``obj``."""
    if not isinstance(obj, dict):
        raise error(f"{where} must hold a JSON object, got {_type_name(type(obj))}")
    unknown = [k for k in obj if k not in schema]
    if unknown:
        raise error(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(schema)})")
    for k in required:
        if k not in obj:
            raise error(f"{where}: missing key '{k}'")
    for k, v in obj.items():
        t = schema[k]
        if t is None or t is Any:
            continue
        ok = isinstance(v, t) and not (isinstance(v, bool) and bool not in (t if isinstance(t, tuple) else (t,)))
        if float in (t if isinstance(t, tuple) else (t,)) and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise error(f"{where}: key '{k}' must be {_type_name(t)}, got {_type_name(type(v))}")
    return obj


def read_json_file(path: str | Path, *, what: str, error: type = UserError) -> Any:
    """Parse a JSON file as UTF-8; a missing, unreadable, non-UTF-8 or malformed file raises ``error`` (one line)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder, not a JSON file") from None
    except OSError as e:
        raise error(f"cannot read {what} {p} ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise error(f"{what} {p} is nested too deeply") from None


def inside(base: str | Path, rel: Any, *, where: str, error: type = UserError) -> Path:
    """``base / rel`` when ``rel`` is a relative path that stays inside ``base`` (no ``..``, no absolute path,
    no symlink out); otherwise ``error``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise error(f"{where} must be a file name inside the folder, got {rel!r}")
    b = Path(base).resolve()
    p = (b / rel).resolve()
    if Path(rel).is_absolute() or (p != b and b not in p.parents):
        raise error(f"{where} points outside its folder ({rel!r}); refused")
    return p


def save_figure(fig: Any, path: str | Path, **kw: Any) -> Path:
    """``fig.savefig`` through a temporary sibling and a rename (the format follows ``path``'s suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=(path.suffix.lstrip(".") or "png"), **kw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
