"""Training objectives: next-token loss, KL to the native model (exact or over a cached top-K), hidden-state MSE."""

from __future__ import annotations


import torch
from torch.nn import functional as F



def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    lg = logits[:, :-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at ``temperature`` (scaled by T² as usual)."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, -1)
    p = F.log_softmax(teacher_logits.float() / t, -1)
    kl = (p.exp() * (p - s)).sum(-1)
    return kl.mean() * t * t


def kd_loss_topk(student_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL over K+1 bins (the teacher's top K tokens and the rest) from cached teacher log-probs."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, -1)
    s_k = s.gather(-1, t_idx.long())
    t_logp = t_logp.float()
    p_k = t_logp.exp()
    kl = (p_k * (t_logp - s_k)).sum(-1)
    rest_t = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    # log(1 - sum exp(s_k)) computed stably
    rest_s_log = torch.log1p(-torch.logsumexp(s_k, -1).exp().clamp(max=1 - 1e-7))
    kl = kl + torch.where(rest_t > 1e-12, rest_t * (rest_t.clamp_min(1e-30).log() - rest_s_log),
                          torch.zeros_like(rest_t))
    return kl.mean() * t * t


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative MSE: mean squared error divided by the teacher's mean square (a constant)."""
    s, t = student.float(), teacher.float()
    return ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
