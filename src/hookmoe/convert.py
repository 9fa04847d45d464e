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

import copy
import json
import math
import os
import platform
import time
from contextlib import contextmanager
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from transformers.activations import ACT2FN

from .cmoe_model import (
    SUPPORTED_BASE_TYPES,
    CMoESparseBlock,
    HookmoeCMoEConfig,
    HookmoeCMoEForCausalLM,
    dense_activation_name,
)
from .cpu_gemm import accelerate, linear

__all__ = [
    "convert_dense",
    "save_converted",
    "calibrate_routers",
    "router_parameters",
    "heldout_kl",
    "valid_expert_counts",
]

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
def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers decoder stack")
    return list(layers)


def _dense_mlp(layer):
    mlp = getattr(layer, "mlp", None)
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), torch.nn.Linear):
            raise ValueError(f"layer FFN {type(mlp).__name__} has no {name} linear (not a dense gated FFN)")
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
        raise ValueError(
            f"CMoE conversion supports dense models of type {', '.join(SUPPORTED_BASE_TYPES)}; got {model_type!r}"
        )
    if getattr(config, "mlp_bias", False):
        raise ValueError("CMoE conversion does not support FFNs with biases (mlp_bias=True)")
    ffn = int(config.intermediate_size)
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_shared < 0:
        raise ValueError(f"num_shared must be >= 0, got {num_shared}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k}")
    if not 1 <= activation_topk <= ffn:
        raise ValueError(f"activation_topk must be between 1 and the FFN size {ffn}, got {activation_topk}")
    total = num_experts + num_shared
    if ffn % total != 0:
        raise ValueError(
            f"FFN size {ffn} is not divisible by num_experts + num_shared = {num_experts} + {num_shared} = {total}; "
            f"E + S must divide {ffn}: one of {valid_expert_counts(ffn)}"
        )
    return ffn // total


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
            h = act_fn(linear(x, mlp.gate_proj.weight.float())) * linear(x, mlp.up_proj.weight.float())
            markers[i].append(h.abs().topk(activation_topk, dim=-1).indices.cpu())

        return hook

    handles = [mlp.register_forward_pre_hook(make_hook(i, mlp)) for i, mlp in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        starts = range(0, calib_blocks.shape[0], batch_size)
        for s in _progress(starts, len(starts), "CMoE profile", progress):
            model(input_ids=calib_blocks[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(m) for m in markers]


# --------------------------------------------------------------------------------------------------
# 2./3. neuron assignment
# --------------------------------------------------------------------------------------------------
def _balanced_kmeans(
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
    labels, centroids, dist, n_iter = _balanced_kmeans(vectors, num_experts, size, iters, gen)

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
    num_experts: int = 16,
    num_shared: int = 2,
    top_k: int = 2,
    activation_topk: int | None = None,
    kmeans_iters: int = 10,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> HookmoeCMoEForCausalLM:
    """Convert a dense llama / qwen2 / gemma3_text causal LM into a CMoE ``HookmoeCMoEForCausalLM``.

    ``calib_blocks`` is a [n_blocks, seq_len] LongTensor of token ids (e.g. 8 x 512). The returned
    model shares nothing with ``model``; it carries ``.cmoe_info`` (a dict: shapes, timings, neuron
    assignment stats) which ``save_converted`` writes to ``cmoe.json``. ``tokenizer`` is only used
    to record its name.
    """
    t_start = time.perf_counter()
    config = model.config
    if activation_topk is None:
        activation_topk = default_activation_topk(int(getattr(config, "intermediate_size", 16) or 16))
    size = _check_shapes(config, num_experts, num_shared, top_k, activation_topk)
    if calib_blocks is None or calib_blocks.ndim != 2 or calib_blocks.numel() == 0:
        raise ValueError("calib_blocks must be a non-empty [n_blocks, seq_len] LongTensor of token ids")
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
    for top_idx in _progress(markers, len(markers), "CMoE cluster", progress):
        assignments.append(_assign_layer(top_idx, ffn, num_experts, num_shared, size, kmeans_iters, gen))
    t_cluster = time.perf_counter() - t0

    # 4. build the MoE model ------------------------------------------------------------------
    t0 = time.perf_counter()
    moe_config = HookmoeCMoEConfig(
        text_config=_text_config_dict(config),
        num_experts=num_experts,
        num_shared_experts=num_shared,
        num_experts_per_tok=top_k,
        moe_intermediate_size=size,
        hidden_act=dense_activation_name(config),
    )
    param = next(model.parameters())
    with _no_init():  # every parameter is overwritten below; buffers are copied from the dense model
        moe = HookmoeCMoEForCausalLM(moe_config)
    moe.to(device=param.device, dtype=param.dtype)

    dense_state = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    mlp_prefixes = []
    for i, layer in enumerate(_decoder_layers(model)):
        mlp = _dense_mlp(layer)
        wg, wu, wd = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        shared, experts, reps, _ = assignments[i]
        p = f"model.layers.{i}.mlp."
        mlp_prefixes.append(p)
        idx = torch.stack(experts).to(wg.device)  # [E, I]
        new_state[p + "experts.gate_up_proj"] = torch.cat([wg[idx], wu[idx]], dim=1)
        new_state[p + "experts.down_proj"] = wd[:, idx].permute(1, 0, 2).contiguous()
        rep = torch.tensor(reps, device=wg.device)
        new_state[p + "gate.weight_gate"] = wg[rep].clone()
        new_state[p + "gate.weight_up"] = wu[rep].clone()
        new_state[p + "gate.weight_linear"] = torch.zeros_like(new_state[p + "gate.weight_gate"])
        new_state[p + "gate.bias"] = torch.zeros(num_experts, dtype=wg.dtype, device=wg.device)
        new_state[p + "gate.log_logit_scale"] = torch.zeros((), dtype=wg.dtype, device=wg.device)
        new_state[p + "gate.expert_scale"] = torch.ones(num_experts, dtype=wg.dtype, device=wg.device)
        if num_shared > 0:
            sh = shared.to(wg.device)
            new_state[p + "shared_experts.gate_proj.weight"] = wg[sh].clone()
            new_state[p + "shared_experts.up_proj.weight"] = wu[sh].clone()
            new_state[p + "shared_experts.down_proj.weight"] = wd[:, sh].clone()
    for key, value in dense_state.items():
        if any(key.startswith(p) for p in mlp_prefixes):
            continue
        new_state[key] = value
    missing, unexpected = moe.load_state_dict(new_state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and moe_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"CMoE weight transfer mismatch: missing={missing[:8]} unexpected={unexpected[:8]}")
    # non-persistent buffers (RoPE tables, embedding scales) come from the dense model as they are
    moe_buffers = dict(moe.named_buffers())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in moe_buffers and moe_buffers[name].shape == buf.shape:
                moe_buffers[name].copy_(buf)
    if moe_config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = copy.deepcopy(model.generation_config)
    moe.eval()
    t_build = time.perf_counter() - t0
    if was_training:
        model.train()

    layer_stats = [a[3] for a in assignments]
    active = (num_shared + top_k) * size
    moe.cmoe_info = {
        "method": "CMoE (activation-profiled shared experts + balanced k-means routed experts)",
        "base_model": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
        "base_model_type": config.model_type,
        "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        "ffn_size": ffn,
        "num_experts": num_experts,
        "num_shared_experts": num_shared,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": size,
        "active_ffn_neurons": active,
        "active_ffn_fraction": active / ffn,
        "activation_topk": activation_topk,
        "kmeans_iters_max": kmeans_iters,
        "seed": seed,
        "calib_blocks": int(calib_blocks.shape[0]),
        "calib_seq_len": int(calib_blocks.shape[1]),
        "calib_tokens": int(calib_blocks.numel()),
        "timings_s": {
            "profile": round(t_profile, 3),
            "cluster": round(t_cluster, 3),
            "build": round(t_build, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
        "assignment_stats": {
            "mean_kmeans_iters": float(np.mean([s["kmeans_iters"] for s in layer_stats])),
            "shared_rate_mean": float(np.mean([s["shared_rate_mean"] for s in layer_stats])),
            "routed_rate_mean": float(np.mean([s["routed_rate_mean"] for s in layer_stats])),
            "marker_mass_shared": float(np.mean([s["marker_mass_shared"] for s in layer_stats])),
            "never_marked_frac": float(np.mean([s["never_marked_frac"] for s in layer_stats])),
            "per_layer": layer_stats,
        },
        "router_calibration": None,
    }
    accelerate(moe)  # on the CPU: its linears on the faster kernel, as for every model hookmoe loads
    return moe


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


# --------------------------------------------------------------------------------------------------
# router calibration
# --------------------------------------------------------------------------------------------------
def router_parameters(model: HookmoeCMoEForCausalLM) -> list[torch.nn.Parameter]:
    """The trainable parameters of router calibration: router rows, bias, logit scale, expert scales."""
    params = []
    for block in model.moe_blocks():
        params.extend(block.gate.parameters())
    return params


@contextmanager
def _only_trainable(model, params: list[torch.nn.Parameter]):
    """Freeze everything but ``params`` (eval mode: no dropout; gradients still flow); restore after."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.train(was_training)


def _kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


@torch.no_grad()
def heldout_kl(cmoe_model, dense_model, blocks: torch.LongTensor, batch_size: int = 4) -> dict:
    """Mean per-token KL(dense || moe) and both models' perplexities on ``blocks``."""
    device = next(cmoe_model.parameters()).device
    kl_sum, nll_d, nll_m, n = 0.0, 0.0, 0.0, 0
    for s in range(0, blocks.shape[0], batch_size):
        ids = blocks[s : s + batch_size].to(device)
        td = dense_model(input_ids=ids, use_cache=False).logits.float()
        tm = cmoe_model(input_ids=ids, use_cache=False).logits.float()
        kl_sum += float(_kl_per_token(td, tm).sum())
        tgt = ids[:, 1:]
        nll_d += float(F.cross_entropy(td[:, :-1].reshape(-1, td.shape[-1]), tgt.reshape(-1), reduction="sum"))
        nll_m += float(F.cross_entropy(tm[:, :-1].reshape(-1, tm.shape[-1]), tgt.reshape(-1), reduction="sum"))
        n_tok = ids.numel()
        n += n_tok
    n_pred = n - blocks.shape[0]
    return {"kl": kl_sum / n, "ppl_dense": math.exp(nll_d / n_pred), "ppl_moe": math.exp(nll_m / n_pred)}


def _finish_metrics(metrics: dict, losses: list[float], cmoe_model, dense_model, eval_blocks, batch_size: int,
                    info_key: str, after: dict | None = None) -> None:
    """Loss summary (first/last window means, a <= 50-point curve), held-out KL after training when
    ``eval_blocks`` is given, and a copy without the curve in ``cmoe_model.cmoe_info[info_key]``."""
    if losses:
        w = max(1, min(10, len(losses) // 5))
        metrics["loss_first"] = float(np.mean(losses[:w]))
        metrics["loss_last"] = float(np.mean(losses[-w:]))
        stride = max(1, len(losses) // 50)
        metrics["loss_curve"] = [round(v, 5) for v in losses[::stride]]
    if after is not None:  # already measured on eval_blocks by the caller
        metrics["after"] = after
    elif eval_blocks is not None:
        metrics["after"] = heldout_kl(cmoe_model, dense_model, eval_blocks, batch_size)
    info = getattr(cmoe_model, "cmoe_info", None)
    if isinstance(info, dict):
        info[info_key] = {k: v for k, v in metrics.items() if k != "loss_curve"}


RANK_TARGETS = ("gain", "norm")
FINE_GRAINED_MIN_EXPERTS = 16  # from this many routed experts on, "auto" router calibration ranks by norm


def resolve_calibration_target(num_experts: int, rank_target: str = "auto",
                               mse_weight: float | None = None) -> tuple[str, float]:
    """``("auto", None)`` -> the measured best for the shape. Coarse experts (E < 16): ``("gain", 1.0)``.
    Fine-grained (E >= 16): ``("norm", 0.0)``. SmolLM2 at E184 S8 K136, 60 steps, held-out ppl on 8 blocks
    (training-free 49.7): norm ranking-only 32.6, gain ranking-only 44.1; on 16 blocks (training-free 63.7): gain +
    MSE 103.4, norm + MSE 72.6. E6 S2 K4 (8 blocks): gain + MSE 36.4, norm + MSE 37.2 (results/cmoe_probe.log)."""
    fine = num_experts >= FINE_GRAINED_MIN_EXPERTS
    target = ("norm" if fine else "gain") if rank_target == "auto" else rank_target
    if target not in RANK_TARGETS:
        raise ValueError(f"rank_target must be auto or one of {', '.join(RANK_TARGETS)}, got {rank_target!r}")
    if mse_weight is None:
        mse_weight = 0.0 if fine else 1.0
    if mse_weight < 0:
        raise ValueError(f"mse_weight must be >= 0, got {mse_weight}")
    return target, float(mse_weight)


@torch.no_grad()
def _expert_gains(block: CMoESparseBlock, x: torch.Tensor, routed_target: torch.Tensor,
                  rank_target: str = "gain") -> torch.Tensor:
    """Per-token expert scores [N, E] whose top-k the router learns to pick.

    ``"gain"``: ``g_e = 2 y_e.R - |y_e|^2``, how much running expert e alone reduces ``|R - y|^2``, where
    ``R`` is the routed part of the dense FFN output (dense output minus shared experts).
    ``"norm"``: ``|y_e|^2``, i.e. drop the experts whose outputs are smallest. With many small experts the
    cross terms of the gain (``y_e`` against every other expert's share of ``R``) swamp the expert's own
    output, and the norm is the better target: SmolLM2 carved into 184 + 8 experts of 8 neurons, oracle
    routers at k = 136 gave held-out ppl 16.7 (norm) vs 23.8 (gain), dense 15.2 (cmoe_partition_probe.py)."""
    experts = block.experts
    w_gu = experts.gate_up_proj.to(x.dtype)
    gate, up = torch.einsum("nh,eih->nei", x, w_gu).chunk(2, dim=-1)
    y = torch.einsum("nei,ehi->neh", experts.act_fn(gate) * up, experts.down_proj.to(x.dtype))
    if rank_target == "norm":
        return (y * y).sum(-1)
    return 2.0 * (y * routed_target[:, None, :]).sum(-1) - (y * y).sum(-1)


@torch.no_grad()
def _gather_layer_data(
    cmoe_model, dense_layers, blocks: torch.LongTensor, batch_size: int, progress: bool, keep_targets: bool = True,
    rank_target: str = "gain",
):
    """Run the MoE model on ``blocks`` and record, per layer, the block inputs ``x``, the routed
    targets ``R = dense_mlp(x) - shared(x)`` and the expert gains (all float32, CPU)."""
    moe_blocks = cmoe_model.moe_blocks()
    store = [{"x": [], "r": [], "g": []} for _ in moe_blocks]

    def make_hook(i, block):
        dense_mlp = dense_layers[i].mlp

        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            routed = dense_mlp(x)
            if block.shared_experts is not None:
                routed = routed - block.shared_experts(x)
            xf, rf = x.float(), routed.float()
            store[i]["x"].append(xf.cpu())
            if keep_targets:
                store[i]["r"].append(rf.cpu())
            store[i]["g"].append(_expert_gains(block, xf, rf, rank_target).cpu())

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i, b)) for i, b in enumerate(moe_blocks)]
    device = next(cmoe_model.parameters()).device
    try:
        starts = range(0, blocks.shape[0], batch_size)
        for s in _progress(starts, len(starts), "router calibration: gather", progress):
            cmoe_model(input_ids=blocks[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{k: torch.cat(v) for k, v in d.items() if v} for d in store]


def _local_loss(cmoe_model, data, token_idx: torch.Tensor, rank_weight: float, mse_weight: float) -> torch.Tensor:
    """Mean over layers of: ``rank_weight`` x cross-entropy of the router against the greedy-best
    top-k experts + ``mse_weight`` x relative MSE of the routed output vs the dense routed target."""
    param = next(cmoe_model.parameters())
    total = 0.0
    blocks = cmoe_model.moe_blocks()
    for block, d in zip(blocks, data):
        x = d["x"][token_idx].to(device=param.device, dtype=param.dtype)
        logits, weights, index = block.gate(x)
        loss = 0.0
        if rank_weight > 0:
            best = d["g"][token_idx].to(param.device).topk(block.gate.top_k, dim=-1).indices
            loss = loss - rank_weight * F.log_softmax(logits.float(), dim=-1).gather(1, best).mean()
        if mse_weight > 0:
            target = d["r"][token_idx].to(param.device)
            out = block.experts(x, index, weights).float()
            loss = loss + mse_weight * (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        total = total + loss
    return total / len(blocks)


def calibrate_routers(
    cmoe_model: HookmoeCMoEForCausalLM,
    dense_model,
    calib_blocks: torch.LongTensor,
    *,
    steps: int = 400,
    lr: float = 3e-3,
    objective: str = "mlp",
    batch_size: int = 4,
    tokens_per_step: int = 1024,
    rank_weight: float = 1.0,
    mse_weight: float | None = None,
    refresh_every: int | None = None,
    rank_target: str = "auto",
    eval_blocks: torch.LongTensor | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train only the routers (rows, bias, logit scale, per-expert output scales) towards the dense model.

    objectives:
      * ``"mlp"``  layer-local. One pass of the MoE model over ``calib_blocks`` records, per block,
        its inputs x and, for every routed expert e, the gain ``g_e = 2 y_e.R - |y_e|^2`` (how much
        running e alone reduces the squared error to ``R`` = the dense FFN output minus the shared
        experts, on the same x). Each step takes ``tokens_per_step`` random tokens and minimises,
        averaged over layers, ``rank_weight`` x the cross-entropy of the router's softmax against
        the top-k experts by gain (a greedy oracle) + ``mse_weight`` x the relative MSE of the
        routed output (straight-through weights; this term also trains the per-expert scales and
        costs an experts forward per step). No backward through attention: steps are cheap.
        ``rank_target="norm"`` ranks the experts by output norm instead of gain (better for fine-grained
        shapes; see ``_expert_gains``). ``rank_target="auto"`` and ``mse_weight=None`` (the defaults)
        pick per shape: gain with the MSE term (weight 1) below 16 routed experts, norm with the ranking
        loss only from 16 on (:func:`resolve_calibration_target`).
        ``refresh_every`` re-records the inputs with the current routers (on-policy).
      * ``"kl"``   KL(dense logits || MoE logits) through the whole network on ``batch_size`` blocks
        per step; the routers get gradient only through the straight-through weights.
      * ``"both"`` the KL plus the layer-local loss.
    Memory of the local objectives: layers x calib tokens x (hidden + E [+ hidden if mse]) x 4 bytes.
    Returns metrics (held-out KL / perplexities before and after when ``eval_blocks`` is given, the
    loss curve, wall times); they are also stored in ``cmoe_model.cmoe_info["router_calibration"]``.
    """
    if objective not in ("mlp", "kl", "both"):
        raise ValueError(f"objective must be 'mlp', 'kl' or 'both', got {objective!r}")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    rank_target, mse_weight = resolve_calibration_target(cmoe_model.moe_blocks()[0].gate.num_experts,
                                                         rank_target, mse_weight)
    blocks = calib_blocks.long()
    device = next(cmoe_model.parameters()).device
    dense_layers = _decoder_layers(dense_model)
    if len(dense_layers) != len(cmoe_model.moe_blocks()):
        raise ValueError("dense and CMoE models have different numbers of layers")
    dense_model.eval()
    cmoe_model.eval()

    metrics: dict[str, Any] = {
        "objective": objective,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "tokens_per_step": tokens_per_step,
        "rank_weight": rank_weight,
        "mse_weight": mse_weight,
        "refresh_every": refresh_every,
        "rank_target": rank_target,
        "calib_blocks": int(blocks.shape[0]),
        "calib_seq_len": int(blocks.shape[1]),
        "top_k": cmoe_model.moe_blocks()[0].gate.top_k,
    }
    t0 = time.perf_counter()
    if eval_blocks is not None:
        metrics["before"] = heldout_kl(cmoe_model, dense_model, eval_blocks, batch_size)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)

    gen = torch.Generator().manual_seed(seed)
    local = objective in ("mlp", "both")
    losses: list[float] = []
    gather_s = 0.0
    t0 = time.perf_counter()
    data = None
    with _only_trainable(cmoe_model, router_parameters(cmoe_model)):
        opt = torch.optim.Adam(router_parameters(cmoe_model), lr=lr)
        for step in _progress(range(steps), steps, f"router calibration ({objective})", progress):
            if local and (data is None or (refresh_every and step % refresh_every == 0)):
                tg = time.perf_counter()
                data = None
                data = _gather_layer_data(cmoe_model, dense_layers, blocks, batch_size, False, mse_weight > 0,
                                          rank_target)
                gather_s += time.perf_counter() - tg
            loss = 0.0
            if local:
                n_tok = data[0]["x"].shape[0]
                idx = torch.randint(n_tok, (min(tokens_per_step, n_tok),), generator=gen)
                loss = _local_loss(cmoe_model, data, idx, rank_weight, mse_weight)
            if objective in ("kl", "both"):
                pick = torch.randint(blocks.shape[0], (min(batch_size, blocks.shape[0]),), generator=gen)
                ids = blocks[pick].to(device)
                with torch.no_grad():
                    teacher = dense_model(input_ids=ids, use_cache=False).logits
                student = cmoe_model(input_ids=ids, use_cache=False).logits
                loss = loss + _kl_per_token(teacher, student).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    del data
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["gather_seconds"] = round(gather_s, 2)
    _finish_metrics(metrics, losses, cmoe_model, dense_model, eval_blocks, batch_size, "router_calibration")
    return metrics


# --------------------------------------------------------------------------------------------------
# expert fine-tuning (knowledge distillation from the dense model)
# --------------------------------------------------------------------------------------------------
FINETUNE_PARTS = ("moe", "experts", "routers")


def finetune_parameters(model: HookmoeCMoEForCausalLM, train: str = "moe") -> list[torch.nn.Parameter]:
    """Parameters trained by :func:`distill_moe`: ``"moe"`` every MoE-block parameter (routers,
    routed and shared experts), ``"experts"`` the routed and shared experts only, ``"routers"`` the
    routers only. Attention, norms and embeddings always stay frozen."""
    if train not in FINETUNE_PARTS:
        raise ValueError(f"train must be one of {', '.join(FINETUNE_PARTS)}; got {train!r}")
    params = []
    for block in model.moe_blocks():
        for name, p in block.named_parameters():
            if train == "moe" or (train == "routers") == name.startswith("gate."):
                params.append(p)
    return params


def _warmup_cosine(step: int, steps: int, floor: float = 0.1) -> float:
    """LR factor: linear warm-up over the first 10 % of ``steps``, then cosine decay to ``floor``."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def distill_moe(
    cmoe_model: HookmoeCMoEForCausalLM,
    dense_model,
    train_blocks: torch.LongTensor,
    *,
    steps: int = 60,
    lr: float = 3e-4,
    batch_size: int = 4,
    train: str = "experts",
    max_grad_norm: float = 1.0,
    hidden_weight: float = 0.0,
    eval_blocks: torch.LongTensor | None = None,
    eval_every: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fine-tune the converted MoE at its native k towards the dense model (CMoE's optional fine-tune).

    Each step takes ``batch_size`` random blocks of ``train_blocks``, runs the dense teacher (no
    grad) and the MoE, and minimises the mean per-token KL(dense logits || MoE logits) with AdamW
    (10 % linear warm-up, then cosine decay to 0.1 ``lr``; gradient clipping at ``max_grad_norm``: at a
    constant 3e-4 the SmolLM2 run diverged after 30 of 45 steps in one of two otherwise identical runs). Only
    :func:`finetune_parameters` move; the router's top-k stays in the loop (the straight-through
    weights carry gradient to the router). After it, all-experts-on no longer equals the dense
    model: the experts are trained for the native k.

    ``hidden_weight`` > 0 adds layer-wise distillation: that weight times the mean over decoder layers of
    the per-token relative squared error ``|h_moe - h_dense|^2 / |h_dense|^2`` of each layer's output
    (per-token normalised, so that the few massive-activation tokens do not dominate). ``eval_every`` > 0
    with ``eval_blocks`` records the held-out KL and perplexities every that many steps
    (``metrics["eval_curve"]``).

    Why: a training-free carving loses a lot on small dense models even with a perfect router (the
    neurons a token needs are spread over experts). Measured on SmolLM2-135M E6 S2 K4
    (``benchmarks/results/cmoe_finetune/``): after :func:`calibrate_routers`, 45 steps of
    ``train="experts"`` took held-out perplexity from 44.8 to 34.9; training the routers here too
    (``"moe"``) was worse and unstable (42.4-49.8 over three runs without calibration, against 41.7 for
    ``"experts"``). Returns metrics (loss curve,
    held-out KL / perplexities before and after when ``eval_blocks`` is given, wall times), also
    stored in ``cmoe_model.cmoe_info["finetune"]``.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if hidden_weight < 0 or eval_every < 0:
        raise ValueError("hidden_weight and eval_every must be >= 0")
    blocks = train_blocks.long()
    if blocks.ndim != 2 or blocks.numel() == 0:
        raise ValueError("train_blocks must be a non-empty [n_blocks, seq_len] LongTensor of token ids")
    params = finetune_parameters(cmoe_model, train)
    device = next(cmoe_model.parameters()).device
    dense_model.eval()
    metrics: dict[str, Any] = {
        "objective": "kl(dense || moe) on logits"
        + (f" + {hidden_weight} x layer-wise hidden" if hidden_weight else ""),
        "hidden_weight": hidden_weight,
        "train": train,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "train_blocks": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "trainable_params": int(sum(p.numel() for p in params)),
        "top_k": cmoe_model.moe_blocks()[0].gate.top_k,
    }
    if eval_blocks is not None:
        metrics["before"] = heldout_kl(cmoe_model, dense_model, eval_blocks, batch_size)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    hidden = hidden_weight > 0
    curve = [] if eval_every and eval_blocks is not None else None
    t0 = time.perf_counter()
    with _only_trainable(cmoe_model, params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps))
        bar = _progress(range(steps), steps, f"MoE fine-tune ({train})", progress)
        for _ in bar:
            pick = torch.randint(blocks.shape[0], (min(batch_size, blocks.shape[0]),), generator=gen)
            ids = blocks[pick].to(device)
            with torch.no_grad():
                t_out = dense_model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            s_out = cmoe_model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            loss = _kl_per_token(t_out.logits, s_out.logits).mean()
            if hidden:
                loss = loss + hidden_weight * _hidden_distance(t_out.hidden_states, s_out.hidden_states)
            del t_out, s_out
            if not torch.isfinite(loss):
                raise RuntimeError(f"MoE fine-tune: non-finite loss at step {len(losses)}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            step = len(losses)
            if curve is not None and (step % eval_every == 0 or step == steps):
                point = heldout_kl(cmoe_model, dense_model, eval_blocks, batch_size)
                curve.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), **point})
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    after = None
    if curve is not None:
        metrics["eval_curve"] = curve
        if curve and curve[-1]["step"] == steps:
            after = {k: v for k, v in curve[-1].items() if k not in ("step", "seconds")}
    _finish_metrics(metrics, losses, cmoe_model, dense_model, eval_blocks, batch_size, "finetune", after)
    return metrics


def _hidden_distance(teacher_states, student_states) -> torch.Tensor:
    """Mean over decoder layers and tokens of ``|s - t|^2 / |t|^2`` (the embeddings, entry 0, are skipped)."""
    total = 0.0
    pairs = list(zip(teacher_states[1:], student_states[1:]))
    for t, s in pairs:
        t, s = t.float(), s.float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    return total / max(1, len(pairs))


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def register_cli(app) -> None:
    import typer

    @app.command()
    def convert(dense_model: str = typer.Argument(..., help="dense llama / qwen2 / gemma3 model: hub id, dir, "
                                                             ".gguf, smollm2 or gemma3-270m"),
                experts: int = typer.Option(16, "--experts", help="routed experts per FFN"),
                shared: int = typer.Option(2, "--shared", help="shared (always-on) experts per FFN"),
                top_k: int = typer.Option(2, "--top-k", help="native k of the converted MoE"),
                out: str = typer.Option(..., "--out", help="output directory (a normal transformers model dir)"),
                calib: str = typer.Option("builtin", help="calibration text source"),
                calib_blocks: int = typer.Option(8, help="blocks for activation profiling"),
                seq_len: int = typer.Option(512, help="tokens per block"),
                calibrate_steps: int = typer.Option(0, "--calibrate-steps",
                                                    help="router calibration steps against the dense model (0 = off)"),
                calibrate_target: str = typer.Option(
                    "auto", "--calibrate-target",
                    help="experts the router learns to pick: gain (best fit to the dense FFN), norm (largest "
                         "outputs; better for many small experts) or auto (norm from 16 routed experts on)"),
                calibrate_mse_weight: Optional[float] = typer.Option(
                    None, "--calibrate-mse-weight",
                    help="weight of the routed-output MSE term in router calibration (0 = ranking loss only; "
                         "default: 1 below 16 routed experts, 0 from 16 on)"),
                finetune_steps: int = typer.Option(0, "--finetune-steps",
                                                   help="KD fine-tune steps of the MoE blocks against the dense model "
                                                        "(0 = off; experts then no longer sum to the dense FFN)"),
                finetune_lr: float = typer.Option(3e-4, "--finetune-lr"),
                finetune_train: str = typer.Option("experts", "--finetune-train",
                                                   help="what the fine-tune trains: experts (routers frozen; "
                                                        "measured best), moe (routers + experts) or routers"),
                finetune_hidden_weight: float = typer.Option(
                    0.0, "--finetune-hidden-weight",
                    help="add layer-wise hidden-state distillation with this weight (0 = KL on logits only)"),
                finetune_blocks: int = typer.Option(64, help="blocks of fine-tune text"),
                activation_topk: Optional[int] = typer.Option(None, help="K_a: neurons marked per token when "
                                                                         "profiling (default: FFN size / 16)"),
                seed: int = typer.Option(0),
                no_progress: bool = typer.Option(False, "--no-progress")):
        """CMoE: convert a dense model into an MoE (training-free; optional router calibration and KD fine-tune)."""
        from .cli import progress_bars
        from .data import make_blocks
        from .errors import UserError
        from .models import load_causal_lm

        if calibrate_target not in ("auto",) + RANK_TARGETS:  # refused before minutes of loading and converting
            raise UserError(f"--calibrate-target must be auto, {' or '.join(RANK_TARGETS)}; got '{calibrate_target}'")
        if calibrate_mse_weight is not None and calibrate_mse_weight < 0:
            raise UserError(f"--calibrate-mse-weight must be >= 0, got {calibrate_mse_weight}")
        with progress_bars(not no_progress):  # transformers' loading bars too
            dense, tok = load_causal_lm(dense_model, dtype="float32", device="cpu")
            if tok is None:
                raise UserError(f"'{dense_model}' has no tokenizer; calibration text cannot be tokenised")
            blocks = make_blocks(tok, calib, calib_blocks, seq_len, split="train", seed=seed)
            try:
                moe = convert_dense(dense, tok, blocks, num_experts=experts, num_shared=shared, top_k=top_k,
                                    activation_topk=activation_topk, seed=seed, progress=not no_progress)
                if calibrate_steps > 0:
                    more = make_blocks(tok, calib, 16, seq_len, split="train", seed=seed + 1)
                    calibrate_routers(moe, dense, more, steps=calibrate_steps, rank_target=calibrate_target,
                                      mse_weight=calibrate_mse_weight, seed=seed, progress=not no_progress)
                if finetune_steps > 0:
                    ft = make_blocks(tok, calib, finetune_blocks, min(seq_len, 256), split="train", seed=seed + 2)
                    distill_moe(moe, dense, ft, steps=finetune_steps, lr=finetune_lr, seed=seed,
                                train=finetune_train, hidden_weight=finetune_hidden_weight,
                                progress=not no_progress)
            except ValueError as e:
                if isinstance(e, UserError):
                    raise
                raise UserError(str(e)) from None
            save_converted(moe, tok, out)
            print(f"converted {dense_model}: {experts} routed + {shared} shared experts per FFN, top-{top_k} -> {out}")
