"""Placing Hooks: a forward pre-hook on the chosen MoE blocks replaces their input by the Hook's output (router,
routed and shared experts see it; the residual stream does not). :class:`HookSet` is the set attached to a model."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from hookmoe.errors import ArtifactError, ModelError
from hookmoe.layerspec import parse_layer_list
from hookmoe.hook.artifact import CONFIG_NAME, WEIGHTS_NAME, _check_compat, _chmod_default, _sha256, _write_json_atomic, base_model_info, read_manifest, read_weights
from hookmoe.hook.compensators import (OUTPUT_SUBMODULE, PARTS, ROUTER_SUBMODULE, OutputLowRank, RouterDelta,
                                       attach_output, attach_router_delta, kind_name, parse_kind)
from hookmoe.hook.module import DEFAULT_INIT, HOOK_FORMAT, Hook, INITS, R_INIT


SUBMODULE = "hookmoe_hook"  # attribute of the MoE block holding the Hook


SUBMODULES = (SUBMODULE, ROUTER_SUBMODULE, OUTPUT_SUBMODULE)  # every compensator submodule name


_PREFIX = {"hook": "layers", "router": "router", "output": "output"}  # state-dict prefix per part


def _pre_hook(block: nn.Module, args: tuple, kwargs: dict):
    hook = block._modules.get(SUBMODULE)
    if hook is None or not hook.enabled:
        return None
    if args:
        return (hook(args[0]),) + tuple(args[1:]), kwargs
    for key in ("hidden_states", "layer_input", "x"):
        if key in kwargs:
            kwargs = dict(kwargs)
            kwargs[key] = hook(kwargs[key])
            return args, kwargs
    raise RuntimeError("cannot find the MoE block's input to hook (no positional argument or hidden_states)")


class HookSet:
    """The compensators inserted into one model: Hooks (one per hooked decoder layer) and, for other kinds
    (:mod:`hookmoe.hook.compensators`), router deltas and output corrections.

    ``parameters()`` gives the trainable tensors; ``state_dict()`` the flat dict saved in ``hook.safetensors``
    (``layers.<i>.*`` for Hooks, ``router.<i>.delta``, ``output.<i>.{down,up}``); ``disabled()`` is a context
    manager that bypasses every compensator (the teacher in KD); ``remove()`` detaches them;
    ``save_pretrained(dir, **manifest)`` writes an artifact. ``hooks`` holds the Hook part only, ``parts`` every
    part by name, ``kind`` names them (``hook``, ``router``, ``output``, ``hook+router``, ...).
    """

    def __init__(self, mm, hooks: dict[int, Hook], handles: Any, *, manifest: dict | None = None,
                 parts: dict[str, dict[int, nn.Module]] | None = None):
        self.mm = mm
        self.hooks = dict(sorted(hooks.items()))
        self.parts: dict[str, dict[int, nn.Module]] = {}
        all_parts = dict(parts or {})
        all_parts["hook"] = self.hooks
        for name in PARTS:
            if all_parts.get(name):
                self.parts[name] = self.hooks if name == "hook" else dict(sorted(all_parts[name].items()))
        self._handles = list(handles.values()) if isinstance(handles, dict) else list(handles)
        self.manifest: dict = dict(manifest or {})

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return kind_name(self.parts)

    @property
    def layers(self) -> list[int]:
        """Every decoder layer that holds a compensator (for a Hook-only set: the hooked layers)."""
        return sorted({i for mods in self.parts.values() for i in mods})

    def part_layers(self) -> dict[str, list[int]]:
        return {name: list(mods) for name, mods in self.parts.items()}

    @property
    def inner_size(self) -> int | None:
        return next(iter(self.hooks.values())).inner_size if self.hooks else None

    @property
    def rank(self) -> int | None:
        out = self.parts.get("output")
        return next(iter(out.values())).rank if out else None

    @property
    def hidden_size(self) -> int:
        return int(self.mm.config.hidden_size)

    @property
    def init(self) -> str:
        return next(iter(self.hooks.values())).init if self.hooks else DEFAULT_INIT

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def plan(self):
        """The routing plan recorded in the artifact (the one the Hook was trained for), or None."""
        from hookmoe.routing.plan import Plan

        p = self.manifest.get("plan")
        return Plan.from_dict(p) if p else None

    def modules(self) -> Iterator[nn.Module]:
        for mods in self.parts.values():
            yield from mods.values()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules():
            yield from m.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for part, mods in self.parts.items():
            for i, m in mods.items():
                for name, p in m.named_parameters():
                    yield f"{_PREFIX[part]}.{i}.{name}", p

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ArtifactError(f"hook weights do not match the hooked layers (missing: {missing[:3]}, "
                                f"unexpected: {extra[:3]})")
        with torch.no_grad():
            for name, p in own.items():
                t = state[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ArtifactError(f"hook tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.device, p.dtype))

    def requires_grad_(self, flag: bool = True) -> "HookSet":
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def to(self, *args, **kwargs) -> "HookSet":
        for m in self.modules():
            m.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "HookSet":
        for m in self.modules():
            m.train(mode)
        return self

    @contextlib.contextmanager
    def disabled(self):
        """Run the model as if no compensator were inserted (weights stay in place)."""
        mods = list(self.modules())
        prev = [m.enabled for m in mods]
        for m in mods:
            m.enabled = False
        try:
            yield self
        finally:
            for m, e in zip(mods, prev):
                m.enabled = e

    def remove(self) -> None:
        """Detach every compensator: delete the hooks/wrappers and the ``hookmoe_*`` submodules."""
        for handle in self._handles:
            handle.remove()
        for i in self.hooks:
            block = self.mm.layer(i).block
            if SUBMODULE in block._modules:
                del block._modules[SUBMODULE]
        self._handles.clear()
        if getattr(self.mm, "hookset", None) is self:
            self.mm.hookset = None

    # ---- artifact ------------------------------------------------------------------------------
    def describe(self) -> dict:
        total = sum(p.numel() for p in self.mm.model.parameters() if not _is_hook_param_of(self, p))
        parts = {}
        for name, mods in self.parts.items():
            d = {"layers": list(mods), "params": sum(p.numel() for m in mods.values() for p in m.parameters())}
            if name == "hook":
                d["inner_size"] = self.inner_size
            elif name == "router":
                d["experts"] = next(iter(mods.values())).num_experts
            else:
                d["rank"] = self.rank
            parts[name] = d
        return {
            "kind": self.kind,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "inner_size": self.inner_size,
            "init": self.init,
            "r_init": R_INIT,
            "dtype": str(next(self.parameters()).dtype).replace("torch.", ""),
            "params": self.num_params(),
            "params_fraction_of_model": self.num_params() / max(1, total),
            "r": {str(i): float(h.r.detach().float().item()) for i, h in self.hooks.items()},
            "parts": parts,
        }

    def save_pretrained(self, directory: str | Path, *, plan: Any = None, training: dict | None = None,
                        metrics: dict | None = None, **extra) -> Path:
        """Write ``hook.safetensors`` + ``hookmoe.json`` to ``directory`` (atomically per file)."""
        from safetensors.torch import save_file

        from hookmoe._version import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": HOOK_FORMAT})
        _chmod_default(tmp, 0o666)
        digest = _sha256(tmp)
        os.replace(tmp, directory / WEIGHTS_NAME)
        if plan is None:
            plan = self.manifest.get("plan")
        if plan is not None and not isinstance(plan, dict):
            from hookmoe.routing.plan import Plan

            plan = Plan.parse(plan).to_dict()
        manifest = {
            "format": HOOK_FORMAT,
            "hookmoe_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": base_model_info(self.mm),
            "kind": self.kind,
            "hook": self.describe(),
            "plan": plan,
            "training": training if training is not None else self.manifest.get("training"),
            "metrics": metrics if metrics is not None else self.manifest.get("metrics"),
            "weights": {"file": WEIGHTS_NAME, "sha256": digest},
        }
        from hookmoe.hook.artifact import MANIFEST_SCHEMA

        unknown = sorted(set(extra) - set(MANIFEST_SCHEMA))
        if unknown:  # readers refuse unknown manifest keys, so writers must not make them
            raise TypeError(f"save_pretrained got unknown manifest keys: {', '.join(unknown)}")
        manifest.update(extra)
        _write_json_atomic(directory / CONFIG_NAME, manifest)
        self.manifest = manifest
        return directory

    # PEFT-style alias
    @classmethod
    def from_pretrained(cls, mm, directory: str | Path, **kw) -> "HookSet":
        return attach_hooks(mm, directory, **kw)


def _is_hook_param_of(hs: HookSet, p: torch.Tensor) -> bool:
    return any(p is q for q in hs.parameters())


def parse_layers(spec: Any, mm=None) -> list[int]:
    """``"14"``, ``"14,15"``, ``"12-14"``, ``"all"`` (every MoE layer; needs ``mm``), an int or a list →
    sorted unique decoder-layer indices."""
    if isinstance(spec, int):
        out = [spec]
    elif isinstance(spec, str) and spec.strip().lower() == "all":
        if mm is None:
            raise ModelError("hook layers 'all' need the model (to know its MoE layers)")
        out = list(mm.moe_layer_indices)
    elif isinstance(spec, str):
        out = parse_layer_list(spec, "bad hook layer: --layer", ModelError)
    else:
        try:
            out = [int(x) for x in spec]
        except (TypeError, ValueError):
            raise ModelError(f"bad hook layers {spec!r}") from None
    if not out:
        raise ModelError("no hook layer given (e.g. --layer 14)")
    out = sorted(set(out))
    if mm is not None:
        for i in out:
            mm.layer(i)  # raises ModelError with the list of MoE layers
    return out


def insert_hooks(mm, layers: Any, inner_size: int | None = None, init: str = DEFAULT_INIT, *, seed: int = 0,
                 dtype: torch.dtype | None = None) -> HookSet:
    """Insert a fresh Hook before the MoE block of each of ``layers`` (decoder-layer indices).

    ``inner_size`` defaults to ``mm.hook_hidden_size`` (the paper's width); ``dtype`` to the model's dtype
    (train with ``torch.float32`` master weights). Hooks already in the model are removed first.
    Each layer's Hook is seeded with ``seed + layer`` so results do not depend on the other layers chosen.
    """
    return insert_compensators(mm, "hook", layers, inner_size=inner_size, init=init, seed=seed, dtype=dtype)


def default_rank(mm) -> int:
    """The output correction's default rank: half an expert's width."""
    return max(1, mm.expert_intermediate_size // 2)


def insert_compensators(mm, kind: Any = "hook", layers: Any = "all", *, inner_size: int | None = None,
                        rank: int | None = None, init: str = DEFAULT_INIT, seed: int = 0,
                        dtype: torch.dtype | None = None, part_layers: dict[str, Any] | None = None) -> HookSet:
    """Insert fresh compensators of ``kind`` (``hook``, ``router``, ``output``, ``hook+router``, ...) at ``layers``.

    ``part_layers`` overrides the layers of single parts (``{"router": "all"}``). Hook: width ``inner_size``
    (default: the paper's), ``init``; router: a zero delta on the router weight; output: rank ``rank`` (default
    :func:`default_rank`), ``up`` zero. All start as the identity except a Hook with ``init="paper"``. Anything
    inserted before is removed first. Each module is seeded from ``seed + layer``.
    """
    parts = parse_kind(kind)
    base_layers = parse_layers(layers, mm)
    per_part = {p: parse_layers((part_layers or {}).get(p, base_layers), mm) for p in parts}
    if init not in INITS:
        raise ArtifactError(f"unknown hook init '{init}' (use one of: {', '.join(INITS)})")
    inner = int(inner_size or mm.hook_hidden_size)
    if "hook" in parts and inner < 1:
        raise ModelError(f"hook inner size must be >= 1, got {inner}")
    r = int(rank or default_rank(mm))
    remove_hooks(mm)
    hidden = int(mm.config.hidden_size)
    dt = dtype or mm.dtype
    hooks, handles, others = {}, [], {"router": {}, "output": {}}
    try:
        for i in per_part.get("hook", []):
            block = mm.layer(i).block
            h = Hook(hidden, inner, init, seed=seed + i, dtype=dt, device=mm.block_device(i))
            block.add_module(SUBMODULE, h)
            hooks[i] = h
            handles.append(block.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        for i in per_part.get("router", []):
            d = RouterDelta(mm.num_experts, hidden, dtype=dt, device=mm.block_device(i))
            handles.append(attach_router_delta(mm.layer(i), d))
            others["router"][i] = d
        for i in per_part.get("output", []):
            o = OutputLowRank(hidden, r, seed=seed + i, dtype=dt, device=mm.block_device(i))
            handles.append(attach_output(mm.layer(i), o))
            others["output"][i] = o
    except BaseException:
        for h in handles:
            h.remove()
        remove_hooks(mm)
        raise
    hs = HookSet(mm, hooks, handles, parts=others)
    mm.hookset = hs
    return hs


def remove_hooks(mm) -> None:
    """Remove every Hook from ``mm`` (those of its HookSet and any stray ``hookmoe_hook`` submodule)."""
    hs = getattr(mm, "hookset", None)
    if hs is not None:
        hs.remove()
    for layer in mm.layers:
        fw = layer.router.__dict__.get("forward")
        if fw is not None and hasattr(fw, "original") and hasattr(fw, "delta"):  # a stray router delta wrapper
            layer.router._parameters[fw.name] = fw.original
            del layer.router.__dict__["forward"]
        for name in SUBMODULES:
            if name in layer.block._modules:
                del layer.block._modules[name]
    mm.hookset = None


def get_hooks(mm) -> HookSet | None:
    hs = getattr(mm, "hookset", None)
    return hs if hs is not None and hs.attached else None


def attach_hooks(mm, directory: str | Path, *, strict: bool = True, dtype: torch.dtype | None = None) -> HookSet:
    """Insert the compensators saved in ``directory`` into ``mm`` (PEFT's ``from_pretrained``); any kind.

    Refuses (ArtifactError) an artifact for another model (hidden size, fingerprint with ``strict``,
    layers) or with a corrupt/truncated file. The artifact's plan is on ``HookSet.plan``; it is not
    applied here (pass ``plan=`` to :func:`hookmoe.models.load` or use ``mm.routing(hs.plan)``).
    """
    m = read_manifest(directory)
    _check_compat(mm, m, directory, strict)
    state = read_weights(directory, m)
    init = (m.get("hook") or {}).get("init", DEFAULT_INIT)
    init = init if init in INITS else DEFAULT_INIT
    w_dtype = next(iter(state.values())).dtype
    parts = m["_parts"]
    hs = insert_compensators(mm, m["_kind"], m["_layers"], inner_size=m["_inner"] or None,
                             rank=(parts.get("output") or {}).get("rank"), init=init,
                             dtype=dtype or (w_dtype if mm.dtype == torch.float32 else mm.dtype),
                             part_layers={p: d["layers"] for p, d in parts.items()})
    hs.load_state_dict(state)
    hs.manifest = {k: v for k, v in m.items() if not k.startswith("_")}
    hs.manifest["directory"] = m["_dir"]  # in memory only: where the Hooks were loaded from
    return hs
