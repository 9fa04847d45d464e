"""TODO docstring"""

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
from hookmoe.hook.inject import HookSet, insert_hooks, parse_layers
from hookmoe.hook.artifact import _json_default
from hookmoe.errors import TrainingError
from hookmoe.training.checkpoint import _blocks_digest, _find_checkpoint, _load_optimizer, _read_checkpoint, _rewrite_log, _save_checkpoint, _set_rng
from hookmoe.training.config import CHECKPOINT_DIR, DEFAULT_OBJECTIVE, LOG_NAME, PLOT_NAME, TrainConfig, TrainResult, _IDENTITY_KEYS
from hookmoe.training.losses import hidden_loss, kd_loss, kd_loss_topk, lm_loss
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


def gap_closed(nohook: float, hooked: float, native: float) -> float:
    """Fraction of the loss gap between the reduced model and the native model that the Hook closes."""
    gap = nohook - native
    return float("nan") if abs(gap) < 1e-12 else (nohook - hooked) / gap


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
               val_blocks: torch.Tensor | None = None, objective: str = DEFAULT_OBJECTIVE, steps: int | None = None,
               epochs: float | None = None, lr: float = 1e-4, batch_size: int = 4, out_dir: str | Path | None = None,
               resume: bool = False, progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
               data_info: dict | None = None, **options) -> TrainResult:
    """Insert Hooks at ``layers`` of ``mm`` and train them (base frozen) under routing ``plan``.

    ``options`` are further :class:`TrainConfig` fields (``init``, ``inner_size``, ``grad_accum``,
    ``warmup``, ``schedule``, ``max_grad_norm``, ``eval_every``, ``patience``, ``checkpoint_every``,
    ``kd_temperature``, ``kd_topk``, ``hidden_layer``, ``grad_checkpointing``, ``amp``, ``seed``, ...).
    With ``out_dir`` the run writes checkpoints, ``train_log.jsonl``, ``loss.png`` and the artifact
    (``hook.safetensors`` + ``hookmoe.json``); ``resume=True`` continues from its checkpoint.
    ``on_step(step, record)`` is called after each optimizer step.
    """
    from hookmoe.routing.plan import Plan
    from hookmoe.routing.patch import apply_plan

    layer_list = parse_layers(layers, mm)
    plan_obj = Plan.parse(plan)
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train_hook got unknown options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(layers=layer_list, plan=plan_obj.to_dict(), objective=objective, steps=steps, epochs=epochs,
                      lr=lr, batch_size=batch_size, **options)
    cfg.validate()
    if not torch.is_tensor(train_blocks) or train_blocks.dim() != 2:
        raise TrainingError("train_blocks must be a [n_blocks, block_len] tensor of token ids")
    n_train = train_blocks.shape[0]
    if n_train < cfg.batch_size:
        raise TrainingError(f"{n_train} training blocks are fewer than one batch ({cfg.batch_size}); "
                            "use more samples or a smaller batch size")
    if train_blocks.shape[1] < 2:
        raise TrainingError("training blocks need at least 2 tokens")
    nb = n_train // cfg.batch_size
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil((cfg.epochs or 1.0) * nb / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, total // 10)
    ckpt_every = cfg.checkpoint_every or eval_every
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise TrainingError("--resume needs the --out folder of the interrupted run")
    data_digest = _blocks_digest(train_blocks)

    # ---- resume: read the checkpoint before touching the model -------------------------------
    ckpt = None
    if resume:
        d = _find_checkpoint(out)
        if d is None:
            raise ArtifactError(f"nothing to resume: {out} holds no checkpoint")
        ckpt = _read_checkpoint(d)
        old_cfg = ckpt[0].get("config", {})
        new_cfg = cfg.to_dict()
        diff = [k for k in _IDENTITY_KEYS if old_cfg.get(k) != new_cfg.get(k)]
        if diff:
            k = diff[0]
            flag = {"layers": "--layer"}.get(k, "--" + k.replace("_", "-"))
            raise ArtifactError(f"cannot resume: the checkpoint in {out} was made with {flag} {old_cfg.get(k)!r}, "
                                f"this run has {flag} {new_cfg.get(k)!r}; resume with the same settings")
        if ckpt[0].get("data_digest") != data_digest:
            raise ArtifactError(f"cannot resume: the checkpoint in {out} was trained on different calibration data")
    elif out is not None and _find_checkpoint(out) is not None:
        raise TrainingError(f"{out} already holds a training checkpoint; pass --resume to continue it or choose "
                            "another --out")

    # ---- model setup ----------------------------------------------------------------------------
    _hidden_module(mm, cfg.hidden_layer)  # validates hidden_layer
    if cfg.grad_checkpointing and not getattr(mm.model, "supports_gradient_checkpointing", False):
        raise TrainingError("this model does not support gradient checkpointing")
    prev_patch = getattr(mm, "_routing_patch", None)
    prev_plan = prev_patch.plan if prev_patch is not None and prev_patch._active else None
    try:  # validate the plan (layer range, calibration) before touching the model; replaces any plan in force
        apply_plan(mm, plan_obj, count=False).remove()
    except BaseException:
        if prev_plan is not None:
            mm.active_plan = apply_plan(mm, prev_plan)
        raise
    hs = insert_hooks(mm, layer_list, cfg.inner_size, cfg.init, seed=cfg.seed, dtype=torch.float32)
    hook_ids = {id(p) for p in hs.parameters()}
    frozen = [(p, p.requires_grad) for p in mm.model.parameters() if id(p) not in hook_ids]
    for p, _ in frozen:
        p.requires_grad_(False)
    hs.requires_grad_(True)
    was_training = mm.model.training
    mm.model.eval()
    gc_layers = []
    if cfg.grad_checkpointing:
        if hasattr(mm.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            mm.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            mm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in mm.decoder_layers:  # checkpointing runs only when the layer is in training mode; set
            layer.training = True       # it on the layer itself so dropout etc. inside stay in eval mode
            gc_layers.append(layer)
    routing = _Routing(mm, plan_obj)
    opt = torch.optim.AdamW(list(hs.parameters()), lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)
    dev = mm.device
    cap = _Capture(_hidden_module(mm, cfg.hidden_layer)) if cfg.objective == "hidden" else None

    history: list[dict] = []
    step = 0
    micro = 0
    tokens = 0
    train_time = 0.0
    elapsed0 = 0.0
    best_val = math.inf
    best_step = 0
    bad_evals = 0
    best_w: dict[str, torch.Tensor] | None = None
    baseline: dict | None = None
    stopped_early = False
    if ckpt is not None:
        st, hook_w, opt_t = ckpt
        try:
            hs.load_state_dict(hook_w)
            _load_optimizer(opt, opt_t, st["param_groups"])
        except (ArtifactError, ValueError, KeyError, RuntimeError) as e:
            _teardown(mm, routing, cap, frozen, gc_layers, was_training, prev_plan)
            raise ArtifactError(f"checkpoint in {out} does not fit this run ({str(e).splitlines()[0]})") from None
        _set_rng(opt_t)
        step, micro, tokens = int(st["step"]), int(st["micro"]), int(st["tokens"])
        train_time, elapsed0 = float(st["train_time"]), float(st["elapsed"])
        best_val = float(st["best_val"]) if st.get("best_val") is not None else math.inf
        best_step, bad_evals = int(st.get("best_step", 0)), int(st.get("bad_evals", 0))
        baseline = st.get("baseline")
        history = list(st.get("history", []))
        bw = {k[5:]: v for k, v in opt_t.items() if k.startswith("best.")}
        best_w = bw or None
        stopped_early = bool(st.get("stopped_early", False))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _rewrite_log(out / LOG_NAME, history)

    def state_dict() -> dict:
        return {"step": step, "micro": micro, "tokens": tokens, "train_time": train_time,
                "elapsed": elapsed0 + (time.perf_counter() - t_start), "best_val": best_val if best_val < math.inf
                else None, "best_step": best_step, "bad_evals": bad_evals, "baseline": baseline, "history": history,
                "config": cfg.to_dict(), "total_steps": total, "data_digest": data_digest,
                "stopped_early": stopped_early}

    def log(rec: dict) -> None:
        history.append(rec)
        if out is not None:
            with open(out / LOG_NAME, "a") as f:
                f.write(json.dumps(rec, default=_json_default) + "\n")

    val_cache: list | None = [] if val_blocks is not None and _small(val_blocks, mm) else None

    def evaluate(with_nohook: bool = False) -> dict:
        hs.train(False)
        return hook_eval(mm, val_blocks, plan_obj, hs, batch_size=cfg.batch_size, hidden_layer=cfg.hidden_layer,
                         nohook=with_nohook, amp=cfg.amp, _routing=routing, _teacher_cache=val_cache)

    t_start = time.perf_counter()
    extra = ""
    teacher_cache = None
    last_ckpt_step = step
    prog = _progress(progress)
    try:
        routing.student()
        kd_teacher = "recompute (exact)" if cfg.objective == "kd" else None
        cache_gb = train_blocks.numel() * (cfg.kd_topk or 0) * 8 / 2**30
        visits = (total - step) * cfg.batch_size * cfg.grad_accum  # blocks the remaining steps will read
        if cfg.objective == "kd" and cfg.kd_topk and cache_gb > cfg.kd_cache_max_gb:
            kd_teacher = f"recompute (top-{cfg.kd_topk} cache of {cache_gb:.1f} GiB > kd_cache_max_gb)"
        elif cfg.objective == "kd" and cfg.kd_topk and visits < n_train:
            # the cache runs the teacher on every block once: it only pays when the run reads them all
            kd_teacher = f"recompute (the run reads {visits} of {n_train} blocks; a cache would cost more)"
        elif cfg.objective == "kd" and cfg.kd_topk and step < total and not stopped_early:
            kd_teacher = f"top-{cfg.kd_topk} cache"
            t_cache = time.perf_counter()
            teacher_cache = _teacher_topk_cache(mm, train_blocks, routing, hs, cfg.kd_topk, cfg.kd_temperature,
                                                cfg.batch_size, cfg.amp, progress)
            train_time += time.perf_counter() - t_cache  # the cache is part of the training cost
        if val_blocks is not None and baseline is None:
            ev = evaluate(with_nohook=True)
            baseline = {k: v for k, v in ev.items()}
            rec = {"step": 0, "kind": "eval", **{f"val_{k}": v for k, v in ev.items()}}
            log(rec)
            obj0 = ev[_val_key(cfg.objective)]
            best_val, best_step, best_w = obj0, 0, _clone(hs)
        ctx = prog if prog is not None else contextlib.nullcontext()
        with ctx:
            task = None
            if prog is not None:
                task = prog.add_task("hook", total=total, completed=step, loss="-", tps="-", extra="")
            batches = _batch_rows(n_train, cfg.batch_size, cfg.seed, micro)
            while step < total and not stopped_early:
                t0 = time.perf_counter()
                hs.train(True)
                opt.zero_grad(set_to_none=True)
                lr_now = lr_at(step, total, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr_now
                loss_sum = 0.0
                micro_next, tokens_next = micro, tokens  # committed only once the optimizer step is taken
                for _ in range(cfg.grad_accum):
                    m_idx, rows = next(batches)
                    ids = train_blocks.index_select(0, rows).to(dev)
                    loss = _micro_loss(mm, ids, rows, cfg, routing, hs, cap, teacher_cache)
                    if not torch.isfinite(loss):
                        raise _NonFinite(f"the training loss became {float(loss.detach())} at step {step + 1}")
                    (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach()) / cfg.grad_accum
                    tokens_next += ids.numel()
                    micro_next = m_idx + 1
                params = list(hs.parameters())
                if cfg.max_grad_norm:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                else:
                    gnorm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
                if not math.isfinite(gnorm):
                    raise _NonFinite(f"the gradient norm became {gnorm} at step {step + 1}")
                opt.step()
                step, micro, tokens = step + 1, micro_next, tokens_next
                dt = time.perf_counter() - t0
                train_time += dt
                tps = tokens / max(train_time, 1e-9)
                rec = {"step": step, "kind": "train", "loss": loss_sum, "lr": lr_now, "grad_norm": gnorm,
                       "tokens": tokens, "tokens_per_s": tps, "step_s": dt,
                       "elapsed_s": elapsed0 + time.perf_counter() - t_start}
                log(rec)
                if val_blocks is not None and (step % eval_every == 0 or step == total):
                    ev = evaluate()
                    vkey = _val_key(cfg.objective)
                    erec = {"step": step, "kind": "eval", **{f"val_{k}": v for k, v in ev.items()},
                            "elapsed_s": elapsed0 + time.perf_counter() - t_start}
                    log(erec)
                    if ev[vkey] < best_val - 1e-12:
                        best_val, best_step, bad_evals, best_w = ev[vkey], step, 0, _clone(hs)
                    else:
                        bad_evals += 1
                        if cfg.patience is not None and bad_evals >= cfg.patience:
                            stopped_early = True
                    extra = f"val {vkey} {ev[vkey]:.4f}"
                if prog is not None:
                    prog.update(task, completed=step, loss=f"{loss_sum:.4f}", tps=f"{tps:,.0f}", extra=extra)
                if out is not None and (step % ckpt_every == 0 or step == total or stopped_early):
                    _save_checkpoint(out, hs, opt, state_dict(), best_w)
                    last_ckpt_step = step
                if on_step is not None:
                    on_step(step, rec)
    except _NonFinite as e:
        opt.zero_grad(set_to_none=True)
        where = ""
        if out is not None:
            _save_checkpoint(out, hs, opt, state_dict(), best_w)
            where = f"; the last good state (step {step}) is checkpointed in {out / CHECKPOINT_DIR}"
        _teardown(mm, routing, cap, frozen, gc_layers, was_training, prev_plan)
        raise TrainingError(f"{e}; training stopped before the optimizer step{where} — try a lower lr") from None
    except KeyboardInterrupt:
        if out is not None and step > last_ckpt_step:
            _save_checkpoint(out, hs, opt, state_dict(), best_w)
        _teardown(mm, routing, cap, frozen, gc_layers, was_training, prev_plan)
        raise
    except BaseException:
        _teardown(mm, routing, cap, frozen, gc_layers, was_training, prev_plan)
        raise

    # ---- finish ---------------------------------------------------------------------------------
    final_eval = None
    if val_blocks is not None:
        evals = [h for h in history if h.get("kind") == "eval"]
        last_eval_step = evals[-1]["step"] if evals else -1
        if cfg.restore_best and best_w is not None and best_step != step:
            hs.load_state_dict(best_w)
            final_eval = next(h for h in evals if h["step"] == best_step)
        elif last_eval_step == step:
            final_eval = evals[-1]
        else:
            ev = evaluate()
            final_eval = {f"val_{k}": v for k, v in ev.items()}
    wall = elapsed0 + time.perf_counter() - t_start
    metrics: dict[str, Any] = {"steps": step, "total_steps": total, "tokens": tokens, "train_time_s": train_time,
                               "wall_time_s": wall, "tokens_per_s": tokens / max(train_time, 1e-9),
                               "stopped_early": stopped_early, "kd_teacher": kd_teacher,
                               "best_step": best_step if val_blocks is not None
                               else None, "hook_params": hs.num_params(),
                               "final_train_loss": next((h["loss"] for h in reversed(history)
                                                         if h.get("kind") == "train"), None)}
    if final_eval is not None and baseline is not None:
        for k in ("kd", "lm", "hidden", "lm_native"):
            metrics[f"val_{k}"] = final_eval.get(f"val_{k}")
        for k in ("kd", "lm", "hidden"):
            metrics[f"val_{k}_nohook"] = baseline.get(f"{k}_nohook")
        metrics["kd_gap_closed"] = gap_closed(baseline["kd_nohook"], final_eval["val_kd"], 0.0)
        metrics["lm_gap_closed"] = gap_closed(baseline["lm_nohook"], final_eval["val_lm"], baseline["lm_native"])
    if out is not None:
        info = dict(cfg.to_dict(), total_steps=total, data=data_info or {}, data_digest=data_digest,
                    train_blocks=list(train_blocks.shape),
                    val_blocks=list(val_blocks.shape) if val_blocks is not None else None)
        hs.save_pretrained(out, plan=plan_obj.to_dict(), training=info, metrics=metrics)
        try:
            plot_history(history, out / PLOT_NAME, title=f"hook {cfg.objective} · layers {layer_list} · "
                         f"{plan_obj.describe()}")
        except Exception as e:  # a plot must never fail a finished training run
            metrics["plot_error"] = str(e)
    else:
        hs.manifest = {"plan": plan_obj.to_dict(), "training": cfg.to_dict(), "metrics": metrics}
    _teardown(mm, routing, cap, frozen, gc_layers, was_training, prev_plan)
    hs.requires_grad_(False)
    return TrainResult(hs, history, metrics, out, cfg)


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


def plot_history(history: list[dict], path: str | Path, title: str = "hook training") -> Path:
    """Loss curve: training loss per step (raw and smoothed) and held-out KD/LM losses per evaluation."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train = [h for h in history if h.get("kind") == "train"]
    evals = [h for h in history if h.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        xs = [h["step"] for h in train]
        ys = [h["loss"] for h in train]
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="train loss")
        ema, sm = None, []
        for y in ys:
            ema = y if ema is None else 0.9 * ema + 0.1 * y
            sm.append(ema)
        ax.plot(xs, sm, color="tab:blue", lw=2, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("training objective")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if evals:
        ax2 = axes[0][1]
        base = evals[0]
        xs = [h["step"] for h in evals]
        for key, ref, color in (("kd", 0.0, "tab:red"), ("lm", base.get("val_lm_native"), "tab:green"),
                                ("hidden", 0.0, "tab:purple")):
            nh = base.get(f"val_{key}_nohook")
            if nh is None or ref is None or not all(f"val_{key}" in h for h in evals):
                continue
            ys = [100 * gap_closed(nh, h[f"val_{key}"], ref) for h in evals]
            ax2.plot(xs, ys, marker="o", color=color, label=f"{key} (no hook {nh:.4g})")
        ax2.axhline(0, color="k", lw=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("held-out gap closed (%)")
        ax2.set_title("(no hook − hook) / (no hook − native)", fontsize=9)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
