"""Training the Hook with everything else frozen: config, losses, learning-rate schedule, checkpoints/resume and
the loop.
"""

from .checkpoint import read_log
from .config import OBJECTIVES, DEFAULT_OBJECTIVE, SCHEDULES, AMP_MODES, CHECKPOINT_DIR, LOG_NAME, PLOT_NAME, TRAINER_STATE, CKPT_FORMAT, TrainConfig, TrainResult
from .loop import hook_eval, gap_closed, train_hook, plot_history
from .losses import lm_loss, kd_loss, kd_loss_topk, hidden_loss
from .schedule import lr_at

__all__ = [
    "read_log",
    "OBJECTIVES",
    "DEFAULT_OBJECTIVE",
    "SCHEDULES",
    "AMP_MODES",
    "CHECKPOINT_DIR",
    "LOG_NAME",
    "PLOT_NAME",
    "TRAINER_STATE",
    "CKPT_FORMAT",
    "TrainConfig",
    "TrainResult",
    "hook_eval",
    "gap_closed",
    "train_hook",
    "plot_history",
    "lm_loss",
    "kd_loss",
    "kd_loss_topk",
    "hidden_loss",
    "lr_at",
]
