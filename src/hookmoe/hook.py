"""The Hook module (HookMoE): a tiny bias-free MLP placed in front of a chosen MoE block.

``x <- x + r * W2 ReLU(W1 x)`` with ``r`` a learnable scalar (0.5 at init). The Hook sits *inside* the
MoE block: a forward pre-hook on ``MoELayer.block`` replaces the block's input by the Hook's output, so
the router, the routed experts and the shared experts all see it. The decoder layer adds its residual
outside the block from the un-hooked input, so the residual stream is untouched — true for every
supported architecture (transformers 5.x: ``residual = h; h = post_attention_layernorm(h); h = mlp(h);
h = residual + h``; Granite scales by ``residual_multiplier``; GPT-OSS's block also returns router scores).

The Hook is registered as a real submodule of the block (``block.hookmoe_hook``), so ``state_dict``,
``.to()`` and ``requires_grad`` work; :func:`remove_hooks` deletes it and the pre-hook.

Like a PEFT adapter, a trained Hook is a directory (:func:`attach_hooks` / :meth:`HookSet.save_pretrained`):

* ``hook.safetensors`` — tensors ``layers.<i>.linear1.weight`` ``[inner, hidden]``,
  ``layers.<i>.linear2.weight`` ``[hidden, inner]``, ``layers.<i>.r`` ``[]`` per hooked decoder layer ``i``;
* ``hookmoe.json`` — format version, the base model (source, architecture, ``fingerprint()``, hidden
  size), hooked layers, hook dims and init, the routing plan it was trained for, training config, final
  metrics and the SHA-256 of the weights file.

Attaching it to a model it was not made for (other fingerprint, other hidden size, missing layer) or a
corrupt/truncated file is refused with an :class:`~hookmoe.errors.ArtifactError`.

``hookmoe export`` writes a self-contained directory: the base model (``save_pretrained``) and its
tokenizer, the hook (``hook/``), the plan (``plan.json``) and ``hookmoe_export.json``;
``hookmoe.models.load(OUT)`` restores all three (:func:`load_export`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_gemm import linear
from .errors import ArtifactError, ModelError

HOOK_FORMAT = "hookmoe-hook/1"
EXPORT_FORMAT = "hookmoe-export/1"
WEIGHTS_NAME = "hook.safetensors"
CONFIG_NAME = "hookmoe.json"
EXPORT_NAME = "hookmoe_export.json"
SUBMODULE = "hookmoe_hook"  # attribute of the MoE block holding the Hook
INITS = ("zero", "paper")
DEFAULT_INIT = "zero"  # measured: see benchmarks/results/hook_objectives.json
R_INIT = 0.5


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class Hook(nn.Module):
    """``x + r * linear2(relu(linear1(x)))``, both linears bias-free, ``r`` a learnable scalar.

    ``init="paper"``: standard ``nn.Linear`` init for both linears, ``r = 0.5``.
    ``init="zero"``: the same but ``linear2 = 0``, so the Hook starts as the identity (the model's
    output is bit-identical to the model without it) and only ``linear2`` gets a gradient at step 0.

    The Hook computes in its own dtype (keep fp32 master weights for training) and returns the input's
    dtype; under ``torch.autocast`` the linears run in the autocast dtype.
    """

    def __init__(self, hidden_size: int, inner_size: int, init: str = DEFAULT_INIT, *, r_init: float = R_INIT,
                 seed: int | None = 0, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if init not in INITS:
            raise ArtifactError(f"unknown hook init '{init}' (use one of: {', '.join(INITS)})")
        if hidden_size < 1 or inner_size < 1:
            raise ArtifactError(f"hook sizes must be positive, got hidden={hidden_size}, inner={inner_size}")
        self.hidden_size = int(hidden_size)
        self.inner_size = int(inner_size)
        self.init = init
        kw = {"dtype": dtype or torch.float32, "device": device}
        # built on the meta device (no global-RNG draw), then materialised and initialised from ``seed``
        self.linear1 = nn.Linear(hidden_size, inner_size, bias=False, device="meta", dtype=kw["dtype"])
        self.linear2 = nn.Linear(inner_size, hidden_size, bias=False, device="meta", dtype=kw["dtype"])
        self.linear1.to_empty(device=device or "cpu")
        self.linear2.to_empty(device=device or "cpu")
        self.r = nn.Parameter(torch.tensor(float(r_init), **kw))
        self.enabled = True  # plain attribute: not part of the state dict
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = 0) -> None:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.linear1.weight.device)
            gen.manual_seed(int(seed))
        with torch.no_grad():
            # nn.Linear's own default (kaiming-uniform, a=sqrt(5)), drawn from a private generator so that
            # inserting a Hook never disturbs the global RNG and is reproducible from ``seed``.
            for lin in (self.linear1, self.linear2):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
            if self.init == "zero":
                self.linear2.weight.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.linear1.weight, self.linear2.weight
        return self.r * linear(F.relu(linear(x.to(w1.dtype), w1)), w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return x + self.delta(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, inner={self.inner_size}, init={self.init}"


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


# --------------------------------------------------------------------------------------------------
# A set of hooks on a model
# --------------------------------------------------------------------------------------------------


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
        from .routing import Plan

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

        from . import __version__

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
            from .routing import Plan

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


def base_model_info(mm) -> dict:
    return {
        "source": mm.source,
        "arch": mm.arch,
        "fingerprint": mm.fingerprint(),
        "hidden_size": int(mm.config.hidden_size),
        "num_layers": mm.num_layers,
        "moe_layers": mm.moe_layer_indices,
    }


# --------------------------------------------------------------------------------------------------
# Insert / remove / attach
# --------------------------------------------------------------------------------------------------


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
        out = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    out.extend(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise ModelError(f"bad hook layer '{part}' (expected a layer number like 14, a list 14,15, "
                                 "a range 12-14 or all)") from None
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
    dev, dt = mm.device, dtype or mm.dtype
    hooks, handles = {}, {}
    for i in layers:
        block = mm.layer(i).block
        h = Hook(hidden, inner, init, seed=seed + i, dtype=dt, device=dev)
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
        m["_inner"] = int(h["inner_size"])
        m["_hidden"] = int(h["hidden_size"])
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
    for i in m["_layers"]:
        for name, shape in ((f"layers.{i}.linear1.weight", (m["_inner"], m["_hidden"])),
                            (f"layers.{i}.linear2.weight", (m["_hidden"], m["_inner"])),
                            (f"layers.{i}.r", ())):
            t = state.get(name)
            if t is None:
                raise ArtifactError(f"hook weights {wfile} lack tensor {name}")
            if tuple(t.shape) != shape:
                raise ArtifactError(f"hook tensor {name} in {wfile} has shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all():
                raise ArtifactError(f"hook tensor {name} in {wfile} holds NaN or inf values")
    return state


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


# --------------------------------------------------------------------------------------------------
# Export: base model + hook + plan in one directory
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hooks_detached(mm):
    """Temporarily take the Hook submodules out of the model (so ``save_pretrained`` omits them)."""
    taken = []
    for layer in mm.layers:
        h = layer.block._modules.pop(SUBMODULE, None)
        if h is not None:
            taken.append((layer.block, h))
    try:
        yield
    finally:
        for block, h in taken:
            block._modules[SUBMODULE] = h


def export_model(mm, out: str | Path, *, plan: Any = None, hook: str | Path | HookSet | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``mm``'s base model + tokenizer, a hook and a plan to ``out`` for :func:`load_export`.

    ``hook`` is an artifact directory or a HookSet (default: the Hooks in ``mm``); ``plan`` defaults to
    the hook's plan, else ``native``. The directory is assembled next to ``out`` and moved into place.
    """
    from .errors import PlanError
    from .routing import Dynamic, Plan

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"export directory {out} exists and is not empty")
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
        from . import __version__

        _write_json_atomic(tmp / EXPORT_NAME, {
            "format": EXPORT_FORMAT,
            "hookmoe_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": base_model_info(mm),
            "tokenizer_class": type(mm.tokenizer).__name__ if mm.tokenizer is not None else None,
            "plan": "plan.json",
            "hook": "hook" if hs is not None else None,
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_export(path: str | Path, **kw):
    """Load a directory written by :func:`export_model`: base model, tokenizer, hook and plan applied."""
    from .models import MoEModel, load_causal_lm

    d = Path(path)
    try:
        m = json.loads((d / EXPORT_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{d / EXPORT_NAME} is missing or corrupt") from e
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{d / EXPORT_NAME} has an unsupported format (expected {EXPORT_FORMAT!r})")
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


# --------------------------------------------------------------------------------------------------
# Small file helpers (shared with train.py)
# --------------------------------------------------------------------------------------------------


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


def _write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


# --------------------------------------------------------------------------------------------------
# CLI: hookmoe export
# --------------------------------------------------------------------------------------------------


def register_cli(app) -> None:
    import typer

    from .cli import MODEL_HELP, PLAN_HELP, console, load_model

    @app.command("export")
    def export_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        hook: Path = typer.Option(..., help="hook artifact directory (from `hookmoe train`)"),
        out: Path = typer.Option(..., help="output directory"),
        plan: Optional[str] = typer.Option(None, help=PLAN_HELP + " (default: the plan the hook was trained for)"),
        overwrite: bool = typer.Option(False, help="replace a non-empty output directory"),
        device: str = typer.Option("cpu", help="cpu | cuda | auto"),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        seed: int = typer.Option(0, help="seed for tiny:<arch> models"),
    ):
        """Write MODEL + hook + plan to one directory that `hookmoe.models.load(OUT)` restores."""
        m = read_manifest(hook)  # fail early on a bad artifact, before loading the model
        mm = load_model(model, device=device, dtype=dtype, seed=seed)
        _check_compat(mm, m, hook, strict=True)
        path = export_model(mm, out, plan=plan, hook=hook, overwrite=overwrite)
        from .routing import Plan

        p = Plan.parse(plan).describe() if plan else (Plan.from_dict(m["plan"]).describe() if m.get("plan") else "native")
        console.print(f"exported {model} + hook {hook} (layers {m['_layers']}) + plan {p} to {path}")


__all__ = [
    "Hook", "HookSet", "insert_hooks", "remove_hooks", "attach_hooks", "get_hooks", "read_manifest",
    "read_weights", "export_model", "load_export", "parse_layers", "base_model_info", "HOOK_FORMAT",
    "EXPORT_FORMAT", "DEFAULT_INIT", "INITS",
]
