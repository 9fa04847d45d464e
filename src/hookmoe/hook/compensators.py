"""Compensators: small trained modules that win back what a reduced routing plan loses. Four kinds share one
container (:class:`hookmoe.hook.inject.HookSet`), one training loop and one artifact layout:

``hook``
    The paper's Hook (:class:`~hookmoe.hook.module.Hook`) before the MoE block: router and experts see
    ``x + r W2 ReLU(W1 x)``.
``router``
    A router retune (Router-KD style): a trainable delta ``dW`` ``[num_experts, hidden]`` on the router's logit weight,
    zero at init. The router's own weight stays frozen and untouched: while the router runs, its weight parameter is
    swapped for ``W + dW`` (the router's own forward does the rest, so the plan's selection, group-limited routing,
    score corrections and CMoE's straight-through weights all see the corrected logits), and restored afterwards.
``output``
    A low-rank correction ``up(down(x))`` (rank ``R``, ``up`` zero at init) added to the MoE block's output, computed
    from the block's input: it targets the dropped experts' contribution directly.
``hook+router`` (and any ``+`` combination of the three parts)
    The parts together; each part's modules train jointly.

Every part is registered as a real submodule of the MoE block (``hookmoe_hook``, ``hookmoe_router``,
``hookmoe_output``) so ``state_dict``/``.to()`` work, and removing it restores the model bit for bit.

Parameter budgets (``budget="0.5%"``): :func:`size_for_budget` picks the Hook width and the output rank so that the
compensator's parameters stay within ``budget x`` the model's parameters (router deltas have a fixed size).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hookmoe.errors import ArtifactError, TrainingError
from hookmoe.kernels.cpu_gemm import linear


PARTS = ("hook", "router", "output")  # canonical order of the parts in a kind name


DEFAULT_KIND = "hook"


KINDS = ("hook", "router", "output", "hook+router", "hook+output", "router+output", "hook+router+output")


ROUTER_SUBMODULE = "hookmoe_router"  # attribute of the MoE block holding a router delta


OUTPUT_SUBMODULE = "hookmoe_output"  # attribute of the MoE block holding an output correction


def parse_kind(kind: Any) -> tuple[str, ...]:
    """``"hook+router"`` -> ``("hook", "router")`` (canonical order); unknown parts are refused (--kind)."""
    if kind is None:
        return (DEFAULT_KIND,)
    parts = [p.strip().lower() for p in str(kind).split("+") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ArtifactError(f"unknown compensator kind '{kind}' (--kind: one of {', '.join(KINDS)})")
    return tuple(p for p in PARTS if p in parts)


def kind_name(parts) -> str:
    return "+".join(p for p in PARTS if p in set(parts))


# ---- router delta ------------------------------------------------------------------------------------------------
def router_weight_name(router: nn.Module) -> str:
    """The router parameter whose product with the input gives (part of) the logits: ``weight`` ``[E, H]`` for
    transformers' routers, ``weight_linear`` for the CMoE router (its linear logit term)."""
    for name in ("weight_linear", "weight"):
        p = router._parameters.get(name)
        if isinstance(p, torch.Tensor) and p.dim() == 2:
            return name
    raise ArtifactError(f"cannot retune this router ({type(router).__name__}): it has no [experts, hidden] weight")


class RouterDelta(nn.Module):
    """``dW`` ``[num_experts, hidden]`` (zero at init) added to the router's logit weight while the router runs."""

    def __init__(self, num_experts: int, hidden_size: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.hidden_size = int(num_experts), int(hidden_size)
        self.delta = nn.Parameter(torch.zeros(self.num_experts, self.hidden_size, dtype=dtype or torch.float32,
                                              device=device))
        self.enabled = True

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}"


class _RouterForward:
    """Replaces ``router.forward`` (an instance attribute): runs the router's own forward with its weight swapped for
    ``W + dW``, and always puts the original parameter back."""

    def __init__(self, router: nn.Module, delta: RouterDelta, name: str):
        self.router, self.delta, self.name = router, delta, name
        self.original = router._parameters[name]
        self.forward = type(router).forward

    def __call__(self, *args, **kwargs):
        d = self.delta
        if not d.enabled:
            return self.forward(self.router, *args, **kwargs)
        w = self.original
        params = self.router._parameters
        params[self.name] = w + d.delta.to(w.dtype)  # a plain tensor for the duration of the call (grad to dW)
        try:
            out = self.forward(self.router, *args, **kwargs)
        finally:
            params[self.name] = w
        if self.straight_through and torch.is_grad_enabled() and d.delta.requires_grad:
            out = _straight_through(out, int(w.shape[0]))
        return out

    @property
    def straight_through(self) -> bool:
        return self.name != "weight_linear"  # the CMoE router has its own straight-through estimator


def _straight_through(out: tuple, num_experts: int) -> tuple:
    """Multiply the top-k weights by ``exp(log p - stop_grad(log p))`` (``p`` = softmax of the logits at the chosen
    experts): the value is exactly unchanged, but the gradient reaches the logits even where the router's weights do
    not depend on them (top-1 with renormalisation, softmax over the top-k values at k = 1)."""
    from hookmoe.compat import split_router_output

    ro = split_router_output(out, num_experts)
    if ro.logits is None:
        return out
    lp = torch.log_softmax(ro.logits.reshape(-1, num_experts).float(), -1)
    idx = ro.index.reshape(lp.shape[0], -1).long()
    sel = lp.gather(-1, idx)
    factor = torch.exp(sel - sel.detach()).reshape(ro.weights.shape).to(ro.weights.dtype)
    res = list(out)
    res[ro.order[1]] = ro.weights * factor
    return tuple(res)


class _Handle:
    def __init__(self, remove):
        self._remove = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


def attach_router_delta(layer, delta: RouterDelta) -> _Handle:
    """Insert ``delta`` into MoE layer ``layer`` (a :class:`~hookmoe.models.MoELayer`); returns a handle to remove it."""
    router, block = layer.router, layer.block
    name = router_weight_name(router)
    w = router._parameters[name]
    if tuple(w.shape) != (delta.num_experts, delta.hidden_size):
        raise ArtifactError(f"router delta of shape {(delta.num_experts, delta.hidden_size)} does not fit the router "
                            f"weight of layer {layer.index} ({tuple(w.shape)})")
    if "forward" in router.__dict__:
        raise ArtifactError(f"the router of layer {layer.index} already has a compensator or another forward wrapper")
    block.add_module(ROUTER_SUBMODULE, delta)
    router.forward = _RouterForward(router, delta, name)

    def remove():
        fw = router.__dict__.get("forward")
        if isinstance(fw, _RouterForward):
            router._parameters[name] = fw.original
            del router.__dict__["forward"]
        if block._modules.get(ROUTER_SUBMODULE) is delta:
            del block._modules[ROUTER_SUBMODULE]

    return _Handle(remove)


# ---- output correction -------------------------------------------------------------------------------------------
class OutputLowRank(nn.Module):
    """``y <- y + up(down(x))`` on the MoE block's output ``y``, ``x`` the block's input; ``up`` is zero at init."""

    def __init__(self, hidden_size: int, rank: int, *, seed: int | None = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        if rank < 1 or hidden_size < 1:
            raise ArtifactError(f"output correction sizes must be positive, got hidden={hidden_size}, rank={rank}")
        self.hidden_size, self.rank = int(hidden_size), int(rank)
        dt = dtype or torch.float32
        self.down = nn.Parameter(torch.empty(self.rank, self.hidden_size, dtype=dt, device=device))
        self.up = nn.Parameter(torch.zeros(self.hidden_size, self.rank, dtype=dt, device=device))
        self.enabled = True
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.down.device)
            gen.manual_seed(int(seed))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=gen)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x.to(self.down.dtype), self.down), self.up)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, rank={self.rank}"


def _output_hook(block: nn.Module, args: tuple, kwargs: dict, out):
    mod = block._modules.get(OUTPUT_SUBMODULE)
    if mod is None or not mod.enabled:
        return None
    x = args[0] if args else next((kwargs[k] for k in ("hidden_states", "layer_input", "x") if k in kwargs), None)
    if x is None:
        raise RuntimeError("cannot find the MoE block's input for the output correction")
    y = out[0] if isinstance(out, (tuple, list)) else out
    y = y + mod.delta(x).reshape(y.shape).to(y.dtype)
    if isinstance(out, tuple):
        return (y,) + out[1:]
    if isinstance(out, list):
        return [y] + out[1:]
    return y


def attach_output(layer, mod: OutputLowRank) -> _Handle:
    block = layer.block
    block.add_module(OUTPUT_SUBMODULE, mod)
    h = block.register_forward_hook(_output_hook, with_kwargs=True)

    def remove():
        h.remove()
        if block._modules.get(OUTPUT_SUBMODULE) is mod:
            del block._modules[OUTPUT_SUBMODULE]

    return _Handle(remove)


# ---- parameter budgets -------------------------------------------------------------------------------------------
def parse_budget(spec: Any) -> tuple[str, float]:
    """``"0.5%"`` -> ("fraction", 0.005); ``0.005`` -> fraction; ``"120000"`` (>= 1) -> ("params", 120000)."""
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            v = float(s[:-1]) / 100.0
            kind = "fraction"
        else:
            v = float(s)
            kind = "params" if v >= 1 else "fraction"
    except ValueError:
        raise TrainingError(f"bad --budget '{spec}' (use a percentage of the model's parameters like 0.5%, "
                          "or a parameter count)") from None
    if not (v > 0 and math.isfinite(v)):
        raise TrainingError(f"--budget must be positive, got '{spec}'")
    return kind, v


def base_param_count(mm) -> int:
    """The model's parameters without any compensator."""
    own = set()
    for layer in mm.layers:
        for name in ("hookmoe_hook", ROUTER_SUBMODULE, OUTPUT_SUBMODULE):
            m = layer.block._modules.get(name)
            if m is not None:
                own.update(id(p) for p in m.parameters())
    return sum(p.numel() for p in mm.model.parameters() if id(p) not in own)


def budget_params(mm, spec: Any) -> int:
    kind, v = parse_budget(spec)
    return int(v) if kind == "params" else int(math.floor(v * base_param_count(mm)))


def part_params(mm, part: str, n_layers: int, size: int = 0) -> int:
    """Parameters of one part at ``n_layers`` layers (``size`` = Hook width or output rank)."""
    h = int(mm.config.hidden_size)
    if part == "router":
        return n_layers * mm.num_experts * h
    if part == "hook":
        return n_layers * (2 * h * size + 1)
    if part == "output":
        return n_layers * 2 * h * size
    raise ValueError(part)


def size_for_budget(mm, kind: Any, layers: dict[str, list[int]], budget: Any) -> dict:
    """Hook width and output rank that keep ``kind`` at ``layers`` (per part) within ``budget``.

    Router deltas have a fixed size; what is left is split evenly between the Hook and the output parts.
    Returns ``{"inner_size", "rank", "params", "budget_params"}`` (sizes None for absent parts).
    """
    parts = parse_kind(kind)
    total = budget_params(mm, budget)
    fixed = part_params(mm, "router", len(layers.get("router", []))) if "router" in parts else 0
    left = total - fixed
    if left < 0:
        raise TrainingError(f"--budget {budget} ({total:,} parameters) is below what the router deltas alone need "
                          f"({fixed:,}); raise --budget or retune fewer layers (--layer)")
    sized = [p for p in ("hook", "output") if p in parts]
    out = {"inner_size": None, "rank": None}
    h = int(mm.config.hidden_size)
    for p in sized:
        n = len(layers[p])
        share = left // len(sized)
        size = (share - (n if p == "hook" else 0)) // (2 * h * n)
        if size < 1:
            raise TrainingError(f"--budget {budget} ({total:,} parameters) leaves no room for a {p} at {n} layer(s); "
                              "raise --budget or use fewer layers (--layer)")
        out["inner_size" if p == "hook" else "rank"] = int(size)
    used = fixed + sum(part_params(mm, p, len(layers[p]), out["inner_size" if p == "hook" else "rank"]) for p in sized)
    out.update(params=int(used), budget_params=int(total))
    return out
