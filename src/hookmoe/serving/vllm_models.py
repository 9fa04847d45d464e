"""vLLM model classes of hookmoe's plugin (imports vLLM; loaded by vLLM through the plugin's registry entries).

``Hookmoe<Class>`` subclasses vLLM's own ``<Class>`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2)
and changes routing only:

* **per-layer static k** — every MoE layer is built with its own ``top_k``: while vLLM's constructor runs,
  the model module's ``FusedMoEFactory`` is wrapped so that the layer named in its ``prefix``
  (``model.layers.<i>....``) gets the plan's k (``topk``, ``tlnle``, ``layers``). vLLM then selects, weights
  and computes exactly k experts per token in that layer — the same as the architecture built with that k,
  which is what hookmoe's ``topk`` means;
* **dynamic rules** (``topp``, ``ratio``, ``naee``, ``entropy``) — the layer is built with the rule's
  candidate cap and a ``custom_routing_function`` that runs hookmoe's own selector
  (:func:`hookmoe.routing.make_selector`) on the router's candidates; dropped slots get weight 0 and
  are still computed by vLLM's fused-MoE kernels (see docs/serving.md);
* **Hooks** — a ``hookmoe_hook`` submodule on the MoE block of each hooked layer and a forward pre-hook that
  replaces the block's input by the Hook's output: router, routed and shared experts see it, the residual
  stream does not (as in :mod:`hookmoe.hook`). Its weights come from the export's ``hook/`` artifact.

Nothing else changes: attention, KV cache, tensor/pipeline parallelism and weight loading are vLLM's. A
Hook is replicated on every tensor-parallel rank (it is tiny; the MoE block's input is replicated).
"""

from __future__ import annotations

import contextlib
import importlib
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hookmoe.serving.spec import ARCH_PREFIX, VLLM_ARCHS, ServingSpec
from hookmoe.serving.vllm_plugin import check_export

SUBMODULE = "hookmoe_hook"  # same attribute name as hookmoe.hook
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class VllmHook(nn.Module):
    """hookmoe's Hook, ``x + r * W2 ReLU(W1 x)``, with plain ``F.linear`` (same parameter names and maths as
    :class:`hookmoe.hook.Hook`: computed in the Hook's dtype, returned in the input's)."""

    def __init__(self, hidden_size: int, inner_size: int, dtype: torch.dtype):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, inner_size, bias=False, dtype=dtype)
        self.linear2 = nn.Linear(inner_size, hidden_size, bias=False, dtype=dtype)
        self.r = nn.Parameter(torch.zeros((), dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.linear1.weight
        delta = self.r * F.linear(F.relu(F.linear(x.to(w1.dtype), w1)), self.linear2.weight)
        return x + delta.to(x.dtype)


def _pre_hook(block: nn.Module, args: tuple, kwargs: dict):
    hook = block._modules[SUBMODULE]
    if args:
        return (hook(args[0]),) + tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hook(kwargs["hidden_states"])
        return args, kwargs
    raise RuntimeError("hookmoe: cannot find the MoE block's input to hook")


def routing_function(spec: ServingSpec, layer: int):
    """vLLM ``custom_routing_function`` running the dynamic rule of ``layer`` with hookmoe's selector.

    Candidates are the architecture's own (softmax, top-``topk`` sorted, renormalised where vLLM's layer
    renormalises); the rule keeps a prefix of them per token (always >= 1); kept weights follow the rule's
    ``renorm``; dropped slots keep their expert id with weight 0.
    """
    from hookmoe.routing.rules import make_selector

    rule = spec.dynamic(layer)
    cap = rule.max_k or spec.native_k
    select = make_selector(rule, cap, spec.score, renorm=rule.renorm == "native" and spec.renormalize,
                           sorted_candidates=True)

    def route(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool):
        logits = gating_output.float()
        probs = logits.softmax(-1)
        w, idx = probs.topk(topk, dim=-1)  # sorted, like transformers' routers
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        new_w, _ = select(logits, w, idx)
        return new_w, idx.to(torch.int32)

    route.hookmoe_rule = rule.describe()
    return route


@contextlib.contextmanager
def per_layer_factory(module, spec: ServingSpec):
    """While vLLM builds the model: ``module.FusedMoEFactory`` gives each MoE layer the plan's k (and routing fn)."""
    orig = module.FusedMoEFactory

    def factory(*args, **kwargs):
        m = _LAYER.search(kwargs.get("prefix", ""))
        if m is not None and int(m.group(1)) in spec.rules:
            i = int(m.group(1))
            if "top_k" not in kwargs:
                raise RuntimeError("hookmoe: this vLLM passes top_k positionally; the plugin needs a newer hookmoe")
            kwargs["top_k"] = spec.top_k(i)
            if spec.dynamic(i) is not None:
                if kwargs.get("use_grouped_topk"):
                    from hookmoe.errors import PlanError

                    raise PlanError(f"vLLM routes {spec.arch} with grouped top-k, which takes no custom routing "
                                    "function: export a static plan (topk, tlnle, layers) for vLLM")
                kwargs["custom_routing_function"] = routing_function(spec, i)
        return orig(*args, **kwargs)

    module.FusedMoEFactory = factory
    try:
        yield
    finally:
        module.FusedMoEFactory = orig


def _make_class(arch: str) -> type:
    modname, clsname, block_attr = VLLM_ARCHS[arch]
    module = importlib.import_module(modname)
    base = getattr(module, clsname)

    def __init__(self, *, vllm_config, prefix: str = ""):
        spec = check_export(vllm_config.model_config)
        if spec.arch != arch:
            from hookmoe.errors import ArtifactError

            raise ArtifactError(f"export {spec.directory} is a {spec.arch} model but names {ARCH_PREFIX + clsname}")
        with per_layer_factory(module, spec):
            base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.hookmoe_spec = spec
        self.hookmoe_hooks = {}
        if spec.hook_manifest:
            m = spec.hook_manifest
            dtype = vllm_config.model_config.dtype
            for i in m["_layers"]:
                layer = self.model.layers[i]
                block = getattr(layer, block_attr, None)
                if block is None:  # another pipeline stage owns this layer
                    continue
                block.add_module(SUBMODULE, VllmHook(m["_hidden"], m["_inner"], dtype))
                block.register_forward_pre_hook(_pre_hook, with_kwargs=True)
                self.hookmoe_hooks[i] = f"model.layers.{i}.{block_attr}.{SUBMODULE}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(base.load_weights(self, weights) or ())
        if self.hookmoe_hooks:
            from hookmoe.hook.artifact import read_weights

            m = self.hookmoe_spec.hook_manifest
            state = read_weights(m["_dir"], m)
            params = dict(self.named_parameters())
            with torch.no_grad():
                for i, name in self.hookmoe_hooks.items():
                    for suffix in ("linear1.weight", "linear2.weight", "r"):
                        p = params[f"{name}.{suffix}"]
                        p.copy_(state[f"layers.{i}.{suffix}"].to(p.device, p.dtype))
                        loaded.add(f"{name}.{suffix}")
        return loaded

    cls = type(ARCH_PREFIX + clsname, (base,), {
        "__init__": __init__, "load_weights": load_weights, "__module__": __name__,
        "__doc__": f"vLLM's {clsname} with hookmoe's per-layer routing and Hooks (see hookmoe.serving.vllm_models).",
    })
    return cls


_BY_NAME = {ARCH_PREFIX + cls: arch for arch, (_, cls, _) in VLLM_ARCHS.items()}


def __getattr__(name: str):
    """``HookmoeMixtralForCausalLM`` etc., built on first use (only the vLLM modules needed are imported)."""
    arch = _BY_NAME.get(name)
    if arch is None:
        raise AttributeError(name)
    cls = _make_class(arch)
    globals()[name] = cls
    return cls


__all__ = ["VllmHook", "routing_function", "per_layer_factory", *_BY_NAME]
