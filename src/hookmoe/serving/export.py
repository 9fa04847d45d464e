"""Engine-ready export: ``hookmoe export MODEL --plan P [--hook DIR] --out OUT --target vllm|transformers``.

Two formats, chosen by what the plan and the Hook need:

* **plain** — a uniform ``topk:K`` plan (or ``native``) and no Hook: an ordinary checkpoint whose
  ``config.json`` says ``num_experts_per_tok = K``. Plain transformers, vLLM and SGLang load it as the
  reduced model with no hookmoe import (the logits are those of hookmoe under ``topk:K``).
* **hookmoe** — any other plan, or a Hook: the checkpoint written by :func:`hookmoe.hook.export_model`
  (weights, tokenizer, ``plan.json``, ``hook/`` with the usual safetensors + manifest,
  ``hookmoe_export.json``). With ``--target vllm`` its ``config.json`` names hookmoe's model classes
  (``architectures: ["HookmoeMixtralForCausalLM"]``): vLLM serves it only through hookmoe's plugin
  (``pip install hookmoe[vllm]``) and refuses it otherwise, instead of silently serving the native
  model. ``--target transformers`` keeps the native class names (``hookmoe.load(OUT)`` restores plan
  and Hook; plain transformers would load the native model).

The directory is assembled next to ``OUT`` and moved into place; an existing non-empty ``OUT`` is
never overwritten unless asked.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from hookmoe.errors import ArtifactError, ModelError, UserError
from hookmoe.files import check_output, replace_dir, write_json
from hookmoe.models.loading import DEVICE_HELP, MODEL_HELP, LoadOptions
from hookmoe.options import argument, option
from hookmoe.routing.plan import PLAN_HELP
from hookmoe.serving.spec import ARCH_PREFIX, ENGINE_KEY, EXPORT_NAME, NOT_SERVED, VLLM_ARCHS

TARGETS = ("vllm", "transformers")


@dataclass(kw_only=True)
class ExportOptions(LoadOptions):
    """``hookmoe export``: MODEL + Hook + plan into one directory (:func:`hookmoe.hook.export_model`), or, with
    ``target``, a checkpoint for an engine (:func:`export_for_engine`); run by :func:`run_export`."""

    error: ClassVar[type] = ArtifactError

    model: str = argument(MODEL_HELP)
    hook: Optional[Path] = option(None, "hook artifact directory (from `hookmoe train`)")
    out: Path = option(help="output directory")
    plan: Optional[str] = option(None, PLAN_HELP + " (default: the plan the hook was trained for)")
    target: Optional[str] = option(None, "vllm | transformers: an engine-ready export (a plain checkpoint for a "
                                   "uniform topk:K without --hook; see docs/serving.md)", choices=TARGETS)
    device: str = option("cpu", DEVICE_HELP)
    seed: int = option(0, "seed for tiny:<arch> models")

    def check(self) -> None:
        if self.hook is None and self.target is None:
            raise ArtifactError("export needs --hook DIR (or --target vllm|transformers for an engine export)")
        if self.plan is not None:
            from hookmoe.routing.plan import Plan

            Plan.parse(self.plan)  # a malformed plan fails before the model loads


def run_export(o: ExportOptions) -> str:
    """``hookmoe export``: refuse a bad ``--out`` or artifact before the model loads, load it, write the export;
    returns the line that says what was written where."""
    from hookmoe.hook import load
    from hookmoe.hook.artifact import _check_compat, read_manifest
    from hookmoe.hook.export import export_model
    from hookmoe.routing.plan import Plan

    check_output(o.out, kind="dir", flag="--out")
    m = read_manifest(o.hook) if o.hook is not None else None  # a bad artifact fails before the model loads
    mm = load(o.model, seed=o.seed, **o.load_kwargs())
    if o.target is not None:
        r = export_for_engine(mm, o.out, plan=o.plan, hook=o.hook, target=o.target)
        return (f"exported {o.model} ({r.format} checkpoint for {r.target}: {', '.join(r.architectures)}; plan "
                f"{r.plan}; hooks {r.hook_layers or 'none'}) to {r.path}")
    _check_compat(mm, m, o.hook, strict=True)
    path = export_model(mm, o.out, plan=o.plan, hook=o.hook)
    p = Plan.parse(o.plan).describe() if o.plan else (Plan.from_dict(m["plan"]).describe() if m.get("plan")
                                                       else "native")
    return f"exported {o.model} + hook {o.hook} (layers {m['_layers']}) + plan {p} to {path}"


@dataclass
class ExportResult:
    path: Path
    format: str  # "plain" | "hookmoe"
    target: str
    plan: str
    top_k: int | None  # the config's k of a plain export
    architectures: list[str]
    hook_layers: list[int]


def uniform_k(mm, plan: Any) -> int | None:
    """K when ``plan`` runs the same static k in every MoE layer of ``mm`` (``native`` = the native k), else None."""
    from hookmoe.routing.plan import Native, Plan, TopK

    rules = Plan.parse(plan).resolve(mm)
    ks = set()
    for r in rules.values():
        if isinstance(r, TopK):
            ks.add(r.k)
        elif isinstance(r, Native):
            ks.add(mm.native_top_k)
        else:
            return None
    return ks.pop() if len(ks) == 1 else None


def export_for_engine(mm, out: str | Path, *, plan: Any = None, hook: str | Path | None = None,
                      target: str = "vllm", overwrite: bool | None = None) -> ExportResult:
    """Write ``mm`` (a :class:`hookmoe.models.MoEModel`) with ``plan`` and ``hook`` for ``target``; see module doc.

    ``plan`` defaults to the Hook's training plan, else ``native``; ``hook`` is an artifact directory
    (default: the Hooks attached to ``mm``, if any).
    """
    from hookmoe.hook.inject import attach_hooks, get_hooks, remove_hooks
    from hookmoe.hook.export import export_model
    from hookmoe.routing.plan import Plan

    if target not in TARGETS:
        raise UserError(f"unknown --target '{target}' (use one of: {', '.join(TARGETS)})")
    out = check_output(out, kind="dir", flag="--out", overwrite=overwrite, error=ArtifactError)
    if hook is not None:
        remove_hooks(mm)
        hs = attach_hooks(mm, hook)
    else:
        hs = get_hooks(mm)
    if plan is None:
        plan = hs.plan if hs is not None and hs.plan is not None else "native"
    plan_obj = Plan.parse(plan)
    k = uniform_k(mm, plan_obj) if hs is None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.engine-", dir=out.parent))
    staged = work / "export"
    try:
        if k is not None:
            fmt = "plain"
            key = "num_experts_per_tok"
            if not hasattr(mm.config, key):
                raise ModelError(f"this {mm.arch} config has no {key}; export a uniform plan with --target "
                                 "transformers")
            before = getattr(mm.config, key)
            setattr(mm.config, key, int(k))
            try:
                export_model(mm, staged, plan=f"topk:{k}", hook=None)
            finally:
                setattr(mm.config, key, before)
        else:
            fmt = "hookmoe"
            if target == "vllm" and mm.arch not in VLLM_ARCHS:
                why = NOT_SERVED.get(mm.arch, "not supported by the vLLM plugin")
                raise ModelError(f"vLLM cannot serve a plan or a Hook on {mm.arch} ({why}); use a uniform --plan "
                                 "topk:K without --hook, or --target transformers")
            if target == "vllm" and hs is not None and getattr(hs, "kind", "hook") != "hook":
                raise ModelError(f"the vLLM plugin serves Hooks only, not a '{hs.kind}' compensator; export it with "
                                 "--target transformers")
            export_model(mm, staged, plan=plan_obj, hook=hs)
        cfg_file = staged / "config.json"
        cfg = json.loads(cfg_file.read_text())
        archs = list(cfg.get("architectures") or [])
        if fmt == "hookmoe" and target == "vllm":
            base = VLLM_ARCHS[mm.arch][1]
            archs = [ARCH_PREFIX + base]
            cfg["architectures"] = archs
            _write_json(cfg_file, cfg)
        man_file = staged / EXPORT_NAME
        man = json.loads(man_file.read_text())
        man[ENGINE_KEY] = {"format": fmt, "target": target, "top_k": k, "architectures": archs,
                           "native_architectures": [VLLM_ARCHS[mm.arch][1]] if mm.arch in VLLM_ARCHS else None}
        _write_json(man_file, man)
        replace_dir(staged, out)  # an existing export is moved aside and deleted only once this one is in place
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(path=out, format=fmt, target=target, plan=plan_obj.describe(), top_k=k,
                        architectures=archs, hook_layers=list(hs.layers) if hs is not None else [])


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj)


__all__ = ["export_for_engine", "ExportResult", "uniform_k", "TARGETS"]
