"""Models across devices: accelerate's ``device_map`` / ``max_memory`` / ``offload_folder``.

Every command that loads a model takes ``--device-map auto|balanced|balanced_low_0|sequential|FILE.json``,
``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` and ``--offload-folder DIR``; the Python API
(:func:`hookmoe.models.load`) takes ``device_map=``, ``max_memory=`` and ``offload_folder=``. Hub ids and local
directories are loaded by transformers' ``from_pretrained`` with these arguments; ``tiny:<arch>`` models are built
in memory and dispatched with accelerate's ``infer_auto_device_map`` + ``dispatch_model`` (the same engine).

Before any weight is read, :func:`check_fits` places the model's meta-device skeleton with the same
``max_memory``: if some weights would land on the ``disk`` and no offload folder is given, the load stops with one
line saying how much of the model fits.

With a dispatched model, inputs go to the embedding's execution device (:func:`input_device`) and every Hook to its
MoE block's execution device (:func:`execution_device`); accelerate's hooks move activations between devices and
stream CPU/disk-offloaded weights in for each forward.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hookmoe.errors import ModelError


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` (or a dict) → ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    if spec is None or spec == "" or isinstance(spec, dict) and not spec:
        return None
    items = spec.items() if isinstance(spec, dict) else _pairs(str(spec))
    out: dict[Any, Any] = {}
    for key, value in items:
        k = str(key).strip()
        if k.isdigit():
            dev: Any = int(k)
        elif k.startswith("cuda:") and k[5:].isdigit():
            dev = int(k[5:])
        elif k in ("cpu", "disk", "mps"):
            dev = k
        else:
            raise ModelError(f"--max-memory: unknown device '{k}' (use GPU numbers 0,1,.., cpu or disk)")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[dev] = int(value)
            continue
        m = _SIZE.match(str(value))
        if not m:
            raise ModelError(f"--max-memory: bad size '{value}' for {k} (e.g. 70GiB, 500MB, 2000000)")
        out[dev] = str(value).strip() if m.group(2) else int(float(m.group(1)))
    return out


def _pairs(text: str):
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ModelError(f"--max-memory: '{part}' is not DEVICE=SIZE (e.g. 0=70GiB,1=70GiB,cpu=200GiB)")
        yield tuple(part.split("=", 1))


def parse_device_map(spec: str | dict | None) -> str | dict | None:
    """``auto``/``balanced``/``balanced_low_0``/``sequential``, a JSON file ``{"module.name": device}`` or a dict."""
    if spec is None or isinstance(spec, dict):
        return spec
    s = str(spec).strip()
    if s in ("", "none"):
        return None
    if s in DEVICE_MAPS:
        return s
    path = Path(s).expanduser()
    if path.suffix == ".json" or path.exists():
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"--device-map: cannot read {s} ({type(e).__name__})") from None
        if not isinstance(d, dict) or not d:
            raise ModelError(f"--device-map: {s} must hold a JSON object {{module name: device}}")
        return {str(k): (int(v) if isinstance(v, str) and v.isdigit() else v) for k, v in d.items()}
    raise ModelError(f"--device-map: unknown value '{s}' (use {', '.join(DEVICE_MAPS)} or a FILE.json)")


def wants_dispatch(device_map, max_memory, offload_folder) -> bool:
    return device_map is not None or bool(max_memory) or offload_folder is not None


def _no_split(model: nn.Module) -> list[str]:
    ns = getattr(model, "_no_split_modules", None) or []
    return sorted(set(ns) if not isinstance(ns, str) else {ns})


def infer_device_map(model: nn.Module, device_map: str | dict | None, max_memory: dict | None,
                     dtype: torch.dtype | None) -> dict:
    """The ``{module name: device}`` map accelerate (as transformers does) gives ``model`` (real or meta)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if isinstance(device_map, dict):
        return dict(device_map)
    device_map = device_map or "auto"
    no_split = _no_split(model)
    mem = dict(max_memory) if max_memory else None
    if device_map != "sequential":
        mem = get_balanced_memory(model, max_memory=mem, no_split_module_classes=no_split, dtype=dtype,
                                  low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split, dtype=dtype)


def _bytes(model: nn.Module, dtype: torch.dtype | None, names: list[str] | None = None) -> int:
    size = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or (names is not None and not any(name == n or name.startswith(n + ".") or n == ""
                                                           for n in names)):
            continue
        seen.add(id(p))
        nb = torch.empty((), dtype=dtype).element_size() if dtype is not None and p.is_floating_point() \
            else p.element_size()
        size += p.numel() * nb
    return size


def check_fits(model: nn.Module, device_map, max_memory: dict | None, offload_folder, dtype: torch.dtype | None,
               layers: nn.ModuleList | None = None) -> dict:
    """Place ``model`` (its meta skeleton is enough) and refuse, with what would fit, a placement that needs the
    disk without ``--offload-folder``. Returns the device map."""
    dm = infer_device_map(model, device_map, max_memory, dtype)
    disk = [n for n, d in dm.items() if d == "disk"]
    if disk and offload_folder is None:
        total = _bytes(model, dtype)
        on_disk = _bytes(model, dtype, disk)
        fit = ""
        if layers is not None:
            names = {id(m): n for n, m in model.named_modules()}
            n_layers = len(layers)
            n_disk = sum(1 for layer in layers if _placed(names.get(id(layer), ""), dm) == "disk")
            fit = f"; {n_layers - n_disk} of {n_layers} decoder layers fit"
        given = ", ".join(f"{k}={v}" for k, v in (max_memory or {}).items()) or "the free memory of this machine"
        raise ModelError(f"the weights need {_human(total)} but only {_human(total - on_disk)} fit in --max-memory "
                         f"({given}){fit}: give more memory or add --offload-folder DIR to offload the rest "
                         f"({_human(on_disk)}) to disk")
    return dm


def _human(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _placed(name: str, dm: dict):
    """The device the map gives module ``name`` (its own entry or its closest ancestor's)."""
    best, best_len = None, -1
    for k, d in dm.items():
        if (k == "" or name == k or name.startswith(k + ".")) and len(k) > best_len:
            best, best_len = d, len(k)
    return best


def dispatch(model: nn.Module, device_map, max_memory: dict | None, offload_folder, dtype: torch.dtype | None):
    """Dispatch an in-memory model (``tiny:<arch>``) across devices / CPU / disk with accelerate."""
    from accelerate import dispatch_model

    dm = check_fits(model, device_map, max_memory, offload_folder, dtype, _layers(model))
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    tied = getattr(model, "_tied_weights_keys", None)
    model = dispatch_model(model, device_map=dm, offload_dir=str(offload_folder) if offload_folder else None,
                           skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.hf_device_map = dm
    del tied
    return model


def precheck(spec: str, device_map, max_memory: dict | None, offload_folder, dtype: torch.dtype | None,
             trust_remote_code: bool = False) -> None:
    """Before ``from_pretrained`` reads any weight: the skeleton of ``spec`` placed with the same arguments."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(device_map, dict) or (device_map is None and not max_memory):
        return
    try:
        cfg = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            skel = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception:  # the real load reports config problems with its own message
        return
    check_fits(skel, device_map, max_memory, offload_folder, dtype, _layers(skel))


def _layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers (for the "N of M layers fit" message), if found."""
    base = getattr(model, "model", model)
    for obj in (base, getattr(base, "language_model", None)):
        if obj is not None and isinstance(getattr(obj, "layers", None), nn.ModuleList):
            return obj.layers
    return None


def is_dispatched(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None)) and any(
        getattr(m, "_hf_hook", None) is not None for m in model.modules())


def execution_device(model: nn.Module, module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its (or its closest ancestor's) accelerate hook's execution device, else
    the device of its first real (non-meta) parameter, else the model's main device."""
    if getattr(module, "_hf_hook", None) is not None:
        dev = _hook_device(module._hf_hook)
        if dev is not None:
            return dev
    dm = getattr(model, "hf_device_map", None)
    if dm:
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name is not None:
            parts = name.split(".")
            mods = dict(model.named_modules())
            for i in range(len(parts), -1, -1):
                anc = mods.get(".".join(parts[:i]))
                dev = _hook_device(getattr(anc, "_hf_hook", None)) if anc is not None else None
                if dev is not None:
                    return dev
            placed = _placed(name, dm)
            if placed is not None and placed not in ("cpu", "disk"):
                return torch.device(f"cuda:{placed}" if isinstance(placed, int) else placed)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _hook_device(hook) -> torch.device | None:
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or (hook,):  # SequentialHook
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            if isinstance(dev, int):
                return torch.device("cuda", dev)
            return torch.device(dev)
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embedding's execution device (the first parameter's device if undispatched)."""
    if getattr(model, "hf_device_map", None):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:
            return execution_device(model, emb)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
