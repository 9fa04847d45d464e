"""Mixture-of-Experts model class for dense models carved by CMoE (see ``hookmoe.convert``).

A converted checkpoint is an ordinary transformers directory whose ``config.json`` has
``model_type = "hookmoe_cmoe"``. Importing this module registers the type with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(dir)`` restores it.

Layout (the contract the rest of hookmoe relies on)::

    HookmoeCMoEForCausalLM
      .model   = the dense base architecture's decoder stack (llama / qwen2 / gemma3_text), built from
                 ``config.text_config``, in which every ``layers[i].mlp`` is a ``CMoESparseBlock``:
          .gate            CMoERouter   forward(flat [N,h]) -> (logits [N,E], weights [N,k], index [N,k])
          .experts         CMoEExperts  gate_up_proj [E, 2I, h] (gate rows first), down_proj [E, h, I]
          .shared_experts  CMoESharedMLP (the S always-on experts fused into one gated MLP) or None
      .lm_head

The configuration nests the untouched dense config as ``text_config`` (so attention, RoPE, sliding
windows and the KV cache behave exactly as in the dense model) and adds the MoE fields at top level:
``num_experts`` (routed E), ``num_shared_experts`` (S), ``num_experts_per_tok`` (K),
``moe_intermediate_size`` (I, neurons per expert) and ``hidden_act``. ``hidden_size``,
``num_hidden_layers``, ``vocab_size`` and ``tie_word_embeddings`` are mirrored from ``text_config``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from hookmoe.kernels.cpu_gemm import linear

__all__ = [
    "CMOE_MODEL_TYPE",
    "SUPPORTED_BASE_TYPES",
    "HookmoeCMoEConfig",
    "HookmoeCMoEForCausalLM",
    "CMoESparseBlock",
    "CMoERouter",
    "CMoEExperts",
    "CMoESharedMLP",
    "dense_activation_name",
]

CMOE_MODEL_TYPE = "hookmoe_cmoe"
# CMoEExperts.masked_forward is used when E >= MASKED_MIN_EXPERTS and k >= E / MASKED_MIN_SHARE_INV
# under one of transformers' built-in experts implementations
MASKED_MIN_EXPERTS = 16
MASKED_MIN_SHARE_INV = 4
MASKED_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def dense_activation_name(text_config) -> str:
    """The FFN activation of a dense config (llama/qwen2: ``hidden_act``; gemma3: ``hidden_activation``)."""
    act = getattr(text_config, "hidden_activation", None) or getattr(text_config, "hidden_act", None)
    if act is None:
        raise ValueError(f"cannot find the FFN activation in the {text_config.model_type} config")
    return act


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@strict
class HookmoeCMoEConfig(PreTrainedConfig):
    r"""Configuration of a dense model converted to a Mixture-of-Experts by CMoE.

    text_config (`dict` or `PreTrainedConfig`): the dense base model's configuration (llama, qwen2,
        gemma3_text); it drives everything except the FFNs.
    num_experts (`int`): number of routed experts E.
    num_shared_experts (`int`): number of always-on shared experts S (fused into one dense MLP).
    num_experts_per_tok (`int`): routed experts per token K.
    moe_intermediate_size (`int`): neurons per expert; defaults to ``intermediate_size // (E + S)``.
    hidden_act (`str`): expert activation; defaults to the dense FFN's.
    """

    model_type = CMOE_MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 16
    num_shared_experts: int = 2
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    hidden_act: str | None = None
    # mirrored from text_config in __post_init__ (kept as fields so that they serialise and load)
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        tc = self.text_config
        self.hidden_size = tc.hidden_size
        self.num_hidden_layers = tc.num_hidden_layers
        self.vocab_size = tc.vocab_size
        self.tie_word_embeddings = bool(getattr(tc, "tie_word_embeddings", False))
        if self.hidden_act is None:
            self.hidden_act = dense_activation_name(tc)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = tc.intermediate_size // max(1, self.num_experts + self.num_shared_experts)

    def validate_architecture(self):
        """Part of `@strict` validation."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )

    @property
    def base_model_type(self) -> str:
        return self.text_config.model_type


# --------------------------------------------------------------------------------------------------
# MoE modules
# --------------------------------------------------------------------------------------------------
class CMoERouter(nn.Module):
    """CMoE router: one representative neuron per routed expert.

    ``s_e(x) = |(x . weight_up[e]) * act(x . weight_gate[e])|`` is the activation magnitude of the
    expert's representative neuron. ``logits = (s + x . weight_linear[e] + bias) * exp(log_logit_scale)``
    (float32; ``weight_linear``, ``bias`` and ``log_logit_scale`` are zero at conversion and only
    move in router calibration); the
    top ``self.top_k`` logits select the experts (read on every call: hookmoe changes it at run
    time). The routing weight of a selected expert is ``expert_scale[e]``: exactly 1.0 at
    conversion, never renormalised. While the router's parameters are being trained, the weight is
    multiplied by ``exp(log p_e - stop_grad(log p_e))`` with ``p = softmax(logits)``: the value is
    unchanged (exactly 1), but the gradient of the weight reaches the router (a straight-through
    estimator of the non-differentiable top-k).
    """

    def __init__(self, config: HookmoeCMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.weight_gate = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.weight_up = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.weight_linear = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        self.bias = nn.Parameter(torch.zeros(self.num_experts))
        self.log_logit_scale = nn.Parameter(torch.zeros(()))
        self.expert_scale = nn.Parameter(torch.ones(self.num_experts))
        self.act_fn = ACT2FN[config.hidden_act]

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Raw CMoE scores ``s`` [N, E] (float32)."""
        x = hidden_states.reshape(-1, self.hidden_dim)
        s = F.linear(x, self.weight_up) * self.act_fn(F.linear(x, self.weight_gate))
        return s.float().abs()

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        s = self.scores(x) + F.linear(x, self.weight_linear).float()
        logits = (s + self.bias.float()) * self.log_logit_scale.float().exp()
        top_logits, index = torch.topk(logits, self.top_k, dim=-1)
        weights = self.expert_scale.float()[index]
        if torch.is_grad_enabled() and any(
            p.requires_grad for p in (self.weight_gate, self.weight_up, self.weight_linear, self.bias)
        ):
            log_p = top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            weights = weights * torch.exp(log_p - log_p.detach())
        return logits, weights, index


@use_experts_implementation
class _CMoEExpertsBase(nn.Module):
    """The routed experts, stored like transformers' MixtralExperts (3-D tensors, [gate; up] rows);
    ``forward`` dispatches on ``config._experts_implementation`` (``eager`` = :meth:`loop_forward`)."""

    def __init__(self, config: HookmoeCMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.loop_forward(hidden_states, top_k_index, top_k_weights)

    def loop_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """One product per expert that received tokens, on its tokens only; a sentinel index ==
        num_experts (a dropped slot) is skipped."""
        out = torch.zeros_like(hidden_states)
        flat_index = top_k_index.reshape(-1)
        flat_weights = top_k_weights.reshape(-1)
        token_of_slot = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(
            top_k_index.shape[-1]
        )
        with torch.no_grad():
            counts = torch.bincount(flat_index, minlength=self.num_experts + 1)
            hit = torch.nonzero(counts[: self.num_experts]).flatten().tolist()
        for e in hit:
            slots = torch.nonzero(flat_index == e).flatten()
            tokens = token_of_slot[slots]
            gate, up = linear(hidden_states[tokens], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(self.act_fn(gate) * up, self.down_proj[e])
            y = y * flat_weights[slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def masked_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Every routed neuron in two GEMMs, unselected experts multiplied by an exact 0: the outputs
        (and gradients) of the selected experts only, without a per-expert loop. A sentinel index ==
        num_experts (a dropped slot) contributes nothing."""
        n = hidden_states.shape[0]
        e_num, inter = self.num_experts, self.intermediate_dim
        mask = torch.zeros(n, e_num + 1, dtype=top_k_weights.dtype, device=hidden_states.device)
        mask = mask.scatter(1, top_k_index, top_k_weights)[:, :e_num]
        gate_up = linear(hidden_states, self.gate_up_proj.reshape(e_num * 2 * inter, self.hidden_dim))
        gate, up = gate_up.view(n, e_num, 2 * inter).split(inter, dim=-1)
        h = self.act_fn(gate) * up * mask.to(gate_up.dtype)[:, :, None]
        down = self.down_proj.permute(1, 0, 2).reshape(self.hidden_dim, e_num * inter)
        return linear(h.reshape(n, e_num * inter), down).to(hidden_states.dtype)


class CMoEExperts(_CMoEExpertsBase):
    """The routed experts. Fine-grained shapes (``E >= MASKED_MIN_EXPERTS`` experts of which at least
    ``1 / MASKED_MIN_SHARE_INV`` are active) run :meth:`masked_forward` under transformers' built-in
    implementations: a loop or grouped GEMM over ~100+ tiny experts costs far more than the multiply-adds of
    the unselected ones (``benchmarks/results/cmoe_finetune/``).
    Other implementations (``hookmoe``'s runtime) are used as selected."""

    def uses_masked_path(self, top_k: int) -> bool:
        impl = getattr(getattr(self, "config", None), "_experts_implementation", None) or "eager"
        return (impl in MASKED_IMPLEMENTATIONS and self.num_experts >= MASKED_MIN_EXPERTS
                and top_k * MASKED_MIN_SHARE_INV >= self.num_experts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.uses_masked_path(top_k_index.shape[-1]):
            return self.masked_forward(hidden_states, top_k_index, top_k_weights)
        return super().forward(hidden_states, top_k_index, top_k_weights)


class CMoESharedMLP(nn.Module):
    """The shared experts: a dense gated MLP over the S x I always-active neurons."""

    def __init__(self, config: HookmoeCMoEConfig):
        super().__init__()
        inter = config.num_shared_experts * config.moe_intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CMoESparseBlock(nn.Module):
    """Replaces one dense FFN: shared experts (always on) + top-k routed experts."""

    def __init__(self, config: HookmoeCMoEConfig, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = CMoERouter(config)
        self.experts = CMoEExperts(config)
        self.shared_experts = CMoESharedMLP(config) if config.num_shared_experts > 0 else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.gate(flat)
        out = self.experts(flat, index, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)


def _init_cmoe_module(module: nn.Module, std: float) -> bool:
    """Random init of the CMoE parameters (used for models built from a config, not for conversions)."""
    from transformers import initialization as init

    if isinstance(module, CMoEExperts):
        init.normal_(module.gate_up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)
        return True
    if isinstance(module, CMoERouter):
        init.normal_(module.weight_gate, mean=0.0, std=std)
        init.normal_(module.weight_up, mean=0.0, std=std)
        init.zeros_(module.weight_linear)
        init.zeros_(module.bias)
        init.zeros_(module.log_logit_scale)
        init.ones_(module.expert_scale)
        return True
    return False


# --------------------------------------------------------------------------------------------------
# decoder stacks: the dense base classes with their FFNs swapped for CMoE blocks
# --------------------------------------------------------------------------------------------------
class _CMoEStackMixin:
    """Builds the dense decoder stack, then swaps each layer's ``mlp`` before weights are initialised.

    Defined in this module (which uses ``@use_experts_implementation``) so that transformers lets the
    stack select ``grouped_mm`` / ``batched_mm`` / ``eager`` experts implementations.
    """

    def __init__(self, config, moe_config: HookmoeCMoEConfig):
        # plain attribute, set before nn.Module.__init__ so that post_init (called by the base
        # __init__) can see it
        object.__setattr__(self, "_cmoe_moe_config", moe_config)
        super().__init__(config)

    def post_init(self):
        moe_config = self.__dict__.get("_cmoe_moe_config")
        if moe_config is not None:
            for i, layer in enumerate(self.layers):
                layer.mlp = CMoESparseBlock(moe_config, layer_idx=i)
        super().post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        if not _init_cmoe_module(module, std):
            super()._init_weights(module)


class CMoELlamaModel(_CMoEStackMixin, LlamaModel):
    pass


class CMoEQwen2Model(_CMoEStackMixin, Qwen2Model):
    pass


class CMoEGemma3TextModel(_CMoEStackMixin, Gemma3TextModel):
    pass


_STACKS: dict[str, type] = {
    "llama": CMoELlamaModel,
    "qwen2": CMoEQwen2Model,
    "gemma3_text": CMoEGemma3TextModel,
}
SUPPORTED_BASE_TYPES = tuple(_STACKS)


# --------------------------------------------------------------------------------------------------
# causal LM
# --------------------------------------------------------------------------------------------------
class HookmoeCMoEPreTrainedModel(PreTrainedModel):
    config: HookmoeCMoEConfig
    config_class = HookmoeCMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02) or 0.02
        if not _init_cmoe_module(module, std):
            super()._init_weights(module)


class HookmoeCMoEForCausalLM(HookmoeCMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HookmoeCMoEConfig):
        super().__init__(config)
        base_type = config.text_config.model_type
        if base_type not in _STACKS:
            raise ValueError(
                f"CMoE supports dense base models of type {', '.join(SUPPORTED_BASE_TYPES)}; got {base_type!r}"
            )
        self.model = _STACKS[base_type](config.text_config, config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        if return_dict is False:
            return out.to_tuple()
        return out

    # convenience for hookmoe --------------------------------------------------------------------
    def moe_blocks(self) -> list[CMoESparseBlock]:
        return [layer.mlp for layer in self.model.layers]

    def set_top_k(self, k: int) -> None:
        """Set the routed experts per token in every layer (1 <= k <= num_experts)."""
        if not 1 <= k <= self.config.num_experts:
            raise ValueError(f"top_k must be in [1, {self.config.num_experts}], got {k}")
        for block in self.moe_blocks():
            block.gate.top_k = k


AutoConfig.register(CMOE_MODEL_TYPE, HookmoeCMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(HookmoeCMoEConfig, HookmoeCMoEForCausalLM, exist_ok=True)
