"""The learning-rate schedule: warm-up, then cosine, linear or constant decay to ``lr * min_lr_ratio``."""

from __future__ import annotations

import math
from hookmoe.training.config import TrainConfig




def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    warm = int(round(cfg.warmup * total)) if cfg.warmup < 1 else int(cfg.warmup)
    warm = min(warm, max(0, total - 1))
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - warm) / max(1, total - warm - 1)
    frac = min(max(frac, 0.0), 1.0)
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return lo + (cfg.lr - lo) * (1.0 - frac)
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))
