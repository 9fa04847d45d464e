"""Selection rules on router probabilities: top-p, max-ratio, NAEE and entropy buckets, as one selector per layer."""

from __future__ import annotations

import math

import torch

from hookmoe.errors import PlanError
from hookmoe.routing.plan import Dynamic


def router_probs(logits: torch.Tensor, score: str) -> torch.Tensor:
    """The routing distribution over all experts, as the architecture scores it."""
    logits = logits.float()
    if score == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    return logits.softmax(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-20).log()).sum(-1)


def keep_sorted(rule: Dynamic, p_sorted: torch.Tensor, probs: torch.Tensor, k_cap: int) -> torch.Tensor:
    """Which of the sorted candidate slots (descending probability) a dynamic rule keeps; column 0 always."""
    n, k = p_sorted.shape
    pos = torch.arange(k, device=p_sorted.device)
    if rule.kind == "topp":
        before = torch.cumsum(p_sorted, -1) - p_sorted  # mass of the slots ranked above
        keep = before < float(rule.value)
    elif rule.kind == "ratio":
        keep = p_sorted >= (1.0 - float(rule.value)) * p_sorted[:, :1]
    elif rule.kind == "naee":
        keep = p_sorted >= float(rule.value) * p_sorted[:, :1]
    elif rule.kind == "entropy":
        th = torch.tensor(rule.thresholds, device=probs.device, dtype=torch.float32)
        kk = 1 + (entropy(probs).unsqueeze(-1) > th).sum(-1)
        keep = pos.unsqueeze(0) < kk.unsqueeze(-1)
    else:  # pragma: no cover - parse guards this
        raise PlanError(f"unknown dynamic rule {rule.kind}")
    keep = keep & (pos < k_cap).unsqueeze(0)
    keep[:, 0] = True
    return keep


def make_selector(rule: Dynamic, cap: int, score: str, *, renorm: bool, sorted_candidates: bool):
    """The per-call work of a dynamic rule, with as few tensor ops as possible (it runs in every MoE layer of
    every decode step): ``select(logits, weights, index) -> (new_weights, keep)``.

    Same decisions as :func:`keep_sorted` on the candidates sorted by probability (bit for bit: the same
    float32 operations on the same values), but no host sync, no Python loop over tokens, thresholds as
    device tensors (made once per device), and no sort where the router already sorted its candidates
    (``sorted_candidates``; column 0 is then the most probable) — ``ratio``/``naee`` need no order at all
    (the top candidate's probability is a row maximum), ``entropy`` on sorted candidates needs no per-slot
    probabilities. Unsorted candidates (DeepSeek) are sorted once (``torch.sort``) and the decisions
    scattered back. ``renorm``: rescale the kept weights to the original total (renormalising architectures).
    """
    kind = rule.kind
    consts: dict = {}

    def thresholds(dev: torch.device, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rule constant, slot mask for k > cap) on ``dev``; entropy's constant is a per-slot vector of
        negated thresholds: slot j is kept iff sum(p log p) < vec[j] (= -threshold j-1; +inf for slot 0,
        -inf for slots no threshold count can reach or beyond the cap)."""
        key = (dev, k)
        c = consts.get(key)
        if c is None:
            f32 = dict(dtype=torch.float32, device=dev)
            if kind == "topp":
                t = torch.tensor(float(rule.value), **f32)
            elif kind == "ratio":
                t = torch.tensor(1.0 - float(rule.value), **f32)
            elif kind == "naee":
                t = torch.tensor(float(rule.value), **f32)
            elif kind == "entropy":
                th = sorted(float(x) for x in rule.thresholds)
                vec = [math.inf] + [-x for x in th]
                vec = [vec[j] if j < len(vec) and j < cap else -math.inf for j in range(k)]
                vec[0] = math.inf
                t = torch.tensor(vec, **f32)
            else:  # pragma: no cover - parse guards this
                raise PlanError(f"unknown dynamic rule {kind}")
            slot_mask = torch.arange(k, device=dev) < cap if k > cap and kind != "entropy" else None
            c = consts[key] = (t, slot_mask)
        return c

    def decide(p: torch.Tensor, probs: torch.Tensor, t: torch.Tensor, top_is_first: bool) -> torch.Tensor:
        """keep per slot for candidates sorted by probability (``top_is_first``) or, for ratio/naee, in any order."""
        if kind == "topp":
            return (p.cumsum(-1) - p) < t  # mass of the slots ranked above; slot 0: exactly 0 < t
        if kind in ("ratio", "naee"):
            top = p[:, :1] if top_is_first else p.amax(-1, keepdim=True)
            return p >= top * t  # the top slot always passes (t <= 1)
        s = (probs * probs.clamp_min(1e-20).log()).sum(-1, keepdim=True)  # = -entropy, exactly
        return s < t

    def select(logits: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() != 2:
            logits = logits.reshape(-1, logits.shape[-1])
        if logits.dtype != torch.float32:
            logits = logits.float()
        if score == "sigmoid":
            sg = logits.sigmoid()
            probs = sg / sg.sum(-1, keepdim=True).clamp_min(1e-20)
        else:
            probs = logits.softmax(-1)
        k = idx.shape[-1]
        t, slot_mask = thresholds(logits.device, k)
        if sorted_candidates and slot_mask is None:
            p = probs if kind == "entropy" else probs.gather(-1, idx)
            keep = decide(p, probs, t, True)
        elif kind in ("ratio", "naee") and slot_mask is None:
            keep = decide(probs.gather(-1, idx), probs, t, False)
        else:  # sort the candidates, decide, scatter the decisions back to their slots
            p_s, order = probs.gather(-1, idx).sort(-1, descending=True)
            keep_s = decide(p_s, probs, t, True)
            if slot_mask is not None:
                keep_s = keep_s & slot_mask
            keep = torch.empty_like(keep_s).scatter_(-1, order, keep_s)
        new_w = torch.where(keep, w, 0.0)
        if renorm:
            new_w = new_w * (w.sum(-1, keepdim=True) / new_w.sum(-1, keepdim=True).clamp_min(1e-20))
        return new_w, keep

    return select
