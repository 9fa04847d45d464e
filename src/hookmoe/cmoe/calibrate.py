"""Router calibration for a converted model: each router learns, layer by layer, which experts best reproduce its
dense FFN (``gain``) or have the largest outputs (``norm``); only the routers train."""

from __future__ import annotations

from hookmoe.errors import ConversionError

from hookmoe import progress as progress_bars

import time
from typing import Any

import torch
import torch.nn.functional as F

from hookmoe.models.cmoe import CMoESparseBlock, HookmoeCMoEForCausalLM
from hookmoe.cmoe.distill import _finish_metrics, _kl_per_token, _only_trainable, heldout_kl
from hookmoe.cmoe.convert import RANK_TARGETS, ConvertOptions, _decoder_layers
from hookmoe.models import placement


# --------------------------------------------------------------------------------------------------
# router calibration
# --------------------------------------------------------------------------------------------------
def router_parameters(model: HookmoeCMoEForCausalLM) -> list[torch.nn.Parameter]:
    """The trainable parameters of router calibration: router rows, bias, logit scale, expert scales."""
    params = []
    for block in model.moe_blocks():
        params.extend(block.gate.parameters())
    return params


FINE_GRAINED_MIN_EXPERTS = 16  # from this many routed experts on, "auto" router calibration ranks by norm


def resolve_calibration_target(num_experts: int, rank_target: str = ConvertOptions.calibrate_target,
                               mse_weight: float | None = ConvertOptions.calibrate_mse_weight) -> tuple[str, float]:
    """``("auto", None)`` -> the measured best for the shape. Coarse experts (E < 16): ``("gain", 1.0)``.
    Fine-grained (E >= 16): ``("norm", 0.0)``. SmolLM2 at E184 S8 K136, 60 steps, held-out ppl on 8 blocks
    (training-free 49.7): norm ranking-only 32.6, gain ranking-only 44.1; on 16 blocks (training-free 63.7): gain +
    MSE 103.4, norm + MSE 72.6. E6 S2 K4 (8 blocks): gain + MSE 36.4, norm + MSE 37.2 (results/cmoe_probe.log)."""
    fine = num_experts >= FINE_GRAINED_MIN_EXPERTS
    target = ("norm" if fine else "gain") if rank_target == "auto" else rank_target
    if target not in RANK_TARGETS:
        raise ConversionError(f"rank_target must be auto or one of {', '.join(RANK_TARGETS)}, got {rank_target!r}")
    if mse_weight is None:
        mse_weight = 0.0 if fine else 1.0
    if mse_weight < 0:
        raise ConversionError(f"mse_weight must be >= 0, got {mse_weight}")
    return target, float(mse_weight)


@torch.no_grad()
def expert_gains(block: CMoESparseBlock, x: torch.Tensor, routed_target: torch.Tensor,
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
    rank_target: str = "gain", dense_model=None,
):
    """Run the MoE model on ``blocks`` and record, per layer, the block inputs ``x``, the routed
    targets ``R = dense_mlp(x) - shared(x)`` and the expert gains (all float32, CPU)."""
    moe_blocks = cmoe_model.moe_blocks()
    store = [{"x": [], "r": [], "g": []} for _ in moe_blocks]

    def make_hook(i, block):
        dense_mlp = dense_layers[i].mlp
        # a dispatched dense model: its FFN runs where accelerate placed it (offloaded weights are streamed in by
        # accelerate's hooks on its linears); the result comes back beside the MoE's activations
        dense_device = placement.execution_device(dense_model, dense_mlp) if dense_model is not None else None

        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            routed = dense_mlp(x if dense_device is None else x.to(dense_device)).to(x.device)
            if block.shared_experts is not None:
                routed = routed - block.shared_experts(x)
            xf, rf = x.float(), routed.float()
            store[i]["x"].append(xf.cpu())
            if keep_targets:
                store[i]["r"].append(rf.cpu())
            store[i]["g"].append(expert_gains(block, xf, rf, rank_target).cpu())

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i, b)) for i, b in enumerate(moe_blocks)]
    device = next(cmoe_model.parameters()).device
    try:
        starts = range(0, blocks.shape[0], batch_size)
        for s in progress_bars.iterate(starts, len(starts), "router calibration: gather", progress):
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
    mse_weight: float | None = ConvertOptions.calibrate_mse_weight,
    refresh_every: int | None = None,
    rank_target: str = ConvertOptions.calibrate_target,
    eval_blocks: torch.LongTensor | None = None,
    seed: int = ConvertOptions.seed,
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
        shapes; see ``expert_gains``). ``rank_target="auto"`` and ``mse_weight=None`` (the defaults)
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
        raise ConversionError(f"objective must be 'mlp', 'kl' or 'both', got {objective!r}")
    if steps < 0:
        raise ConversionError("steps must be >= 0")
    rank_target, mse_weight = resolve_calibration_target(cmoe_model.moe_blocks()[0].gate.num_experts,
                                                         rank_target, mse_weight)
    blocks = calib_blocks.long()
    dense_layers = _decoder_layers(dense_model)
    if len(dense_layers) != len(cmoe_model.moe_blocks()):
        raise ConversionError("dense and CMoE models have different numbers of layers")
    dense_model.eval()
    cmoe_model.eval()

    metrics: dict[str, Any] = {
        "objective": objective, "steps": steps, "lr": lr, "batch_size": batch_size,
        "tokens_per_step": tokens_per_step, "rank_weight": rank_weight, "mse_weight": mse_weight,
        "refresh_every": refresh_every, "rank_target": rank_target, "calib_blocks": int(blocks.shape[0]),
        "calib_seq_len": int(blocks.shape[1]), "top_k": cmoe_model.moe_blocks()[0].gate.top_k,
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
        for step in progress_bars.iterate(range(steps), steps, f"router calibration ({objective})", progress):
            if local and (data is None or (refresh_every and step % refresh_every == 0)):
                tg = time.perf_counter()
                data = None  # free the old record before taking the new one
                data = _gather_layer_data(cmoe_model, dense_layers, blocks, batch_size, False, mse_weight > 0,
                                          rank_target, dense_model)
                gather_s += time.perf_counter() - tg
            loss = _calibration_loss(cmoe_model, dense_model, data, blocks, objective, gen,
                                     tokens_per_step=tokens_per_step, batch_size=batch_size,
                                     rank_weight=rank_weight, mse_weight=mse_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    del data
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["gather_seconds"] = round(gather_s, 2)
    _finish_metrics(metrics, losses, cmoe_model, dense_model, eval_blocks, batch_size, "router_calibration")
    return metrics


def _calibration_loss(cmoe_model, dense_model, data, blocks: torch.Tensor, objective: str, gen: torch.Generator, *,
                      tokens_per_step: int, batch_size: int, rank_weight: float, mse_weight: float) -> torch.Tensor:
    """One step's loss: the layer-local terms on random recorded tokens and / or the KL to the dense logits on
    random blocks."""
    loss = torch.zeros(())
    if objective in ("mlp", "both"):
        n_tok = data[0]["x"].shape[0]
        idx = torch.randint(n_tok, (min(tokens_per_step, n_tok),), generator=gen)
        loss = _local_loss(cmoe_model, data, idx, rank_weight, mse_weight)
    if objective in ("kl", "both"):
        pick = torch.randint(blocks.shape[0], (min(batch_size, blocks.shape[0]),), generator=gen)
        ids = blocks[pick].to(next(cmoe_model.parameters()).device)
        with torch.no_grad():
            teacher = dense_model(input_ids=ids, use_cache=False).logits
        student = cmoe_model(input_ids=ids, use_cache=False).logits
        loss = loss + _kl_per_token(teacher, student).mean()
    return loss
