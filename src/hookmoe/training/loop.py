"""The Hook-training loop: everything frozen but the Hooks, the reduced plan applied, objectives kd / lm / hidden,
validation with early stopping, bit-exact checkpoint/resume. :func:`train_hook` is the entry; :class:`HookTraining`
holds one run's steps."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn import functional as F

from hookmoe.errors import ArtifactError
from hookmoe.hook.inject import HookSet, insert_compensators
from hookmoe.hook.artifact import _json_default
from hookmoe.errors import TrainingError
from hookmoe.training import distributed
from hookmoe.training.checkpoint import _blocks_digest, _find_checkpoint, _load_optimizer, _read_checkpoint, _rewrite_log, _save_checkpoint, _set_rng
from hookmoe.training.config import CHECKPOINT_DIR, LOG_NAME, PLOT_NAME, TrainConfig, TrainResult, TrainSettings, _IDENTITY_KEYS
from hookmoe.training.losses import hidden_loss, kd_loss, kd_loss_topk, lm_loss
from hookmoe.report import gap_closed, training_curve
from hookmoe.training.schedule import lr_at


class _Routing:
    """Keeps the student's plan applied (also through backward / checkpoint recomputation); the teacher
    context removes it and bypasses the Hooks."""

    def __init__(self, mm, plan):
        from hookmoe.routing.plan import Plan

        self.mm, self.plan = mm, Plan.parse(plan)
        self.patch = None

    def student(self) -> None:
        from hookmoe.routing.patch import apply_plan

        if self.patch is None or not self.patch._active:
            self.patch = apply_plan(self.mm, self.plan, count=False)

    def off(self) -> None:
        if self.patch is not None:
            self.patch.remove()
            self.patch = None

    @contextlib.contextmanager
    def teacher(self, hs: HookSet):
        self.off()
        try:
            with hs.disabled():
                yield
        finally:
            self.student()

    @contextlib.contextmanager
    def nohook(self, hs: HookSet):
        self.student()
        with hs.disabled():
            yield


class _Capture:
    """Captures the output of one module (a decoder layer or the final norm) on each forward."""

    def __init__(self, module: torch.nn.Module | None):
        self.value = None
        self.handle = module.register_forward_hook(self._grab) if module is not None else None

    def _grab(self, module, args, out):
        self.value = out[0] if isinstance(out, (tuple, list)) else out

    def pop(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError("hidden-state capture saw no forward pass")
        return v

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _hidden_module(mm, hidden_layer: int | None) -> torch.nn.Module:
    if hidden_layer is not None:
        if not 0 <= hidden_layer < mm.num_layers:
            raise TrainingError(f"hidden_layer {hidden_layer} is out of range: the model has layers "
                                f"0..{mm.num_layers - 1}")
        return mm.decoder_layers[hidden_layer]
    base = getattr(mm.model, "model", mm.model)
    for obj in (base, getattr(base, "language_model", None)):
        norm = getattr(obj, "norm", None) if obj is not None else None
        if isinstance(norm, torch.nn.Module):
            return norm
    return mm.decoder_layers[-1]


def _autocast(device: torch.device, amp: str):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward_logits(mm, ids: torch.Tensor, keep_logits: bool = True) -> torch.Tensor:
    kw = {} if keep_logits else {"logits_to_keep": 1}
    return mm.model(input_ids=ids, use_cache=False, **kw).logits


@torch.no_grad()
def hook_eval(mm, blocks: torch.Tensor, plan: Any, hookset: HookSet | None = None, *, batch_size: int = 4,
              hidden_layer: int | None = None, nohook: bool = False, amp: str = "auto",
              _routing: _Routing | None = None, _teacher_cache: list | None = None) -> dict:
    """Held-out losses of the student (``plan`` + hooks) against the teacher (native, no hooks).

    Returns ``kd`` (KL teacher‖student), ``lm`` (student CE), ``hidden`` (relative MSE at the hidden
    target), ``lm_native`` (teacher CE) and, with ``nohook=True``, ``kd_nohook``/``lm_nohook``/
    ``hidden_nohook`` (the student without its hooks).
    """
    hs = hookset if hookset is not None else _NullHooks()
    routing = _routing or _Routing(mm, plan)
    own_routing = _routing is None
    cap = _Capture(_hidden_module(mm, hidden_layer))
    dev = mm.device
    sums: dict[str, float] = {}
    n_tok = 0
    try:
        for bi, start in enumerate(range(0, blocks.shape[0], batch_size)):
            ids = blocks[start:start + batch_size].to(dev)
            with _autocast(dev, amp):
                if _teacher_cache is not None and bi < len(_teacher_cache):
                    t_logits, t_hidden, t_lm = (x.to(dev) if torch.is_tensor(x) else x for x in _teacher_cache[bi])
                else:
                    with routing.teacher(hs):
                        t_logits = _forward_logits(mm, ids).float()
                        t_hidden = cap.pop().float()
                    t_lm = float(lm_loss(t_logits, ids))
                    if _teacher_cache is not None:
                        _teacher_cache.append((t_logits.cpu(), t_hidden.cpu(), t_lm))
                routing.student()
                out = {}
                s_logits = _forward_logits(mm, ids)
                out["kd"] = float(kd_loss(s_logits, t_logits))
                out["lm"] = float(lm_loss(s_logits, ids))
                out["hidden"] = float(hidden_loss(cap.pop(), t_hidden))
                out["lm_native"] = t_lm
                if nohook:
                    with routing.nohook(hs):
                        s0 = _forward_logits(mm, ids)
                        out["kd_nohook"] = float(kd_loss(s0, t_logits))
                        out["lm_nohook"] = float(lm_loss(s0, ids))
                        out["hidden_nohook"] = float(hidden_loss(cap.pop(), t_hidden))
            w = ids.numel()
            n_tok += w
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v * w
    finally:
        cap.remove()
        if own_routing:
            routing.off()
    return {k: v / max(1, n_tok) for k, v in sums.items()}


class _NullHooks:
    @contextlib.contextmanager
    def disabled(self):
        yield self




def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

    if not enabled:
        return None
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=16),
                    MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[extra]}"),
                    TimeRemainingColumn(compact=True), transient=False)


def _batch_rows(n: int, batch_size: int, seed: int, start_micro: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless micro-batches of row indices (epoch e shuffled with seed + e), from micro-batch ``start_micro``."""
    from hookmoe.data.blocks import iter_batches, num_batches

    nb = num_batches(n, batch_size, drop_last=True)
    rows = torch.arange(n).unsqueeze(1)
    epoch, index = divmod(start_micro, nb)
    micro = start_micro
    while True:
        for b in iter_batches(rows, batch_size, shuffle=True, seed=seed + epoch, start=index, drop_last=True):
            yield micro, b.squeeze(1)
            micro += 1
        epoch, index = epoch + 1, 0


@torch.no_grad()
def _teacher_topk_cache(mm, blocks, routing, hs, k, temperature, batch_size, amp, progress) -> tuple:
    dev = mm.device
    n, t = blocks.shape
    logp = torch.empty(n, t, k, dtype=torch.float32)
    idx = torch.empty(n, t, k, dtype=torch.int32)
    prog = _progress(progress)
    ctx = prog if prog is not None else contextlib.nullcontext()
    with ctx:
        task = prog.add_task("teacher top-k", total=n, loss="-", tps="-", extra="") if prog else None
        for s in range(0, n, batch_size):
            ids = blocks[s:s + batch_size].to(dev)
            with routing.teacher(hs), _autocast(dev, amp):
                lg = _forward_logits(mm, ids).float()
            lp = F.log_softmax(lg / temperature, -1)
            v, i = lp.topk(min(k, lp.shape[-1]), -1)
            logp[s:s + ids.shape[0]] = v.cpu()
            idx[s:s + ids.shape[0]] = i.to(torch.int32).cpu()
            if prog:
                prog.update(task, completed=min(n, s + batch_size))
    return logp, idx


def train_hook(mm, *, layers: Any, plan: Any = "native", train_blocks: torch.Tensor,
               val_blocks: torch.Tensor | None = None, out_dir: str | Path | None = None, resume: bool = False,
               progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
               data_info: dict | None = None, **settings) -> TrainResult:
    """Insert Hooks (or another compensator ``kind``) at ``layers`` of ``mm`` and train them (base frozen) under
    routing ``plan``.

    ``settings`` are :class:`~hookmoe.training.config.TrainSettings` fields, with its defaults (the same as
    ``hookmoe train``'s): ``kind`` (``hook`` | ``router`` | ``output`` | ``hook+router`` | ...,
    :mod:`hookmoe.hook.compensators`), ``budget``, ``objective``, ``steps``, ``epochs``, ``lr``, ``batch_size``,
    ``init``, ``inner_size``, ``rank``, ``grad_accum``, ``warmup``, ``schedule``, ``max_grad_norm``, ``eval_every``,
    ``patience``, ``checkpoint_every``, ``kd_temperature``, ``kd_topk``, ``hidden_layer``, ``grad_checkpointing``,
    ``amp``, ``seed``, ... ``steps`` given: ``epochs`` is not used.
    ``layers="auto"`` picks them from a per-layer sensitivity profile; ``budget="0.5%"`` sizes the Hook width and
    the output rank to keep the added parameters within that share of the model (:mod:`hookmoe.training.budget`).
    With ``out_dir`` the run writes checkpoints, ``train_log.jsonl``, ``loss.png`` and the artifact
    (``hook.safetensors`` + ``hookmoe.json``); ``resume=True`` continues from its checkpoint.
    ``on_step(step, record)`` is called after each optimizer step.

    Inside a torch.distributed process group (``torchrun``; see :mod:`hookmoe.training.distributed`) ``batch_size``
    is per rank: each rank trains on its shard of every global batch (``batch_size`` x ranks, the value recorded in
    the config), gradients are averaged, and only rank 0 writes.
    """
    from hookmoe.routing.plan import Plan
    from hookmoe.training.budget import resolve_compensator

    unknown = set(settings) - {f.name for f in dataclasses.fields(TrainSettings)}
    if unknown:
        raise TypeError(f"train_hook got unknown options: {', '.join(sorted(unknown))}")
    s = TrainSettings(**settings)  # defaults filled in, bounds checked, before any work
    plan_obj = Plan.parse(plan)
    world = distributed.current().world
    layer_list, part_layers, sel = resolve_compensator(mm, kind=s.kind, layers=layers, budget=s.budget,
                                                       blocks=train_blocks, inner_size=s.inner_size, rank=s.rank)
    if "sensitivity" in sel:
        data_info = dict(data_info or {}, layer_selection=sel)
    fields = s.to_dict()
    fields.update(batch_size=s.batch_size * world, inner_size=sel["inner_size"], rank=sel["rank"],
                  budget=None if s.budget is None else str(s.budget), epochs=None if s.steps else s.epochs)
    cfg = TrainConfig(layers=layer_list, plan=plan_obj.to_dict(),
                      part_layers=part_layers if any(v != layer_list for v in part_layers.values()) else None,
                      **fields)
    run = HookTraining(mm, cfg, plan_obj, train_blocks, val_blocks, out_dir=out_dir, resume=resume,
                       data_info=data_info)
    return run.fit(progress=progress, on_step=on_step)


@dataclasses.dataclass
class _Progress:
    """What a run has done so far; checkpointed, so that a resumed run continues exactly where it stopped."""

    step: int = 0
    micro: int = 0  # micro-batches consumed (the data order is a function of it)
    tokens: int = 0
    train_time: float = 0.0
    elapsed0: float = 0.0  # wall time of earlier segments of a resumed run
    best_val: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    best_w: dict[str, torch.Tensor] | None = None
    baseline: dict | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    stopped_early: bool = False


class HookTraining:
    """One Hook-training run, in its real steps: set-up (:meth:`__init__`: checks, resume, Hooks inserted and the
    base frozen), :meth:`fit` (teacher cache, baseline, then :meth:`_step` / :meth:`_validate` / :meth:`_checkpoint`
    per optimizer step) and :meth:`_finish` (best weights, metrics, artifact). :func:`train_hook` is the entry."""

    def __init__(self, mm, cfg: TrainConfig, plan, train_blocks: torch.Tensor, val_blocks: torch.Tensor | None, *,
                 out_dir: str | Path | None = None, resume: bool = False, data_info: dict | None = None):
        self.mm, self.cfg, self.plan = mm, cfg, plan
        self.train_blocks, self.val_blocks, self.data_info = train_blocks, val_blocks, data_info
        self.out = Path(out_dir) if out_dir is not None else None
        self.dist = distributed.current()  # data parallel across ranks; only rank 0 writes
        if cfg.batch_size % self.dist.world:
            raise TrainingError(f"batch_size {cfg.batch_size} does not split over {self.dist.world} ranks")
        self.local_bs = cfg.batch_size // self.dist.world
        self._check_data()
        n_batches = self.n_train // cfg.batch_size
        self.total = cfg.steps if cfg.steps is not None else \
            max(1, math.ceil((cfg.epochs or 1.0) * n_batches / cfg.grad_accum))
        self.eval_every = cfg.eval_every or max(1, self.total // 10)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every
        self.data_digest = _blocks_digest(train_blocks)
        ckpt = self._read_resume_checkpoint() if resume else self._check_fresh_output(resume)
        self._setup_model()
        self.state = _Progress()
        if ckpt is not None:
            self._restore(ckpt)
        if self.out is not None and self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _rewrite_log(self.out / LOG_NAME, self.state.history)
        self.val_cache: list | None = [] if val_blocks is not None and _small(val_blocks, mm) else None
        self.kd_teacher: str | None = None
        self.teacher_cache = None

    # ---- set-up ----------------------------------------------------------------------------------
    def _check_data(self) -> None:
        blocks, bs = self.train_blocks, self.cfg.batch_size
        if not torch.is_tensor(blocks) or blocks.dim() != 2:
            raise TrainingError("train_blocks must be a [n_blocks, block_len] tensor of token ids")
        self.n_train = blocks.shape[0]
        if self.n_train < bs:
            raise TrainingError(f"{self.n_train} training blocks are fewer than one batch ({bs}); "
                                "use more samples or a smaller batch size")
        if blocks.shape[1] < 2:
            raise TrainingError("training blocks need at least 2 tokens")

    def _read_resume_checkpoint(self):
        """The checkpoint to resume from, read before touching the model; refused if the run differs."""
        out = self.out
        if out is None:
            raise TrainingError("--resume needs the --out folder of the interrupted run")
        d = _find_checkpoint(out)
        if d is None:
            raise ArtifactError(f"nothing to resume: {out} holds no checkpoint")
        ckpt = _read_checkpoint(d)
        old_cfg, new_cfg = ckpt[0].get("config", {}), self.cfg.to_dict()
        diff = [k for k in _IDENTITY_KEYS if old_cfg.get(k) != new_cfg.get(k)]
        if diff:
            k = diff[0]
            flag = {"layers": "--layer"}.get(k, "--" + k.replace("_", "-"))
            raise ArtifactError(f"cannot resume: the checkpoint in {out} was made with {flag} {old_cfg.get(k)!r}, "
                                f"this run has {flag} {new_cfg.get(k)!r}; resume with the same settings"
                                + (" (the global batch: batch size per rank x ranks)" if k == "batch_size" else ""))
        if ckpt[0].get("data_digest") != self.data_digest:
            raise ArtifactError(f"cannot resume: the checkpoint in {out} was trained on different calibration data")
        return ckpt

    def _check_fresh_output(self, resume: bool) -> None:
        if self.out is not None and _find_checkpoint(self.out) is not None:
            raise TrainingError(f"{self.out} already holds a training checkpoint; pass --resume to continue it or "
                                "choose another --out")
        return None

    def _setup_model(self) -> None:
        """Validate the plan, insert the Hooks, freeze everything else, set up routing and the optimizer."""
        from hookmoe.routing.patch import apply_plan

        mm, cfg = self.mm, self.cfg
        _hidden_module(mm, cfg.hidden_layer)  # validates hidden_layer
        if cfg.grad_checkpointing and not getattr(mm.model, "supports_gradient_checkpointing", False):
            raise TrainingError("this model does not support gradient checkpointing")
        prev_patch = getattr(mm, "_routing_patch", None)
        self.prev_plan = prev_patch.plan if prev_patch is not None and prev_patch._active else None
        try:  # validate the plan (layer range, calibration) before touching the model; replaces any plan in force
            apply_plan(mm, self.plan, count=False).remove()
        except BaseException:
            if self.prev_plan is not None:
                mm.active_plan = apply_plan(mm, self.prev_plan)
            raise
        self.hs = hs = insert_compensators(mm, cfg.kind, cfg.layers, inner_size=cfg.inner_size, rank=cfg.rank,
                                           init=cfg.init, seed=cfg.seed, dtype=torch.float32,
                                           part_layers=cfg.part_layers)
        hook_ids = {id(p) for p in hs.parameters()}
        self.frozen = [(p, p.requires_grad) for p in mm.model.parameters() if id(p) not in hook_ids]
        for p, _ in self.frozen:
            p.requires_grad_(False)
        hs.requires_grad_(True)
        self.was_training = mm.model.training
        mm.model.eval()
        self.gc_layers = []
        if cfg.grad_checkpointing:
            if hasattr(mm.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                mm.model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                mm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer in mm.decoder_layers:  # checkpointing runs only when the layer is in training mode; set
                layer.training = True       # it on the layer itself so dropout etc. inside stay in eval mode
                self.gc_layers.append(layer)
        self.routing = _Routing(mm, self.plan)
        self.opt = torch.optim.AdamW(list(hs.parameters()), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        self.cap = _Capture(_hidden_module(mm, cfg.hidden_layer)) if cfg.objective == "hidden" else None

    def _restore(self, ckpt) -> None:
        st, hook_w, opt_t = ckpt
        try:
            self.hs.load_state_dict(hook_w)
            _load_optimizer(self.opt, opt_t, st["param_groups"])
        except (ArtifactError, ValueError, KeyError, RuntimeError) as e:
            self._teardown()
            raise ArtifactError(f"checkpoint in {self.out} does not fit this run ({str(e).splitlines()[0]})") \
                from None
        _set_rng(opt_t)
        s = self.state
        s.step, s.micro, s.tokens = int(st["step"]), int(st["micro"]), int(st["tokens"])
        s.train_time, s.elapsed0 = float(st["train_time"]), float(st["elapsed"])
        s.best_val = float(st["best_val"]) if st.get("best_val") is not None else math.inf
        s.best_step, s.bad_evals = int(st.get("best_step", 0)), int(st.get("bad_evals", 0))
        s.baseline = st.get("baseline")
        s.history = list(st.get("history", []))
        s.best_w = {k[5:]: v for k, v in opt_t.items() if k.startswith("best.")} or None
        s.stopped_early = bool(st.get("stopped_early", False))

    def _teardown(self) -> None:
        _teardown(self.mm, self.routing, self.cap, self.frozen, self.gc_layers, self.was_training, self.prev_plan)

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.state.elapsed0 + (time.perf_counter() - self.t_start)

    def _state_dict(self) -> dict:
        s = self.state
        return {"step": s.step, "micro": s.micro, "tokens": s.tokens, "train_time": s.train_time,
                "elapsed": self._elapsed(), "best_val": s.best_val if s.best_val < math.inf else None,
                "best_step": s.best_step, "bad_evals": s.bad_evals, "baseline": s.baseline, "history": s.history,
                "config": self.cfg.to_dict(), "total_steps": self.total, "data_digest": self.data_digest,
                "stopped_early": s.stopped_early}

    def _log(self, rec: dict) -> None:
        self.state.history.append(rec)
        if self.out is not None and self.dist.is_main:
            with open(self.out / LOG_NAME, "a") as f:
                f.write(json.dumps(rec, default=_json_default) + "\n")

    def _checkpoint(self) -> None:
        if self.dist.is_main:
            _save_checkpoint(self.out, self.hs, self.opt, self._state_dict(), self.state.best_w)
        self.last_ckpt_step = self.state.step

    def evaluate(self, with_nohook: bool = False) -> dict:
        """Validation metrics of the Hook (and, with ``with_nohook``, of the reduced and native model)."""
        self.hs.train(False)
        shard = self.dist.enabled and self.val_blocks.shape[0] >= self.dist.world
        blocks = self.dist.eval_shard(self.val_blocks) if shard else self.val_blocks  # each rank its shard
        ev = hook_eval(self.mm, blocks, self.plan, self.hs, batch_size=self.local_bs,
                       hidden_layer=self.cfg.hidden_layer, nohook=with_nohook, amp=self.cfg.amp,
                       _routing=self.routing, _teacher_cache=self.val_cache)
        return self.dist.reduce_eval(ev, blocks.numel()) if shard else ev  # token-weighted means all-reduced

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, *, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
        self.t_start = time.perf_counter()
        self.last_ckpt_step = self.state.step
        prog = _progress(progress and self.dist.is_main)
        s = self.state
        try:
            self.dist.broadcast_params(list(self.hs.parameters()))
            self.routing.student()
            self._prepare_teacher(progress and self.dist.is_main)
            if self.val_blocks is not None and s.baseline is None:
                self._baseline()
            with prog if prog is not None else contextlib.nullcontext():
                task = None
                if prog is not None:
                    task = prog.add_task("hook", total=self.total, completed=s.step, loss="-", tps="-", extra="")
                batches = _batch_rows(self.n_train, self.cfg.batch_size, self.cfg.seed, s.micro)
                extra = ""
                while s.step < self.total and not s.stopped_early:
                    rec = self._step(batches)
                    if self.val_blocks is not None and (s.step % self.eval_every == 0 or s.step == self.total):
                        extra = self._validate()
                    if prog is not None:
                        prog.update(task, completed=s.step, loss=f"{rec['loss']:.4f}",
                                    tps=f"{rec['tokens_per_s']:,.0f}", extra=extra)
                    if self.out is not None and (s.step % self.ckpt_every == 0 or s.step == self.total
                                                 or s.stopped_early):
                        self._checkpoint()
                    if on_step is not None:
                        on_step(s.step, rec)
        except _NonFinite as e:
            self.opt.zero_grad(set_to_none=True)
            where = ""
            if self.out is not None:
                self._checkpoint()
                where = f"; the last good state (step {s.step}) is checkpointed in {self.out / CHECKPOINT_DIR}"
            self._teardown()
            raise TrainingError(f"{e}; training stopped before the optimizer step{where} — try a lower lr") from None
        except (KeyboardInterrupt, distributed.PeerFailure):  # incl. a launcher's SIGTERM / a failed peer rank
            if self.out is not None and s.step > self.last_ckpt_step:
                self._checkpoint()
            self._teardown()
            raise
        except BaseException:
            self._teardown()
            raise
        return self._finish()

    def _prepare_teacher(self, progress: bool) -> None:
        """KD: cache the teacher's top-K log-probs once when the run reads every block, else recompute."""
        cfg, s = self.cfg, self.state
        if cfg.objective != "kd":
            return
        self.kd_teacher = "recompute (exact)"
        cache_gb = self.train_blocks.numel() * (cfg.kd_topk or 0) * 8 / 2**30
        visits = (self.total - s.step) * cfg.batch_size * cfg.grad_accum  # blocks the remaining steps will read
        if cfg.kd_topk and cache_gb > cfg.kd_cache_max_gb:
            self.kd_teacher = f"recompute (top-{cfg.kd_topk} cache of {cache_gb:.1f} GiB > kd_cache_max_gb)"
        elif cfg.kd_topk and visits < self.n_train:
            # the cache runs the teacher on every block once: it only pays when the run reads them all
            self.kd_teacher = f"recompute (the run reads {visits} of {self.n_train} blocks; a cache would cost more)"
        elif cfg.kd_topk and s.step < self.total and not s.stopped_early:
            self.kd_teacher = f"top-{cfg.kd_topk} cache"
            t_cache = time.perf_counter()
            self.teacher_cache = self.dist.assemble_cache(
                self.n_train, lambda blocks: _teacher_topk_cache(self.mm, blocks, self.routing, self.hs, cfg.kd_topk,
                                                                 cfg.kd_temperature, self.local_bs, cfg.amp, progress),
                self.train_blocks)
            s.train_time += time.perf_counter() - t_cache  # the cache is part of the training cost

    def _baseline(self) -> None:
        """Validation before the first step: the reduced model without the Hook, and the native model."""
        s = self.state
        ev = self.evaluate(with_nohook=True)
        s.baseline = dict(ev)
        self._log({"step": 0, "kind": "eval", **{f"val_{k}": v for k, v in ev.items()}})
        s.best_val, s.best_step, s.best_w = ev[_val_key(self.cfg.objective)], 0, _clone(self.hs)

    def _step(self, batches: Iterator[tuple[int, torch.Tensor]]) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its log record."""
        cfg, s, hs, opt = self.cfg, self.state, self.hs, self.opt
        t0 = time.perf_counter()
        hs.train(True)
        opt.zero_grad(set_to_none=True)
        lr_now = lr_at(s.step, self.total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss_sum = 0.0
        micro_next, tokens_step = s.micro, 0  # committed only once the optimizer step is taken
        distributed.fault_injection(self.dist.rank, s.step + 1)
        bad = None
        for _ in range(cfg.grad_accum):
            m_idx, rows = next(batches)
            rows = self.dist.shard(rows)  # this rank's part of the global micro-batch
            ids = self.train_blocks.index_select(0, rows).to(self.mm.device)
            loss = _micro_loss(self.mm, ids, rows, cfg, self.routing, hs, self.cap, self.teacher_cache)
            if not torch.isfinite(loss):
                bad = f"the training loss became {float(loss.detach())} at step {s.step + 1}"
                if not self.dist.enabled:
                    raise _NonFinite(bad)
                break
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            tokens_step += ids.numel()
            micro_next = m_idx + 1
        params = list(hs.parameters())
        loss_sum, tokens_step, failed = self.dist.sync_step(params, loss_sum, tokens_step, bad is not None)
        if failed:
            raise _NonFinite(bad or f"the training loss became non-finite on another rank at step {s.step + 1}")
        tokens_next = s.tokens + tokens_step
        if cfg.max_grad_norm:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            gnorm = float(torch.norm(torch.stack([p.grad.norm().float().cpu() for p in params if p.grad is not None])))
        if not math.isfinite(gnorm):
            raise _NonFinite(f"the gradient norm became {gnorm} at step {s.step + 1}")
        opt.step()
        s.step, s.micro, s.tokens = s.step + 1, micro_next, tokens_next
        dt = time.perf_counter() - t0
        s.train_time += dt
        rec = {"step": s.step, "kind": "train", "loss": loss_sum, "lr": lr_now, "grad_norm": gnorm,
               "tokens": s.tokens, "tokens_per_s": s.tokens / max(s.train_time, 1e-9), "step_s": dt,
               "elapsed_s": self._elapsed()}
        self._log(rec)
        return rec

    def _validate(self) -> str:
        """Validate, keep the best weights, count evaluations without improvement (early stopping)."""
        s = self.state
        ev = self.evaluate()
        vkey = _val_key(self.cfg.objective)
        self._log({"step": s.step, "kind": "eval", **{f"val_{k}": v for k, v in ev.items()},
                   "elapsed_s": self._elapsed()})
        if ev[vkey] < s.best_val - 1e-12:
            s.best_val, s.best_step, s.bad_evals, s.best_w = ev[vkey], s.step, 0, _clone(self.hs)
        else:
            s.bad_evals += 1
            if self.cfg.patience is not None and s.bad_evals >= self.cfg.patience:
                s.stopped_early = True
        return f"val {vkey} {ev[vkey]:.4f}"

    # ---- finish ----------------------------------------------------------------------------------
    def _final_eval(self) -> dict | None:
        """The validation metrics of the weights the run ends with (the best ones, restored, by default)."""
        s = self.state
        if self.val_blocks is None:
            return None
        evals = [h for h in s.history if h.get("kind") == "eval"]
        last_eval_step = evals[-1]["step"] if evals else -1
        if self.cfg.restore_best and s.best_w is not None and s.best_step != s.step:
            self.hs.load_state_dict(s.best_w)
            return next(h for h in evals if h["step"] == s.best_step)
        if last_eval_step == s.step:
            return evals[-1]
        return {f"val_{k}": v for k, v in self.evaluate().items()}

    def _metrics(self, final_eval: dict | None) -> dict[str, Any]:
        s = self.state
        metrics: dict[str, Any] = {
            "steps": s.step, "total_steps": self.total, "tokens": s.tokens, "train_time_s": s.train_time,
            "wall_time_s": self._elapsed(), "tokens_per_s": s.tokens / max(s.train_time, 1e-9),
            "stopped_early": s.stopped_early, "kd_teacher": self.kd_teacher,
            "best_step": s.best_step if self.val_blocks is not None else None, "hook_params": self.hs.num_params(),
            "final_train_loss": next((h["loss"] for h in reversed(s.history) if h.get("kind") == "train"), None)}
        if final_eval is not None and s.baseline is not None:
            base = s.baseline
            for k in ("kd", "lm", "hidden", "lm_native"):
                metrics[f"val_{k}"] = final_eval.get(f"val_{k}")
            for k in ("kd", "lm", "hidden"):
                metrics[f"val_{k}_nohook"] = base.get(f"{k}_nohook")
            metrics["kd_gap_closed"] = gap_closed(base["kd_nohook"], final_eval["val_kd"], 0.0)
            metrics["lm_gap_closed"] = gap_closed(base["lm_nohook"], final_eval["val_lm"], base["lm_native"])
        return metrics

    def _finish(self) -> TrainResult:
        cfg, hs, out = self.cfg, self.hs, self.out
        metrics = self._metrics(self._final_eval())
        if self.dist.enabled:
            metrics["ranks"] = self.dist.world
        if out is not None and self.dist.is_main:
            vb = self.val_blocks
            info = dict(cfg.to_dict(), total_steps=self.total, data=self.data_info or {},
                        data_digest=self.data_digest, train_blocks=list(self.train_blocks.shape),
                        val_blocks=list(vb.shape) if vb is not None else None)
            hs.save_pretrained(out, plan=self.plan.to_dict(), training=info, metrics=metrics)
            try:
                training_curve(self.state.history, out / PLOT_NAME,
                             title=f"hook {cfg.objective} · layers {cfg.layers} · {self.plan.describe()}")
            except Exception as e:  # a plot must never fail a finished training run
                metrics["plot_error"] = str(e)
        else:
            hs.manifest = {"plan": self.plan.to_dict(), "training": cfg.to_dict(), "metrics": metrics}
        self._teardown()
        hs.requires_grad_(False)
        return TrainResult(hs, self.state.history, metrics, out, cfg)


class _NonFinite(Exception):
    pass


def _val_key(objective: str) -> str:
    return {"lm": "lm", "kd": "kd", "hidden": "hidden"}[objective]


def _small(blocks: torch.Tensor, mm, budget_mb: float = 512.0) -> bool:
    """Whether the teacher's logits + hidden states for ``blocks`` fit the cache budget."""
    v = int(getattr(mm.config, "vocab_size", 0) or 0) + int(mm.config.hidden_size)
    return blocks.numel() * v * 4 / 2**20 <= budget_mb


def _clone(hs: HookSet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hs.state_dict().items()}


def _micro_loss(mm, ids, rows, cfg: TrainConfig, routing: _Routing, hs: HookSet, cap: _Capture | None,
                teacher_cache) -> torch.Tensor:
    dev = ids.device
    if cfg.objective == "lm":
        with _autocast(dev, cfg.amp):
            return lm_loss(_forward_logits(mm, ids), ids)
    if cfg.objective == "kd":
        if teacher_cache is not None:
            t_logp = teacher_cache[0].index_select(0, rows).to(dev)
            t_idx = teacher_cache[1].index_select(0, rows).to(dev)
            with _autocast(dev, cfg.amp):
                return kd_loss_topk(_forward_logits(mm, ids), t_logp, t_idx, cfg.kd_temperature)
        with torch.no_grad(), routing.teacher(hs), _autocast(dev, cfg.amp):
            t_logits = _forward_logits(mm, ids)
        with _autocast(dev, cfg.amp):
            return kd_loss(_forward_logits(mm, ids), t_logits, cfg.kd_temperature)
    # hidden: only the last position's logits are needed (none, in fact)
    with torch.no_grad(), routing.teacher(hs), _autocast(dev, cfg.amp):
        _forward_logits(mm, ids, keep_logits=False)
        target = cap.pop().detach()
    with _autocast(dev, cfg.amp):
        _forward_logits(mm, ids, keep_logits=False)
        return hidden_loss(cap.pop(), target)


def _teardown(mm, routing: _Routing, cap: _Capture | None, frozen, gc_layers, was_training, prev_plan) -> None:
    routing.off()
    if cap is not None:
        cap.remove()
    for p, rg in frozen:
        p.requires_grad_(rg)
    if gc_layers:
        if hasattr(mm.model, "activation_checkpointing_disable"):
            mm.model.activation_checkpointing_disable()
        else:
            mm.model.gradient_checkpointing_disable()
        for layer in gc_layers:
            layer.training = False
    mm.model.train(was_training)
    if prev_plan is not None:
        from hookmoe.routing.patch import apply_plan

        mm.active_plan = apply_plan(mm, prev_plan)


