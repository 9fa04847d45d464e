"""Hook training: every base weight frozen, only the Hook learns, while the model runs a reduced plan.

Objectives (``objective=``):

``kd`` (default)
    KL(teacher || student) over the next-token distribution. The teacher is the same model under its
    native routing with the Hook bypassed (no grad). By default (``kd_topk=32``) the teacher runs once
    over all training blocks and its top-K log-probabilities are cached (K + 1 bins: the top K and "the
    rest", so the loss is still a true KL between coarsened distributions; memory ``N·T·K·8`` bytes on
    the CPU, capped by ``kd_cache_max_gb`` — above it, or when the run reads fewer blocks than it has,
    the teacher is recomputed per batch);
    ``kd_topk=None`` recomputes the exact full-vocabulary teacher every batch.
``lm``
    Next-token cross-entropy on the calibration text (the paper's LLaMA-Factory "pt" stage).
``hidden``
    Relative MSE ``|h_s − h_t|² / |h_t|²`` between the student's and the teacher's hidden states after
    the final norm (``hidden_layer=None``) or after decoder layer ``hidden_layer`` (≥ the hooked layer).

The defaults (``kd``, ``zero`` init, the top-32 teacher cache) are the measured best of
``benchmarks/hook_objectives.py``; the numbers are in ``benchmarks/results/hook_objectives.json``.

Loop: AdamW (lr 1e-4 as in the paper), linear warm-up then cosine/linear/constant schedule, gradient
clipping, gradient accumulation, bf16 autocast on CUDA, optional gradient checkpointing, validation
(KD, LM and hidden losses on held-out blocks, plus the no-hook baseline at the start) every
``eval_every`` steps with early stopping (``patience`` evaluations without improvement; the best weights
are restored at the end), a rich progress bar (loss, tokens/s), ``train_log.jsonl`` and ``loss.png``.

Checkpoints (``out_dir/checkpoint``, written to a temporary directory and moved into place with
``os.replace``): ``hook.safetensors`` (weights), ``optimizer.safetensors`` (AdamW moments, RNG states,
best weights) and ``trainer_state.json`` (step, data position, schedule, history, config). No pickle.
``resume=True`` continues from there and ends with the same weights as an uninterrupted run.
A NaN/inf loss or gradient stops training before the optimizer step (the weights stay at the last good
step, which is checkpointed) with a one-line :class:`TrainingError`.
"""

from .checkpoint import read_log
from .config import OBJECTIVES, DEFAULT_OBJECTIVE, SCHEDULES, AMP_MODES, CHECKPOINT_DIR, LOG_NAME, PLOT_NAME, TRAINER_STATE, CKPT_FORMAT, TrainConfig, TrainOptions, TrainResult, TrainSettings
from .loop import hook_eval, train_hook, HookTraining
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
    "TrainOptions",
    "TrainResult",
    "TrainSettings",
    "hook_eval",
    "train_hook",
    "HookTraining",
    "lm_loss",
    "kd_loss",
    "kd_loss_topk",
    "hidden_loss",
    "lr_at",
]
