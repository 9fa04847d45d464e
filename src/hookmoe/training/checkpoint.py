"""Checkpoints that resume bit-exactly: Hook weights, optimizer state, RNG states and the run's progress, written
atomically; the training log."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hookmoe.errors import ArtifactError
from hookmoe.hook.inject import HookSet
from hookmoe.hook.artifact import _json_default
from hookmoe.files import check_keys, read_json_file
from hookmoe.training.config import CHECKPOINT_DIR, CKPT_FORMAT, TRAINER_STATE, TrainConfig


def _blocks_digest(blocks: torch.Tensor) -> str:
    t = blocks.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()[:16]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"state.{pid}.{name}"] = t.detach().to("cpu").contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if not key.startswith("state."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    fixed = []
    for g in groups:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        fixed.append(g)
    opt.load_state_dict({"state": state, "param_groups": fixed})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _set_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch_cpu" in tensors:
        torch.random.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _save_checkpoint(out_dir: Path, hs: HookSet, opt, state: dict, best: dict[str, torch.Tensor] | None) -> Path:
    """Write the checkpoint to a temporary directory, then move it into place atomically."""
    from safetensors.torch import save_file

    final = out_dir / CHECKPOINT_DIR
    tmp = _mkdtemp(out_dir, f".{CHECKPOINT_DIR}.tmp-")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in hs.state_dict().items()},
                  str(tmp / "hook.safetensors"))
        tensors, groups = _optimizer_tensors(opt)
        tensors.update(_rng_tensors())
        if best is not None:
            tensors.update({f"best.{k}": v.detach().to("cpu").contiguous() for k, v in best.items()})
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        st = dict(state, format=CKPT_FORMAT, param_groups=groups)
        (tmp / TRAINER_STATE).write_text(json.dumps(st, indent=1, default=_json_default) + "\n")
        old = out_dir / f"{CHECKPOINT_DIR}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _mkdtemp(parent: Path, prefix: str) -> Path:
    """A temporary directory with the permissions of an ordinary one (mkdtemp makes it 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _find_checkpoint(out_dir: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):  # .old survives a crash between the two renames
        d = out_dir / name
        if (d / TRAINER_STATE).is_file():
            return d
    return None


def _read_checkpoint(d: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    state = read_json_file(d / TRAINER_STATE, what="checkpoint state", error=ArtifactError)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise ArtifactError(f"checkpoint {d} has format {fmt!r}, expected {CKPT_FORMAT!r}")
    where = str(d / TRAINER_STATE)
    check_keys(state, CHECKPOINT_SCHEMA, where=where, required=_CKPT_REQUIRED, error=ArtifactError)
    check_keys(state["config"], {f.name: None for f in dataclasses.fields(TrainConfig)}, where=f"{where}: 'config'",
               error=ArtifactError)
    try:
        hook_w = load_file(str(d / "hook.safetensors"))
        opt_t = load_file(str(d / "optimizer.safetensors"))
    except Exception as e:  # JSON or safetensors errors of any kind
        raise ArtifactError(f"checkpoint {d} is corrupt or incomplete ({type(e).__name__}); "
                            "remove it to start over") from None
    return state, hook_w, opt_t


_NUM = (int, float)
_OPT_NUM = (int, float, type(None))

#: trainer_state.json: every key and its JSON type (unknown keys and wrong types are refused with the key's name).
CHECKPOINT_SCHEMA = {"format": str, "step": int, "micro": int, "tokens": int, "train_time": _NUM, "elapsed": _NUM,
                     "best_val": _OPT_NUM, "best_step": int, "bad_evals": int, "baseline": (dict, type(None)),
                     "history": list, "config": dict, "total_steps": int, "data_digest": (str, type(None)),
                     "stopped_early": bool, "param_groups": list}
_CKPT_REQUIRED = ("format", "step", "micro", "tokens", "train_time", "elapsed", "config", "param_groups")


def _rewrite_log(path: Path, history: list[dict]) -> None:
    """The log holds exactly ``history`` (drops lines written after the checkpoint a run resumes from)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in history:
            f.write(json.dumps(rec, default=_json_default) + "\n")
    os.replace(tmp, path)


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
