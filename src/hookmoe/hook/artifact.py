"""The Hook artifact directory, PEFT-style: ``hookmoe.json`` (manifest) + ``hook.safetensors``; reading and
checking it against the model it is attached to."""

from __future__ import annotations

from hookmoe.files import json_default as _json_default, write_json as _write_json_atomic  # noqa: F401

import hashlib
import json
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
    try:
        m = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"hook manifest {cfg} is corrupt (not valid JSON)") from e
    if not isinstance(m, dict) or m.get("format") != HOOK_FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise ArtifactError(f"{cfg} has format {fmt!r}, expected {HOOK_FORMAT!r}")
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
    wfile = d / ((m.get("weights") or {}).get("file") or WEIGHTS_NAME)
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




