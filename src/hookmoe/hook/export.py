"""``hookmoe export``: the base model, tokenizer, Hooks and plan in one directory, and :func:`load` (``hookmoe.load``),
which restores such a directory or attaches a Hook artifact to any model."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


from hookmoe.errors import ArtifactError
from hookmoe.models import MoEModel, load_causal_lm
from hookmoe.models import load as load_model
from hookmoe.hook.artifact import _chmod_default, _write_json_atomic, base_model_info
from hookmoe.hook.inject import HookSet, SUBMODULES, attach_hooks, get_hooks, remove_hooks


EXPORT_FORMAT = "hookmoe-export/1"


EXPORT_NAME = "hookmoe_export.json"


@contextlib.contextmanager
def _hooks_detached(mm):
    """Temporarily take the compensator submodules out of the model (so ``save_pretrained`` omits them)."""
    taken = []
    for layer in mm.layers:
        for name in SUBMODULES:
            h = layer.block._modules.pop(name, None)
            if h is not None:
                taken.append((layer.block, name, h))
    try:
        yield
    finally:
        for block, name, h in taken:
            block._modules[name] = h


def export_model(mm, out: str | Path, *, plan: Any = None, hook: str | Path | HookSet | None = None,
                 overwrite: bool | None = None) -> Path:
    """Write ``mm``'s base model + tokenizer, a hook and a plan to ``out`` for :func:`load_export`.

    ``hook`` is an artifact directory or a HookSet (default: the Hooks in ``mm``); ``plan`` defaults to
    the hook's plan, else ``native``. The directory is assembled next to ``out`` and moved into place.
    """
    from hookmoe.errors import PlanError
    from hookmoe.routing.plan import Dynamic, Plan

    from hookmoe.files import check_output, replace_dir

    out = check_output(out, kind="dir", flag="--out", overwrite=overwrite, error=ArtifactError)
    if isinstance(hook, (str, Path)):
        remove_hooks(mm)
        hs = attach_hooks(mm, hook)
    else:
        hs = hook if hook is not None else get_hooks(mm)
    if plan is None:
        plan = hs.plan if hs is not None and hs.plan is not None else "native"
    plan_obj = Plan.parse(plan)
    for rule in plan_obj.resolve(mm).values():  # validate against the model without touching its routing
        if isinstance(rule, Dynamic) and not rule.calibrated:
            raise PlanError(f"plan rule '{rule.describe()}' needs calibration before it can be exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _chmod_default(tmp, 0o777)
    try:
        with _hooks_detached(mm):
            mm.model.save_pretrained(tmp)
        if mm.tokenizer is not None:
            mm.tokenizer.save_pretrained(tmp)
        if hs is not None:
            hs.save_pretrained(tmp / "hook")
        plan_obj.save(tmp / "plan.json")
        from hookmoe._version import __version__

        _write_json_atomic(tmp / EXPORT_NAME, {
            "format": EXPORT_FORMAT,
            "hookmoe_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": base_model_info(mm),
            "tokenizer_class": type(mm.tokenizer).__name__ if mm.tokenizer is not None else None,
            "plan": "plan.json",
            "hook": "hook" if hs is not None else None,
        })
        replace_dir(tmp, out)  # an old export is moved aside and deleted only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_OPT_STR = (str, type(None))

#: hookmoe_export.json: every key and its JSON type (unknown keys and wrong types are refused).
EXPORT_SCHEMA = {"format": str, "hookmoe_version": str, "created": str, "base_model": (dict, type(None)),
                 "tokenizer_class": _OPT_STR, "plan": _OPT_STR, "hook": _OPT_STR,
                 # written by hookmoe.serving.export (engine-ready exports; checked by serving.spec)
                 "engine": (dict, type(None))}


def load_export(path: str | Path, **kw):
    """Load a directory written by :func:`export_model`: base model, tokenizer, hook and plan applied."""
    from hookmoe.files import check_keys, inside, read_json_file

    d = Path(path)
    where = str(d / EXPORT_NAME)
    m = read_json_file(d / EXPORT_NAME, what="export manifest", error=ArtifactError)
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{where} has an unsupported format (expected {EXPORT_FORMAT!r})")
    check_keys(m, EXPORT_SCHEMA, where=where, required=("format",), error=ArtifactError)
    if m.get("base_model") is not None:
        from hookmoe.hook.artifact import BASE_MODEL_SCHEMA

        check_keys(m["base_model"], BASE_MODEL_SCHEMA, where=f"{where}: 'base_model'", error=ArtifactError)
    for key in ("plan", "hook"):  # artifact-internal paths stay inside the export folder
        if m.get(key) is not None:
            inside(d, m[key], where=f"{where}: '{key}'", error=ArtifactError)
    model, tok = load_causal_lm(str(d), **kw)
    if tok is None or (m.get("tokenizer_class") and type(tok).__name__ != m["tokenizer_class"]):
        tok = _load_tokenizer_class(d, m.get("tokenizer_class")) or tok
    mm = MoEModel(model, tok, source=str(d))
    if m.get("hook"):
        attach_hooks(mm, d / m["hook"])
    plan_file = d / (m.get("plan") or "plan.json")
    if plan_file.is_file():
        mm.active_plan = mm.routing(plan_file)
    return mm


def _load_tokenizer_class(d: Path, name: str | None):
    """Load the tokenizer by its class name (AutoTokenizer maps some model types to other classes)."""
    if not name:
        return None
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        return None
    try:
        return cls.from_pretrained(str(d))
    except (OSError, ValueError):
        return None


def load(spec: Any, *, plan: Any = None, hook: str | Path | None = None, tokenizer: Any = None, **kw) -> MoEModel:
    """Load an MoE model, attach a Hook artifact and apply a routing plan (all optional).

    This is ``hookmoe.load``. A MODEL spec is anything :func:`hookmoe.models.load` takes; a directory written by
    ``hookmoe export`` restores its Hook and plan automatically (unless ``plan``/``hook`` are given).
    """
    if isinstance(spec, (str, os.PathLike)) and plan is None and hook is None \
            and (Path(spec) / EXPORT_NAME).is_file():
        return load_export(spec, **kw)
    mm = load_model(spec, tokenizer=tokenizer, **kw)
    if hook is not None:
        attach_hooks(mm, hook)
    if plan is not None:
        mm.active_plan = mm.routing(plan)
    return mm
