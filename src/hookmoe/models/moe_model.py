""":class:`MoEModel`: a causal LM with its MoE layers located through the adapter table (blocks, routers, experts,
shared experts), its fingerprint and its summary."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hookmoe.kernels import cpu_gemm
from hookmoe.compat import experts_implementation
from hookmoe.errors import ModelError
from hookmoe.models.adapters import ADAPTERS, _refusal


@dataclass
class MoELayer:
    """One MoE block of the model."""

    index: int  # decoder-layer index (what users and plans call "layer")
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None


class MoEModel:
    """A causal LM with its MoE layers located through the adapter table."""

    def __init__(self, model: nn.Module, tokenizer: Any, source: str = "<in-memory>"):
        model_type = model.config.model_type
        if model_type not in ADAPTERS:
            raise ModelError(_refusal(model_type))
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        cpu_gemm.accelerate(model)  # CPU models: linears on the faster CPU kernel where it measures faster
        self.adapter = ADAPTERS[model_type]
        self.config = model.config
        self.decoder_layers = _decoder_layers(model)
        self.layers: list[MoELayer] = []
        for i, layer in enumerate(self.decoder_layers):
            block = getattr(layer, self.adapter.block_attr, None)
            router = getattr(block, self.adapter.router_attr, None) if block is not None else None
            if router is None or not hasattr(router, "top_k"):
                continue  # a dense layer (e.g. DeepSeek's first layers)
            experts = getattr(block, self.adapter.experts_attr)
            shared = getattr(block, self.adapter.shared_attr, None) if self.adapter.shared_attr else None
            self.layers.append(MoELayer(i, block, router, experts, shared))
        if not self.layers:
            raise ModelError(f"found no MoE layers in this {model_type} model")

    # ---- facts about the architecture -------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.adapter.model_type

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def moe_layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    @property
    def num_experts(self) -> int:
        return int(self.adapter.num_experts(self.config))

    @property
    def native_top_k(self) -> int:
        return int(self.adapter.native_top_k(self.config))

    @property
    def max_top_k(self) -> int:
        cap = self.adapter.max_top_k
        return int(cap(self.config)) if cap else self.num_experts

    @property
    def renormalize(self) -> bool:
        return bool(self.adapter.renormalize(self.config))

    @property
    def expert_intermediate_size(self) -> int:
        return int(self.adapter.expert_intermediate(self.config))

    @property
    def hook_hidden_size(self) -> int:
        """The paper's Hook width: the expert size (coarse-grained) or twice it (fine-grained)."""
        return self.expert_intermediate_size * (2 if self.adapter.fine_grained else 1)

    @property
    def experts_implementation(self) -> str:
        return experts_implementation(self.model)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or the embedding's execution device when the model is
        dispatched across devices / offloaded (``device_map``)."""
        if getattr(self.model, "hf_device_map", None):
            from hookmoe.models.placement import input_device

            return input_device(self.model)
        return next(self.model.parameters()).device

    def block_device(self, index: int) -> torch.device:
        """The device MoE layer ``index``'s block computes on (where its Hook lives)."""
        block = self.layer(index).block
        if getattr(self.model, "hf_device_map", None):
            from hookmoe.models.placement import execution_device

            return execution_device(self.model, block)
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise ModelError(
            f"layer {index} is not an MoE layer of this model (MoE layers: {_ranges(self.moe_layer_indices)})"
        )

    def fingerprint(self) -> str:
        """A short hash of the architecture-defining config, to match artifacts to models."""
        d = self.config.to_dict()
        keep = {k: v for k, v in sorted(d.items()) if not k.startswith("_") and k not in _VOLATILE_CONFIG}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def info(self) -> dict:
        from hookmoe.models.accounting import param_counts

        counts = param_counts(self)
        return {
            "source": self.source,
            "arch": self.arch,
            "layers": self.num_layers,
            "moe_layers": len(self.layers),
            "moe_layer_indices": self.moe_layer_indices,
            "experts": self.num_experts,
            "native_top_k": self.native_top_k,
            "max_top_k": self.max_top_k,
            "shared_experts": _shared_count(self),
            "renormalize_top_k": self.renormalize,
            "router_score": self.adapter.score,
            "granularity": "fine" if self.adapter.fine_grained else "coarse",
            "hidden_size": int(self.config.hidden_size),
            "expert_intermediate_size": self.expert_intermediate_size,
            "hook_hidden_size": self.hook_hidden_size,
            "experts_implementation": self.experts_implementation,
            "dtype": str(self.dtype).replace("torch.", ""),
            "params_total": counts["total"],
            "params_active": counts["active"],
            "params_active_paper_formula": counts["active_paper"],
            "expert_params_each": counts["per_expert"],
        }

    def routing(self, plan: Any = "native"):
        """Apply a routing plan; use as a context manager or call ``.remove()`` (see routing.py)."""
        from hookmoe.routing.patch import apply_plan

        return apply_plan(self, plan)

    def encode(self, texts: list[str] | str, *, add_special_tokens: bool = True) -> dict:
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer")
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        return {k: v.to(self.device) for k, v in enc.items()}


_VOLATILE_CONFIG = {
    "torch_dtype", "dtype", "transformers_version", "name_or_path", "architectures", "use_cache",
    "output_router_logits", "num_experts_per_tok", "quantization_config", "auto_map", "tie_word_embeddings",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
}


def _shared_count(mm: MoEModel) -> int:
    c = mm.config
    for key in ("n_shared_experts", "num_shared_experts"):
        if getattr(c, key, None):
            return int(getattr(c, key))
    if getattr(c, "shared_expert_intermediate_size", 0):
        return max(1, int(c.shared_expert_intermediate_size) // max(1, mm.expert_intermediate_size))
    return 0


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    for obj in (base, getattr(base, "language_model", None)):
        if obj is not None and isinstance(getattr(obj, "layers", None), nn.ModuleList):
            return obj.layers
    raise ModelError("cannot find the decoder layers of this model")
