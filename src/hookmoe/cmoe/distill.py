"""Distilling a converted MoE from its dense model: KL on the logits (plus an optional layer-wise hidden-state term),
training the experts, the routers or both, with a held-out KL curve."""

from __future__ import annotations

from hookmoe.errors import ConversionError

from hookmoe import progress as progress_bars

import math
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hookmoe.cmoe.convert import FINETUNE_PARTS, ConvertOptions
from hookmoe.models.cmoe import HookmoeCMoEForCausalLM


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


# --------------------------------------------------------------------------------------------------
# expert fine-tuning (knowledge distillation from the dense model)
# --------------------------------------------------------------------------------------------------
def finetune_parameters(model: HookmoeCMoEForCausalLM, train: str = "moe") -> list[torch.nn.Parameter]:
    """Parameters trained by :func:`distill_moe`: ``"moe"`` every MoE-block parameter (routers,
    routed and shared experts), ``"experts"`` the routed and shared experts only, ``"routers"`` the
    routers only. Attention, norms and embeddings always stay frozen."""
    if train not in FINETUNE_PARTS:
        raise ConversionError(f"train must be one of {', '.join(FINETUNE_PARTS)}; got {train!r}")
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


def _distill_loss(cmoe_model, dense_model, ids: torch.Tensor, hidden_weight: float) -> torch.Tensor:
    """Mean per-token KL(dense || MoE) on ``ids`` [B, T], plus ``hidden_weight`` x the layer-wise hidden distance."""
    hidden = hidden_weight > 0
    with torch.no_grad():
        t_out = dense_model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    s_out = cmoe_model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    loss = _kl_per_token(t_out.logits, s_out.logits).mean()
    if hidden:
        loss = loss + hidden_weight * _hidden_distance(t_out.hidden_states, s_out.hidden_states)
    return loss


def distill_moe(
    cmoe_model: HookmoeCMoEForCausalLM,
    dense_model,
    train_blocks: torch.LongTensor,
    *,
    steps: int = 60,
    lr: float = ConvertOptions.finetune_lr,
    batch_size: int = 4,
    train: str = ConvertOptions.finetune_train,
    max_grad_norm: float = 1.0,
    hidden_weight: float = ConvertOptions.finetune_hidden_weight,
    eval_blocks: torch.LongTensor | None = None,
    eval_every: int = 0,
    seed: int = ConvertOptions.seed,
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
        raise ConversionError("steps must be >= 0")
    if batch_size < 1:
        raise ConversionError("batch_size must be >= 1")
    if hidden_weight < 0 or eval_every < 0:
        raise ConversionError("hidden_weight and eval_every must be >= 0")
    blocks = train_blocks.long()
    if blocks.ndim != 2 or blocks.numel() == 0:
        raise ConversionError("train_blocks must be a non-empty [n_blocks, seq_len] LongTensor of token ids")
    params = finetune_parameters(cmoe_model, train)
    device = next(cmoe_model.parameters()).device
    dense_model.eval()
    metrics: dict[str, Any] = {
        "objective": "kl(dense || moe) on logits" + (f" + {hidden_weight} x layer-wise hidden" if hidden_weight else ""),
        "hidden_weight": hidden_weight, "train": train, "steps": steps, "lr": lr, "batch_size": batch_size,
        "train_blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]),
        "trainable_params": int(sum(p.numel() for p in params)), "top_k": cmoe_model.moe_blocks()[0].gate.top_k,
    }
    if eval_blocks is not None:
        metrics["before"] = heldout_kl(cmoe_model, dense_model, eval_blocks, batch_size)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    curve = [] if eval_every and eval_blocks is not None else None
    t0 = time.perf_counter()
    with _only_trainable(cmoe_model, params):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps))
        bar = progress_bars.iterate(range(steps), steps, f"MoE fine-tune ({train})", progress)
        for _ in bar:
            pick = torch.randint(blocks.shape[0], (min(batch_size, blocks.shape[0]),), generator=gen)
            loss = _distill_loss(cmoe_model, dense_model, blocks[pick].to(device), hidden_weight)
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
