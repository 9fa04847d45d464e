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
from hookmoe.hook.module import DEFAULT_INIT, HOOK_FORMAT, Hook, INITS, R_INIT


SUBMODULE = "hookmoe_hook"  # attribute of the MoE block holding the Hook


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
    """The Hooks inserted into one model (one per hooked decoder layer).

    ``parameters()`` gives the trainable tensors; ``state_dict()`` the flat ``layers.<i>.*`` dict saved in
    ``hook.safetensors``; ``disabled()`` is a context manager that bypasses every Hook (the teacher in
    KD); ``remove()`` detaches them; ``save_pretrained(dir, **manifest)`` writes an artifact.
    """

    def __init__(self, mm, hooks: dict[int, Hook], handles: dict[int, Any], *, manifest: dict | None = None):
        self.mm = mm
        self.hooks = dict(sorted(hooks.items()))
        self._handles = dict(handles)
        self.manifest: dict = dict(manifest or {})

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.hooks)

    @property
    def inner_size(self) -> int:
        return next(iter(self.hooks.values())).inner_size

    @property
    def hidden_size(self) -> int:
        return next(iter(self.hooks.values())).hidden_size

    @property
    def init(self) -> str:
        return next(iter(self.hooks.values())).init

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def plan(self):
        """The routing plan recorded in the artifact (the one the Hook was trained for), or None."""
        from hookmoe.routing.plan import Plan

        p = self.manifest.get("plan")
        return Plan.from_dict(p) if p else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameters(self) -> Iterator[nn.Parameter]:
        for h in self.hooks.values():
            yield from h.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for i, h in self.hooks.items():
            for name, p in h.named_parameters():
                yield f"layers.{i}.{name}", p

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
        for h in self.hooks.values():
            h.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "HookSet":
        for h in self.hooks.values():
            h.train(mode)
        return self

    @contextlib.contextmanager
    def disabled(self):
        """Run the model as if no Hook were inserted (weights stay in place)."""
        prev = {i: h.enabled for i, h in self.hooks.items()}
        for h in self.hooks.values():
            h.enabled = False
        try:
            yield self
        finally:
            for i, h in self.hooks.items():
                h.enabled = prev[i]

    def remove(self) -> None:
        """Detach every Hook: delete the pre-hooks and the ``hookmoe_hook`` submodules."""
        for i, handle in self._handles.items():
            handle.remove()
            block = self.mm.layer(i).block
            if SUBMODULE in block._modules:
                del block._modules[SUBMODULE]
        self._handles.clear()
        if getattr(self.mm, "hookset", None) is self:
            self.mm.hookset = None

    # ---- artifact ------------------------------------------------------------------------------
    def describe(self) -> dict:
        total = sum(p.numel() for p in self.mm.model.parameters() if not _is_hook_param_of(self, p))
        return {
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "inner_size": self.inner_size,
            "init": self.init,
            "r_init": R_INIT,
            "dtype": str(next(self.parameters()).dtype).replace("torch.", ""),
            "params": self.num_params(),
            "params_fraction_of_model": self.num_params() / max(1, total),
            "r": {str(i): float(h.r.detach().float().item()) for i, h in self.hooks.items()},
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
    layers = parse_layers(layers, mm)
    if init not in INITS:
        raise ArtifactError(f"unknown hook init '{init}' (use one of: {', '.join(INITS)})")
    inner = int(inner_size or mm.hook_hidden_size)
    if inner < 1:
        raise ModelError(f"hook inner size must be >= 1, got {inner}")
    remove_hooks(mm)
    hidden = int(mm.config.hidden_size)
    dt = dtype or mm.dtype
    hooks, handles = {}, {}
    for i in layers:
        block = mm.layer(i).block
        h = Hook(hidden, inner, init, seed=seed + i, dtype=dt, device=mm.block_device(i))  # on its block's device
        block.add_module(SUBMODULE, h)
        hooks[i] = h
        handles[i] = block.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    hs = HookSet(mm, hooks, handles)
    mm.hookset = hs
    return hs


def remove_hooks(mm) -> None:
    """Remove every Hook from ``mm`` (those of its HookSet and any stray ``hookmoe_hook`` submodule)."""
    hs = getattr(mm, "hookset", None)
    if hs is not None:
        hs.remove()
    for layer in mm.layers:
        if SUBMODULE in layer.block._modules:
            del layer.block._modules[SUBMODULE]
    mm.hookset = None


def get_hooks(mm) -> HookSet | None:
    hs = getattr(mm, "hookset", None)
    return hs if hs is not None and hs.attached else None


def attach_hooks(mm, directory: str | Path, *, strict: bool = True, dtype: torch.dtype | None = None) -> HookSet:
    """Insert the Hooks saved in ``directory`` into ``mm`` (PEFT's ``from_pretrained``).

    Refuses (ArtifactError) an artifact for another model (hidden size, fingerprint with ``strict``,
    layers) or with a corrupt/truncated file. The artifact's plan is on ``HookSet.plan``; it is not
    applied here (pass ``plan=`` to :func:`hookmoe.models.load` or use ``mm.routing(hs.plan)``).
    """
    m = read_manifest(directory)
    _check_compat(mm, m, directory, strict)
    state = read_weights(directory, m)
    init = (m.get("hook") or {}).get("init", DEFAULT_INIT)
    init = init if init in INITS else DEFAULT_INIT
    w_dtype = state[f"layers.{m['_layers'][0]}.linear1.weight"].dtype
    hs = insert_hooks(mm, m["_layers"], m["_inner"], init, dtype=dtype or (w_dtype if mm.dtype == torch.float32
                                                                           else mm.dtype))
    hs.load_state_dict(state)
    hs.manifest = {k: v for k, v in m.items() if not k.startswith("_")}
    hs.manifest["directory"] = m["_dir"]  # in memory only: where the Hooks were loaded from
    return hs
