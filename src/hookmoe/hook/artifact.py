"""The Hook artifact directory, PEFT-style: ``hookmoe.json`` (manifest) + ``hook.safetensors``; reading and
checking it against the model it is attached to."""

from __future__ import annotations

from hookmoe.files import json_default as _json_default, write_json as _write_json_atomic  # noqa: F401
from hookmoe.files import check_keys, inside, read_json_file

import hashlib
import os
from pathlib import Path

import torch

from hookmoe.errors import ArtifactError

from hookmoe.hook.compensators import DEFAULT_KIND, kind_name, parse_kind
from hookmoe.hook.module import HOOK_FORMAT


WEIGHTS_NAME = "hook.safetensors"


CONFIG_NAME = "hookmoe.json"


def base_model_info(mm) -> dict:
    return {
        "source": mm.source,
        "arch": mm.arch,
        "fingerprint": mm.fingerprint(),
        "hidden_size": int(mm.config.hidden_size),
        "num_layers": mm.num_layers,
        "moe_layers": mm.moe_layer_indices,
    }


def read_manifest(directory: str | Path) -> dict:
    """The ``hookmoe.json`` of a hook artifact directory, checked for format (ArtifactError if bad)."""
    d = Path(directory)
    if d.is_file() and d.name in (CONFIG_NAME, WEIGHTS_NAME):
        d = d.parent
    if not d.exists():
        raise ArtifactError(f"hook artifact not found: {directory}")
    if not d.is_dir():
        raise ArtifactError(f"hook artifact must be a directory with {CONFIG_NAME} and {WEIGHTS_NAME}: {directory}")
    cfg = d / CONFIG_NAME
    if not cfg.is_file():
        raise ArtifactError(f"{directory} is not a hook artifact (no {CONFIG_NAME})")
    m = read_json_file(cfg, what="hook manifest", error=ArtifactError)
    if not isinstance(m, dict) or m.get("format") != HOOK_FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise ArtifactError(f"{cfg} has format {fmt!r}, expected {HOOK_FORMAT!r}")
    check_manifest(m, str(cfg))
    try:
        h = m["hook"]
        m["_layers"] = [int(i) for i in h["layers"]]
        m["_hidden"] = int(h["hidden_size"])
        m["_kind"] = kind_name(parse_kind(m.get("kind") or h.get("kind") or DEFAULT_KIND))  # absent: a Hook
        parts = h.get("parts") or {"hook": {"layers": m["_layers"], "inner_size": h["inner_size"]}}
        m["_parts"] = {}
        for name in parse_kind(m["_kind"]):
            part = dict(parts[name])
            part["layers"] = [int(i) for i in part["layers"]]
            for key in ("inner_size", "rank", "experts"):
                if key in part:
                    part[key] = int(part[key])
            m["_parts"][name] = part
        m["_inner"] = int(m["_parts"]["hook"]["inner_size"]) if "hook" in m["_parts"] else 0
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"hook manifest {cfg} is incomplete (missing hook layers or sizes)") from e
    m["_dir"] = str(d)
    return m


_OPT_DICT = (dict, type(None))
_NUM = (int, float)

#: hookmoe.json: every key and its JSON type; unknown keys and wrong types are refused with the key's name.
MANIFEST_SCHEMA = {"format": str, "kind": str, "hookmoe_version": str, "created": str, "base_model": _OPT_DICT, "hook": dict,
                   "plan": (dict, str, type(None)), "training": _OPT_DICT, "metrics": _OPT_DICT,
                   "weights": _OPT_DICT}
BASE_MODEL_SCHEMA = {"source": (str, type(None)), "arch": (str, type(None)), "fingerprint": (str, type(None)),
                     "hidden_size": int, "num_layers": int, "moe_layers": list}
HOOK_SCHEMA = {"kind": str, "parts": dict, "layers": list, "hidden_size": int, "inner_size": (int, type(None)),
               "init": str, "r_init": _NUM, "dtype": str,
               "params": int, "params_fraction_of_model": _NUM, "r": dict}
WEIGHTS_SCHEMA = {"file": str, "sha256": (str, type(None))}


def check_manifest(m: dict, where: str) -> None:
    """Strict schema of a hook manifest (ArtifactError naming the key); the weights file must lie inside the
    artifact folder."""
    check_keys(m, MANIFEST_SCHEMA, where=where, required=("format", "hook"), error=ArtifactError)
    h = check_keys(m["hook"], HOOK_SCHEMA, where=f"{where}: 'hook'", required=("layers", "hidden_size"),
                   error=ArtifactError)
    layers = h["layers"]
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ArtifactError(f"{where}: 'hook.layers' must be a non-empty list of layer numbers, got {layers!r}")
    for k in ("hidden_size", "inner_size"):  # inner_size: None for kinds without a Hook part
        if h.get(k) is not None and h[k] < 1:
            raise ArtifactError(f"{where}: 'hook.{k}' must be >= 1, got {h[k]}")
    if m.get("base_model") is not None:
        check_keys(m["base_model"], BASE_MODEL_SCHEMA, where=f"{where}: 'base_model'", error=ArtifactError)
    if m.get("weights") is not None:
        w = check_keys(m["weights"], WEIGHTS_SCHEMA, where=f"{where}: 'weights'", error=ArtifactError)
        if "file" in w:
            inside(Path(where).parent, w["file"], where=f"{where}: 'weights.file'", error=ArtifactError)
    if isinstance(m.get("plan"), dict):
        from hookmoe.errors import PlanError
        from hookmoe.routing.plan import Plan

        try:
            Plan.from_dict(m["plan"], where=f"{where}: 'plan'")
        except PlanError as e:
            raise ArtifactError(str(e)) from None


def _check_compat(mm, m: dict, directory: str | Path, strict: bool) -> None:
    base = m.get("base_model") or {}
    hidden = int(mm.config.hidden_size)
    if m["_hidden"] != hidden:
        raise ArtifactError(
            f"hook {directory} was trained for hidden size {m['_hidden']} ({base.get('arch', '?')}, "
            f"{base.get('source', '?')}) but this model has hidden size {hidden}"
        )
    if strict and base.get("fingerprint") and base["fingerprint"] != mm.fingerprint():
        raise ArtifactError(
            f"hook {directory} was trained for another model ({base.get('arch', '?')} {base.get('source', '?')}, "
            f"fingerprint {base['fingerprint']}; this {mm.arch} model has {mm.fingerprint()})"
        )
    for i in m["_layers"]:
        if i not in mm.moe_layer_indices:
            raise ArtifactError(f"hook {directory} hooks layer {i}, which is not an MoE layer of this model")


def read_weights(directory: str | Path, m: dict | None = None) -> dict[str, torch.Tensor]:
    """Load and verify ``hook.safetensors`` (checksum, keys, shapes, finiteness)."""
    from safetensors.torch import load_file

    m = m or read_manifest(directory)
    d = Path(m["_dir"])
    wfile = inside(d, (m.get("weights") or {}).get("file") or WEIGHTS_NAME, where=f"{d / CONFIG_NAME}: 'weights.file'",
                   error=ArtifactError)
    if not wfile.is_file():
        raise ArtifactError(f"hook artifact {directory} has no weights file ({wfile.name})")
    want = (m.get("weights") or {}).get("sha256")
    if want and _sha256(wfile) != want:
        raise ArtifactError(f"hook weights {wfile} are corrupt or truncated (checksum mismatch)")
    try:
        state = load_file(str(wfile))
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise ArtifactError(f"hook weights {wfile} are corrupt or truncated ({type(e).__name__})") from None
    want_shapes = []
    parts, hid = m.get("_parts") or {"hook": {"layers": m["_layers"], "inner_size": m["_inner"]}}, m["_hidden"]
    for i in (parts.get("hook") or {}).get("layers", []):
        inner = parts["hook"]["inner_size"]
        want_shapes += [(f"layers.{i}.linear1.weight", (inner, hid)), (f"layers.{i}.linear2.weight", (hid, inner)),
                        (f"layers.{i}.r", ())]
    for i in (parts.get("router") or {}).get("layers", []):
        want_shapes.append((f"router.{i}.delta", (parts["router"]["experts"], hid)))
    for i in (parts.get("output") or {}).get("layers", []):
        rank = parts["output"]["rank"]
        want_shapes += [(f"output.{i}.down", (rank, hid)), (f"output.{i}.up", (hid, rank))]
    for name, shape in want_shapes:
        t = state.get(name)
        if t is None:
            raise ArtifactError(f"hook weights {wfile} lack tensor {name}")
        if tuple(t.shape) != shape:
            raise ArtifactError(f"hook tensor {name} in {wfile} has shape {tuple(t.shape)}, expected {shape}")
        if not torch.isfinite(t).all():
            raise ArtifactError(f"hook tensor {name} in {wfile} holds NaN or inf values")
    return state




def _chmod_default(path: Path, mode: int) -> None:
    """Give ``path`` the mode an ordinary new file/dir gets (mkdtemp and some writers use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()




