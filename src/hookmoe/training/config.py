"""What defines a Hook-training run (:class:`TrainConfig`, saved in the artifact and the checkpoint), its result, and
the file names a run writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional


from hookmoe.hook.compensators import DEFAULT_KIND, kind_name, parse_budget, parse_kind
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import Options, argument, option
from hookmoe.routing.plan import PLAN_HELP
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




@dataclass(kw_only=True)
class TrainSettings(Options):
    """The settings of a Hook-training run a user chooses: one source for :func:`~hookmoe.training.train_hook`'s
    keyword arguments, ``hookmoe train``'s flags and the keys of its ``--config`` file."""

    error: ClassVar[type] = TrainingError

    kind: str = option(DEFAULT_KIND, "compensator: hook (the paper's, before the router) | router (router retune) | "
                       "output (low-rank correction on the MoE output) | hook+router | ...")
    budget: Optional[str] = option(None, "parameter budget, e.g. 0.5% of the model: sets the Hook width / output rank "
                                   "(and how many layers auto picks)")
    rank: Optional[int] = option(None, "output correction rank (default: half an expert's width)", min=1)
    objective: str = option(DEFAULT_OBJECTIVE, "kd (KL to the native model) | lm | hidden", choices=OBJECTIVES)
    steps: Optional[int] = option(None, "optimizer steps (default: --epochs over the data)", min=1)
    epochs: float = option(3.0, "passes over the calibration samples when --steps is not given (LLaMA-Factory's "
                           "default, which the paper used)", min=0, min_open=True)
    batch_size: int = option(4, "blocks per micro-batch (per rank under torchrun)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(1e-4, "AdamW learning rate (paper: 1e-4)", min=0, min_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", cli=False)
    warmup: float = option(0.05, "warm-up: fraction of the steps (<1) or steps (>=1)", min=0)
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    min_lr_ratio: float = option(0.1, "the schedule decays to lr x this", min=0, max=1)
    max_grad_norm: Optional[float] = option(1.0, "gradient clipping", min=0, min_open=True, zero_means="off")
    eval_every: Optional[int] = option(None, "steps between validations (default: ~10 per run)", min=1)
    patience: Optional[int] = option(None, "early stopping: stop after this many validations without improvement "
                                     "and keep the best weights", min=1, zero_means="never")
    checkpoint_every: Optional[int] = option(None, "steps between checkpoints (default: --eval-every)", min=1)
    init: str = option(DEFAULT_INIT, "zero (starts as the identity) | paper (nn.Linear init)", choices=INITS)
    inner_size: Optional[int] = option(None, "Hook width (default: the paper's, see `hookmoe info`)", min=1)
    seed: int = option(0, "random seed (data order, initialisation, tiny:<arch> weights)")
    kd_temperature: float = option(1.0, "KD temperature", min=0, min_open=True)
    kd_topk: Optional[int] = option(32, "kd: cache the teacher's top-K log-probs once instead of running the "
                                    "teacher every step", min=1, zero_means="exact teacher every step")
    kd_cache_max_gb: float = option(4.0, "above this the top-K teacher cache is skipped (teacher recomputed per "
                                    "batch)", min=0)
    hidden_layer: Optional[int] = option(None, "hidden objective: match this decoder layer's output (default: after "
                                         "the final norm)", min=0)
    grad_checkpointing: bool = option(False, "recompute activations in backward (saves memory)")
    amp: str = option("auto", "auto (bf16 autocast on CUDA) | bf16 | off", choices=AMP_MODES)
    restore_best: bool = option(True, "end with the weights of the best validation, not the last step")

    def check(self) -> None:
        try:
            self.kind = kind_name(parse_kind(self.kind))
        except UserError as e:
            raise TrainingError(str(e)) from None
        if self.budget is not None:
            parse_budget(self.budget)


@dataclass(kw_only=True)
class TrainConfig(TrainSettings):
    """Everything that defines a hook-training run (saved in the artifact and the checkpoint): the settings, and
    where the compensator sits and which routing it compensates."""

    layers: list[int]
    plan: dict
    part_layers: Optional[dict] = None  # layers per compensator part when they differ ({"router": [...], ...})
    epochs: Optional[float] = option(None, "passes over the training blocks (None when --steps is given)", min=0,
                                     min_open=True)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def check(self) -> None:
        super().check()
        if self.hidden_layer is not None and self.layers and self.hidden_layer < max(self.layers):
            raise TrainingError(f"--hidden-layer {self.hidden_layer} is below the hooked layer {max(self.layers)}: "
                                "its hidden state does not depend on the Hook")

    def validate(self) -> None:
        """Check every setting again (after a field was changed in place)."""
        self.__post_init__()


@dataclass(kw_only=True)
class TrainOptions(TrainSettings, LoadOptions):
    """``hookmoe train``: the model and data of a run, and its :class:`TrainSettings`."""

    model: str = argument(MODEL_HELP)
    plan: str = option(help=PLAN_HELP + " (the reduced routing the Hook compensates)")
    layer: str = option("auto", "MoE layer(s) to compensate: 14, 14,15, 12-14, all (every MoE layer) or auto "
                        "(chosen from a per-layer sensitivity profile)")
    calib: str = option("builtin", "calibration text: builtin, c4, math, hf:ID, a file or folder")
    out: Path = option(help="output directory (artifact, checkpoint, log, loss.png)")
    samples: int = option(128, "calibration samples (paper: 512)", min=1)
    seq_len: int = option(256, "tokens per sample (paper: 2048)", min=2)
    val_samples: int = option(16, "held-out samples for validation (0 = none)", min=0)
    val_data: Optional[str] = option(None, "held-out text source (default: --calib, heldout split)")
    resume: bool = option(False, "continue the run checkpointed in --out")
    progress: bool = option(True, "progress bars")
    as_json: Optional[Path] = option(None, "also write the final metrics here ('-' = stdout)", flags=("--json",))

    def check(self) -> None:
        super().check()
        from hookmoe.routing.plan import Plan

        Plan.parse(self.plan)  # a malformed plan fails before the model loads and the data is read

    def settings(self) -> dict:
        """The :class:`TrainSettings` part, as :func:`~hookmoe.training.train_hook` keyword arguments."""
        return self.pick(TrainSettings)


@dataclass
class TrainResult:
    hookset: HookSet
    history: list[dict]
    metrics: dict
    out_dir: Path | None = None
    config: TrainConfig | None = None


_IDENTITY_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RESUME_FREE)
