"""What defines a Hook-training run (:class:`TrainConfig`, saved in the artifact and the checkpoint), its result, and
the file names a run writes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path


from hookmoe.hook.compensators import DEFAULT_KIND, kind_name, parse_kind
from hookmoe.hook.module import DEFAULT_INIT, INITS
from hookmoe.hook.inject import HookSet
from hookmoe.errors import TrainingError, UserError


OBJECTIVES = ("lm", "kd", "hidden")


DEFAULT_OBJECTIVE = "kd"  # measured: see benchmarks/results/hook_objectives.json


SCHEDULES = ("cosine", "linear", "constant")


AMP_MODES = ("auto", "bf16", "off")


CHECKPOINT_DIR = "checkpoint"


LOG_NAME = "train_log.jsonl"


PLOT_NAME = "loss.png"


TRAINER_STATE = "trainer_state.json"


CKPT_FORMAT = "hookmoe-checkpoint/1"


# Settings a resumed run must share with the checkpoint: every one that changes the result (steps and lr shape the
# schedule, eval cadence and patience decide the best weights kept, ...), so that a resumed run ends exactly where
# the uninterrupted one would, and its manifest describes the whole run. Only how often checkpoints are written,
# gradient checkpointing (same maths, less memory) and the KD cache's memory cap may differ.
_RESUME_FREE = ("checkpoint_every", "grad_checkpointing", "kd_cache_max_gb")




@dataclass
class TrainConfig:
    """Everything that defines a hook-training run (saved in the artifact and the checkpoint)."""

    layers: list[int]
    plan: dict
    objective: str = DEFAULT_OBJECTIVE
    steps: int | None = None  # optimizer steps; default from epochs
    epochs: float | None = None  # passes over the training blocks (default 1 when steps is None)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.05  # fraction of the steps (< 1) or a number of steps (>= 1)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # default: about 10 evaluations per run
    patience: int | None = None  # early stopping: evaluations without improvement before stopping (None: never)
    checkpoint_every: int | None = None  # default: eval_every
    init: str = DEFAULT_INIT
    inner_size: int | None = None
    kind: str = DEFAULT_KIND  # compensator kind: hook | router | output | hook+router | ... (hookmoe.hook.compensators)
    rank: int | None = None  # output correction rank (default: half an expert's width)
    part_layers: dict | None = None  # layers per compensator part when they differ (e.g. {"router": [...], "hook": [...]})
    budget: str | None = None  # parameter budget the sizes were chosen for (e.g. "0.5%"), for the record
    seed: int = 0
    kd_temperature: float = 1.0
    kd_topk: int | None = 32  # cache the teacher's top-K log-probs (None: exact teacher every batch)
    kd_cache_max_gb: float = 4.0  # above this the top-K cache is skipped (teacher recomputed per batch)
    hidden_layer: int | None = None
    grad_checkpointing: bool = False
    amp: str = "auto"
    restore_best: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise TrainingError(f"unknown objective '{self.objective}' (use one of: {', '.join(OBJECTIVES)})")
        if self.init not in INITS:
            raise TrainingError(f"unknown hook init '{self.init}' (use one of: {', '.join(INITS)})")
        try:
            self.kind = kind_name(parse_kind(self.kind))
        except UserError as e:
            raise TrainingError(str(e)) from None
        if self.rank is not None and self.rank < 1:
            raise TrainingError(f"rank must be >= 1, got {self.rank}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule '{self.schedule}' (use one of: {', '.join(SCHEDULES)})")
        if self.amp not in AMP_MODES:
            raise TrainingError(f"unknown amp mode '{self.amp}' (use one of: {', '.join(AMP_MODES)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")
        if self.steps is not None and self.steps < 1:
            raise TrainingError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainingError(f"--epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "kd_topk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.patience is not None and self.patience < 1:
            raise TrainingError(f"--patience must be >= 0 (0 = never stop early), got {self.patience}")
        if not self.kd_temperature > 0:
            raise TrainingError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.warmup < 0:
            raise TrainingError(f"--warmup must be >= 0, got {self.warmup}")
        if self.hidden_layer is not None and self.hidden_layer < max(self.layers):
            raise TrainingError(f"--hidden-layer {self.hidden_layer} is below the hooked layer {max(self.layers)}: "
                                "its hidden state does not depend on the Hook")


@dataclass
class TrainResult:
    hookset: HookSet
    history: list[dict]
    metrics: dict
    out_dir: Path | None = None
    config: TrainConfig | None = None


_IDENTITY_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RESUME_FREE)
