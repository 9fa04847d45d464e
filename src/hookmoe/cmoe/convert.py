"""CMoE: carve a dense causal LM into a Mixture-of-Experts, training-free, then (optionally) calibrate
its routers against the dense model.

Method (DESIGN §1 "CMoE"), per FFN ``y = W_down (act(W_gate x) * (W_up x))`` with F neurons:

1. profile: run the dense model on calibration blocks, hook each FFN's input and compute
   ``h = act(x W_gate) * (x W_up)`` per token; each token marks its ``activation_topk`` (K_a) neurons
   of largest ``|h|``; a neuron's activation rate is the fraction of tokens that mark it;
2. shared experts: the ``S * I`` most frequently marked neurons (``I = F / (E + S)``), always on;
3. routed experts: the other ``E * I`` neurons are split into E clusters of exactly I neurons by
   balanced k-means on their binary marker vectors (centroids = cluster means, assignment =
   ``scipy.optimize.linear_sum_assignment`` with each centroid replicated I times);
4. each expert's weights are slices of ``W_gate`` / ``W_up`` / ``W_down``; each routed expert's router
   row is its representative neuron (the member closest to the cluster centre):
   ``s_e = |(x . W_up[r_e]) * act(x . W_gate[r_e])|``, top-k by ``s``, weight 1 (no renormalisation).

With every routed expert active and weight 1, the converted FFN equals the dense FFN (the experts
partition the neurons); ``tests/test_convert.py`` checks this on every supported architecture.
"""

from __future__ import annotations

from hookmoe.errors import ConversionError

from hookmoe import progress as progress_bars

import copy
import json
import os
import platform
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from transformers.activations import ACT2FN

from hookmoe.models.cmoe import SUPPORTED_BASE_TYPES, HookmoeCMoEConfig, HookmoeCMoEForCausalLM, dense_activation_name
from hookmoe.kernels.cpu_gemm import accelerate, linear
from hookmoe.models import placement
from hookmoe.models.loading import DEVICE_HELP, DTYPE_HELP, LoadOptions
from hookmoe.options import argument, option


RANK_TARGETS = ("gain", "norm")  # what router calibration ranks the experts by (hookmoe.cmoe.calibrate)


FINETUNE_PARTS = ("moe", "experts", "routers")  # what the KD fine-tune trains (hookmoe.cmoe.distill)


@dataclass(kw_only=True)
class ConvertOptions(LoadOptions):
    """``hookmoe convert``: a dense model into a CMoE, with optional router calibration and KD fine-tune (run by
    :func:`hookmoe.cmoe.pipeline.run_convert`). :func:`convert_dense`, :func:`~hookmoe.cmoe.calibrate_routers` and
    :func:`~hookmoe.cmoe.distill_moe` take their defaults for the same settings from here. The dense model may be
    placed across devices, CPU and disk (``device_map`` / ``max_memory`` / ``offload_folder``)."""

    error: ClassVar[type] = ConversionError

    dense_model: str = argument("dense llama / qwen2 / gemma3 model: hub id, dir, .gguf, smollm2 or gemma3-270m")
    experts: int = option(16, "routed experts per FFN", min=1)
    shared: int = option(2, "shared (always-on) experts per FFN", min=0)
    top_k: int = option(2, "native k of the converted MoE", min=1)
    out: Path = option(help="output directory (a normal transformers model dir)")
    calib: str = option("builtin", "calibration text source")
    calib_blocks: int = option(8, "blocks for activation profiling", min=1)
    seq_len: int = option(512, "tokens per block", min=2)
    calibrate_steps: int = option(0, "router calibration steps against the dense model (0 = off)", min=0)
    calibrate_target: str = option("auto", "experts the router learns to pick: gain (best fit to the dense FFN), "
                                   "norm (largest outputs; better for many small experts) or auto (norm from 16 "
                                   "routed experts on)")
    calibrate_mse_weight: Optional[float] = option(None, "weight of the routed-output MSE term in router calibration "
                                                   "(0 = ranking loss only; default: 1 below 16 routed experts, 0 "
                                                   "from 16 on)", min=0)
    finetune_steps: int = option(0, "KD fine-tune steps of the MoE blocks against the dense model (0 = off; experts "
                                 "then no longer sum to the dense FFN)", min=0)
    finetune_lr: float = option(3e-4, "KD fine-tune learning rate (AdamW, warm-up then cosine)", min=0,
                                min_open=True)
    finetune_train: str = option("experts", "what the fine-tune trains: experts (routers frozen; measured best), "
                                 "moe (routers + experts) or routers", choices=FINETUNE_PARTS)
    finetune_hidden_weight: float = option(0.0, "add layer-wise hidden-state distillation with this weight (0 = KL "
                                           "on logits only)", min=0)
    finetune_blocks: int = option(64, "blocks of fine-tune text", min=1)
    activation_topk: Optional[int] = option(None, "K_a: neurons marked per token when profiling (default: FFN size "
                                            "/ 16)", min=1)
    seed: int = option(0, "random seed (calibration text, clustering, training)")
    progress: bool = option(True, "progress bars")
    device: str = option("cpu", DEVICE_HELP + "; the dense model's device (the MoE is built there, or on the CPU "
                         "when --device-map spreads the dense model)")
    dtype: str = option("float32", "dtype the dense model is loaded and converted in: " + DTYPE_HELP)

    def check(self) -> None:
        if self.calibrate_target not in ("auto",) + RANK_TARGETS:  # refused before minutes of loading and converting
            raise ConversionError(f"--calibrate-target must be auto, {' or '.join(RANK_TARGETS)}; got "
                                  f"'{self.calibrate_target}'")
        if self.top_k > self.experts:
            raise ConversionError(f"--top-k ({self.top_k}) cannot exceed --experts ({self.experts})")


# config keys of a loaded dense model that must not travel into the converted model's text_config
_DROP_CONFIG_KEYS = (
    "quantization_config",
    "_name_or_path",
    "name_or_path",
    "architectures",
    "auto_map",
    "transformers_version",
    "_commit_hash",
)


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConversionError(f"{type(model).__name__} has no .model.layers decoder stack")
    return list(layers)


def _dense_mlp(layer):
    mlp = getattr(layer, "mlp", None)
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), torch.nn.Linear):
            raise ConversionError(f"layer FFN {type(mlp).__name__} has no {name} linear (not a dense gated FFN)")
    return mlp


def valid_expert_counts(ffn_size: int, max_total: int = 64) -> list[int]:
    """Values of E + S that divide the FFN size (neurons per expert must be an integer)."""
    return [d for d in range(2, min(ffn_size, max_total) + 1) if ffn_size % d == 0]


def default_activation_topk(ffn_size: int) -> int:
    """K_a default: 1/16 of the FFN neurons marked per token. The CMoE paper's small K_a (10 of
    11008 on LLaMA-2-7B) leaves small models' marker vectors nearly empty; on SmolLM2-135M (1536
    neurons, E6 S2 K4) the oracle-router bound moved from ~31 to ~23.5 perplexity going from K_a = 10
    to 100 (dense 15.2; benchmarks/results/cmoe_probe.log)."""
    return max(1, ffn_size // 16)


def _check_shapes(config, num_experts: int, num_shared: int, top_k: int, activation_topk: int) -> int:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_BASE_TYPES:
        raise ConversionError(
            f"CMoE conversion supports dense models of type {', '.join(SUPPORTED_BASE_TYPES)}; got {model_type!r}"
        )
    if getattr(config, "mlp_bias", False):
        raise ConversionError("CMoE conversion does not support FFNs with biases (mlp_bias=True)")
    ffn = int(config.intermediate_size)
    if num_experts < 1:
        raise ConversionError(f"num_experts must be >= 1, got {num_experts}")
    if num_shared < 0:
        raise ConversionError(f"num_shared must be >= 0, got {num_shared}")
    if not 1 <= top_k <= num_experts:
        raise ConversionError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
    if not 1 <= activation_topk <= ffn:
        raise ConversionError(f"activation_topk must be between 1 and the FFN size {ffn}, got {activation_topk}")
    total = num_experts + num_shared
    if ffn % total != 0:
        raise ConversionError(
            f"FFN size {ffn} is not divisible by num_experts + num_shared = {num_experts} + {num_shared} = {total}; "
            f"E + S must divide {ffn}: one of {valid_expert_counts(ffn)}"
        )
    return ffn // total


@contextmanager
def _onloaded(module: torch.nn.Module):
    """While inside, every weight of ``module`` and its submodules is in memory: accelerate keeps the weights of a
    dispatched model's CPU/disk-offloaded modules on the meta device outside their own forward, and
    ``accelerate.utils.align_module_device`` loads those of one module (it does not recurse). A no-op for a model
    that is not dispatched."""
    hooked = [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]
    if not hooked:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in hooked:
            stack.enter_context(align_module_device(m))
        yield


def _build_device(model) -> torch.device:
    """Where the MoE is built: beside the dense model, or, when the dense model is spread over several devices or
    offloaded, on the CPU."""
    if placement.is_dispatched(model):
        places = set(model.hf_device_map.values())
        if len(places) == 1 and next(iter(places)) not in ("cpu", "disk", "meta"):
            place = next(iter(places))
            return torch.device("cuda", place) if isinstance(place, int) else torch.device(place)
        return torch.device("cpu")
    return next(model.parameters()).device


@contextmanager
def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    with no_init_weights():
        yield


def _text_config_dict(config) -> dict:
    d = config.to_dict()
    for key in _DROP_CONFIG_KEYS:
        d.pop(key, None)
    return d


# --------------------------------------------------------------------------------------------------
# 1. profiling
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def _profile_markers(model, calib_blocks: torch.LongTensor, activation_topk: int, batch_size: int, progress: bool):
    """Per layer: the top-K_a neuron indices of every calibration token, [N, K_a] int64 (CPU)."""
    layers = _decoder_layers(model)
    mlps = [_dense_mlp(layer) for layer in layers]
    act_fn = ACT2FN[dense_activation_name(model.config)]
    markers: list[list[torch.Tensor]] = [[] for _ in layers]

    def make_hook(i, mlp):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            with _onloaded(mlp):  # an offloaded FFN's weights are on the meta device until its own forward
                h = act_fn(linear(x, mlp.gate_proj.weight.float())) * linear(x, mlp.up_proj.weight.float())
            markers[i].append(h.abs().topk(activation_topk, dim=-1).indices.cpu())

        return hook

    handles = [mlp.register_forward_pre_hook(make_hook(i, mlp)) for i, mlp in enumerate(mlps)]
    device = placement.input_device(model)
    try:
        starts = range(0, calib_blocks.shape[0], batch_size)
        for s in progress_bars.iterate(starts, len(starts), "CMoE profile", progress):
            model(input_ids=calib_blocks[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(m) for m in markers]


# --------------------------------------------------------------------------------------------------
# 2./3. neuron assignment
# --------------------------------------------------------------------------------------------------
def balanced_kmeans(
    vectors: torch.Tensor, n_clusters: int, size: int, iters: int, gen: torch.Generator, tol: float = 0.005
):
    """Split ``vectors`` [R, D] into ``n_clusters`` clusters of exactly ``size`` members.

    k-means++ seeding, then alternate: balanced assignment (Hungarian on the squared distances with
    every centroid replicated ``size`` times) and centroid = member mean, until at most ``tol`` of
    the members change cluster or ``iters`` rounds. Returns (labels [R],
    centroids [C, D], sq-distances [R, C], iterations run).
    """
    r = vectors.shape[0]
    sq = (vectors * vectors).sum(1)

    def distances(c):
        return (sq[:, None] - 2.0 * vectors @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0.0)

    # k-means++ seeding
    first = int(torch.randint(r, (1,), generator=gen))
    chosen = [first]
    d2 = distances(vectors[first : first + 1]).squeeze(1)
    for _ in range(1, n_clusters):
        total = float(d2.sum())
        if total <= 0.0:
            probs = torch.ones(r, dtype=torch.float64)
            probs[chosen] = 0.0
        else:
            probs = d2.double()
        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, distances(vectors[nxt : nxt + 1]).squeeze(1))
    centroids = vectors[chosen].clone()

    labels = None
    it = 0
    for it in range(1, iters + 1):
        dist = distances(centroids)
        cost = np.repeat(dist.double().numpy(), size, axis=1)
        rows, cols = linear_sum_assignment(cost)
        new_labels = torch.empty(r, dtype=torch.long)
        new_labels[torch.from_numpy(rows)] = torch.from_numpy(cols // size).long()
        changed = r if labels is None else int((new_labels != labels).sum())
        labels = new_labels
        onehot = F.one_hot(labels, n_clusters).to(vectors.dtype)  # [R, C]
        centroids = (onehot.T @ vectors) / size
        if changed <= tol * r:
            break
    return labels, centroids, distances(centroids), it


def _assign_layer(top_idx: torch.Tensor, ffn: int, num_experts: int, num_shared: int, size: int, iters: int, gen):
    """Neuron partition of one FFN from its activation markers [N, K_a]."""
    n_tok = top_idx.shape[0]
    marks = torch.zeros(n_tok, ffn)
    marks.scatter_(1, top_idx, 1.0)
    rate = marks.mean(0)  # activation rate per neuron
    order = torch.argsort(rate, descending=True, stable=True)
    shared = torch.sort(order[: num_shared * size]).values
    pool = torch.sort(order[num_shared * size :]).values  # routed neurons
    vectors = marks[:, pool].T.contiguous()  # [R, N] marker vector per neuron
    labels, centroids, dist, n_iter = balanced_kmeans(vectors, num_experts, size, iters, gen)

    experts, reps = [], []
    for e in range(num_experts):
        members_local = torch.nonzero(labels == e).flatten()
        members = pool[members_local]
        # representative: member closest to the centre; ties -> the most active neuron
        score = dist[members_local, e].double() - 1e-9 * rate[members].double()
        reps.append(int(members[int(torch.argmin(score))]))
        experts.append(torch.sort(members).values)
    within = float(dist[torch.arange(len(pool)), labels].mean()) / max(n_tok, 1)
    stats = {
        "kmeans_iters": n_iter,
        "shared_rate_mean": float(rate[shared].mean()) if len(shared) else 0.0,
        "routed_rate_mean": float(rate[pool].mean()),
        "never_marked_frac": float((rate == 0).float().mean()),
        "marker_mass_shared": float(rate[shared].sum() / rate.sum().clamp_min(1e-12)) if len(shared) else 0.0,
        "within_cluster_sqdist_per_token": within,
    }
    return shared, experts, reps, stats


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def convert_dense(
    model,
    tokenizer=None,
    calib_blocks: torch.LongTensor | None = None,
    *,
    num_experts: int = ConvertOptions.experts,
    num_shared: int = ConvertOptions.shared,
    top_k: int = ConvertOptions.top_k,
    activation_topk: int | None = ConvertOptions.activation_topk,
    kmeans_iters: int = 10,
    batch_size: int = 4,
    seed: int = ConvertOptions.seed,
    progress: bool = True,
) -> HookmoeCMoEForCausalLM:
    """Convert a dense llama / qwen2 / gemma3_text causal LM into a CMoE ``HookmoeCMoEForCausalLM``.

    ``calib_blocks`` is a [n_blocks, seq_len] LongTensor of token ids (e.g. 8 x 512). The returned
    model shares nothing with ``model``; it carries ``.cmoe_info`` (a dict: shapes, timings, neuron
    assignment stats) which ``save_converted`` writes to ``cmoe.json``. ``tokenizer`` is only used
    to record its name. ``model`` may be dispatched with accelerate (across devices, CPU and disk): its offloaded
    weights are read one module at a time, and the MoE is built on the CPU (or on the one GPU it occupies).
    """
    t_start = time.perf_counter()
    config = model.config
    if activation_topk is None:
        activation_topk = default_activation_topk(int(getattr(config, "intermediate_size", 16) or 16))
    size = _check_shapes(config, num_experts, num_shared, top_k, activation_topk)
    if calib_blocks is None or calib_blocks.ndim != 2 or calib_blocks.numel() == 0:
        raise ConversionError("calib_blocks must be a non-empty [n_blocks, seq_len] LongTensor of token ids")
    ffn = int(config.intermediate_size)
    was_training = model.training
    model.eval()

    # 1. profile -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    markers = _profile_markers(model, calib_blocks.long(), activation_topk, batch_size, progress)
    t_profile = time.perf_counter() - t0

    # 2./3. assign neurons ---------------------------------------------------------------------
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    assignments = []
    for top_idx in progress_bars.iterate(markers, len(markers), "CMoE cluster", progress):
        assignments.append(_assign_layer(top_idx, ffn, num_experts, num_shared, size, kmeans_iters, gen))
    t_cluster = time.perf_counter() - t0

    # 4. build the MoE model ------------------------------------------------------------------
    t0 = time.perf_counter()
    moe = _build_moe(model, assignments, num_experts=num_experts, num_shared=num_shared, top_k=top_k, size=size)
    t_build = time.perf_counter() - t0
    if was_training:
        model.train()
    moe.cmoe_info = _conversion_record(
        config, tokenizer, assignments, calib_blocks, num_experts=num_experts, num_shared=num_shared, top_k=top_k,
        size=size, activation_topk=activation_topk, kmeans_iters=kmeans_iters, seed=seed,
        timings={"profile": t_profile, "cluster": t_cluster, "build": t_build,
                 "total": time.perf_counter() - t_start})
    accelerate(moe)  # on the CPU: its linears on the faster kernel, as for every model hookmoe loads
    return moe


def _build_moe(model, assignments: list, *, num_experts: int, num_shared: int, top_k: int,
               size: int) -> HookmoeCMoEForCausalLM:
    """The CMoE model: the dense model's config and non-FFN weights, each FFN's neurons carved into experts."""
    config = model.config
    moe_config = HookmoeCMoEConfig(text_config=_text_config_dict(config), num_experts=num_experts,
                                   num_shared_experts=num_shared, num_experts_per_tok=top_k,
                                   moe_intermediate_size=size, hidden_act=dense_activation_name(config))
    with _no_init():  # every parameter is overwritten below; buffers are copied from the dense model
        moe = HookmoeCMoEForCausalLM(moe_config)
    moe.to(device=_build_device(model), dtype=placement.model_dtype(model))
    _transfer_weights(model, moe, assignments, num_shared)
    if moe_config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = copy.deepcopy(model.generation_config)
    return moe.eval()


def _conversion_record(config, tokenizer, assignments: list, calib_blocks: torch.Tensor, *, num_experts: int,
                       num_shared: int, top_k: int, size: int, activation_topk: int, kmeans_iters: int, seed: int,
                       timings: dict[str, float]) -> dict[str, Any]:
    """``cmoe_info`` (written to ``cmoe.json``): shapes, calibration data, timings, neuron-assignment stats."""
    ffn = int(config.intermediate_size)
    layer_stats = [a[3] for a in assignments]
    active = (num_shared + top_k) * size

    def mean(key: str) -> float:
        return float(np.mean([st[key] for st in layer_stats]))

    return {
        "method": "CMoE (activation-profiled shared experts + balanced k-means routed experts)",
        "base_model": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
        "base_model_type": config.model_type,
        "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        "ffn_size": ffn, "num_experts": num_experts, "num_shared_experts": num_shared, "num_experts_per_tok": top_k,
        "moe_intermediate_size": size, "active_ffn_neurons": active, "active_ffn_fraction": active / ffn,
        "activation_topk": activation_topk, "kmeans_iters_max": kmeans_iters, "seed": seed,
        "calib_blocks": int(calib_blocks.shape[0]), "calib_seq_len": int(calib_blocks.shape[1]),
        "calib_tokens": int(calib_blocks.numel()),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "assignment_stats": {
            "mean_kmeans_iters": mean("kmeans_iters"), "shared_rate_mean": mean("shared_rate_mean"),
            "routed_rate_mean": mean("routed_rate_mean"), "marker_mass_shared": mean("marker_mass_shared"),
            "never_marked_frac": mean("never_marked_frac"), "per_layer": layer_stats,
        },
        "router_calibration": None,
    }


def _expert_weights(mlp, assignment, num_experts: int, num_shared: int) -> dict[str, torch.Tensor]:
    """One FFN's tensors in the MoE block (names relative to ``model.layers.i.mlp.``): routed experts, router rows
    from the representative neurons, shared experts. The FFN's weights must be in memory (:func:`_onloaded`)."""
    wg, wu, wd = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
    shared, experts, reps, _ = assignment
    idx = torch.stack(experts).to(wg.device)  # [E, I]
    rep = torch.tensor(reps, device=wg.device)
    out = {
        "experts.gate_up_proj": torch.cat([wg[idx], wu[idx]], dim=1),
        "experts.down_proj": wd[:, idx].permute(1, 0, 2).contiguous(),
        "gate.weight_gate": wg[rep],
        "gate.weight_up": wu[rep],
        "gate.weight_linear": torch.zeros_like(wg[rep]),
        "gate.bias": torch.zeros(num_experts, dtype=wg.dtype, device=wg.device),
        "gate.log_logit_scale": torch.zeros((), dtype=wg.dtype, device=wg.device),
        "gate.expert_scale": torch.ones(num_experts, dtype=wg.dtype, device=wg.device),
    }
    if num_shared > 0:
        sh = shared.to(wg.device)
        out["shared_experts.gate_proj.weight"] = wg[sh]
        out["shared_experts.up_proj.weight"] = wu[sh]
        out["shared_experts.down_proj.weight"] = wd[:, sh]
    return out


@torch.no_grad()
def _transfer_weights(model, moe, assignments, num_shared: int) -> None:
    """Copy the dense weights into ``moe``: each FFN as its experts, router and shared experts, every other
    parameter and buffer (attention, norms, embeddings, RoPE tables) as it is. A dispatched model's offloaded weights
    are in memory one module at a time."""
    target = dict(moe.named_parameters(remove_duplicate=False))
    target.update(dict(moe.named_buffers(remove_duplicate=False)))
    expected = set(moe.state_dict())
    done: set[str] = set()
    num_experts = moe.config.num_experts
    mlp_names = set()
    for i, layer in enumerate(_decoder_layers(model)):
        mlp = _dense_mlp(layer)
        prefix = f"model.layers.{i}.mlp."
        mlp_names.add(prefix[:-1])
        with _onloaded(mlp):
            for name, value in _expert_weights(mlp, assignments[i], num_experts, num_shared).items():
                target[prefix + name].copy_(value)
                done.add(prefix + name)
    unexpected = []
    persistent = set(model.state_dict())
    for mod_name, module in model.named_modules():
        if any(mod_name == m or mod_name.startswith(m + ".") for m in mlp_names):
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        if not own:
            continue
        with _onloaded(module):
            tensors = dict(module.named_parameters(recurse=False))
            tensors.update(dict(module.named_buffers(recurse=False)))
            for n, value in tensors.items():
                key = f"{mod_name}.{n}" if mod_name else n
                if key in target and target[key].shape == value.shape:
                    target[key].copy_(value)
                    done.add(key)
                elif key in persistent:
                    unexpected.append(key)
    missing = [k for k in sorted(expected - done) if not (k == "lm_head.weight" and moe.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"CMoE weight transfer mismatch: missing={missing[:8]} unexpected={unexpected[:8]}")


def save_converted(model: HookmoeCMoEForCausalLM, tokenizer, out_dir: str | os.PathLike) -> str:
    """Write a normal transformers directory (safetensors + config.json + tokenizer) plus ``cmoe.json``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    info = dict(getattr(model, "cmoe_info", None) or {})
    import transformers

    info.update(
        {
            "model_type": model.config.model_type,
            "load_with": "import hookmoe.cmoe_model; AutoModelForCausalLM.from_pretrained(dir)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "machine": platform.platform(),
        }
    )
    with open(os.path.join(out_dir, "cmoe.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    return out_dir
