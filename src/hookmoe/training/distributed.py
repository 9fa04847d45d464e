"""Hook training across processes: data parallelism with torch.distributed.

``torchrun --nproc_per_node N hookmoe train ...`` or ``accelerate launch --multi_gpu --num_processes N -m hookmoe.cli
train ...`` start N ranks (``accelerate launch --cpu --num_processes 2`` starts one plain process: use torchrun on
CPU) (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the environment);
:func:`init_from_env` joins them into one process group (``nccl`` when CUDA is available, else ``gloo``;
``HOOKMOE_DIST_BACKEND`` overrides). Only the Hooks train, so the scheme is plain data parallelism:

* **Data.** Every rank draws the same shuffled order of the calibration blocks; an optimizer step's global
  micro-batch of ``N x b`` rows is split so that rank r takes rows ``[r*b, (r+1)*b)``. N ranks with batch b therefore
  read exactly the rows one process with batch ``N*b`` reads, and the checkpoint's data position (global
  micro-batches) means the same for any N: ``--resume`` works with another number of ranks as long as the global
  batch (``batch_size`` in the recorded config = per-rank batch x ranks) is the same.
* **Gradients.** After backward, the Hook gradients (with the loss, the token count and a failure flag) are summed
  in one all-reduce and divided by N: every rank takes the same optimizer step. Losses that are means over tokens
  (``kd``, ``lm``) give the gradient of the global batch exactly (up to float rounding); ``hidden`` normalises by
  each shard's teacher norm. The KD teacher cache is computed shard by shard and assembled on every rank.
* **Validation** is sharded the same way and its token-weighted sums all-reduced, so that every rank takes the
  same early-stopping / best-weights decisions.
* **Output.** Rank 0 alone writes checkpoints, the artifact, the log and the plot, and shows progress.
* **Failure.** A non-finite loss on any rank stops every rank at the same step (the failure flag). A rank that
  raises or dies makes the others' collective fail (or torchrun stop them with SIGTERM, which is turned into an
  interrupt): rank 0 checkpoints the last completed step and the launch exits non-zero; continue with ``--resume``.

With ``--device-map`` each rank places the model over its own share of the node's GPUs (``LOCAL_RANK``-th group of
``gpus / local ranks``); GPU numbers in ``--max-memory`` / a device-map file count within that share.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import signal
from dataclasses import dataclass
from typing import Callable

import torch
from torch import distributed as dist

from hookmoe.errors import TrainingError


class PeerFailure(TrainingError):
    """A collective failed: another rank raised, died or was stopped."""


class RankStopped(KeyboardInterrupt):
    """This rank was told to stop (SIGTERM from the launcher after another rank failed)."""


@dataclass
class DistContext:
    """The process group as Hook training sees it (``world == 1``: a plain single process)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- placement -------------------------------------------------------------------------------
    def gpus(self) -> list[int]:
        """This rank's share of the node's GPUs."""
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return []
        per = max(1, n // max(1, self.local_world))
        first = (self.local_rank * per) % n
        return list(range(first, min(n, first + per)))

    def device(self, device: str) -> str:
        """The ``--device`` of this rank: ``auto`` on a multi-GPU node → its own GPU."""
        if self.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.gpus()[0]}"
        return device

    def localize_placement(self, kw: dict) -> dict:
        """Map GPU numbers of ``max_memory`` / a device-map dict into this rank's share (identity on one rank);
        with ``device_map`` and no ``max_memory`` on a multi-rank GPU node, limit the map to this rank's GPUs."""
        if not self.enabled or not kw:
            return kw
        from accelerate.utils import get_max_memory

        from hookmoe.models.placement import parse_device_map, parse_max_memory

        own = self.gpus()
        kw = dict(kw)
        mem = parse_max_memory(kw.get("max_memory"))
        dm = parse_device_map(kw.get("device_map"))

        def shift(d):
            if isinstance(d, int):
                if own and d >= len(own):
                    raise TrainingError(f"GPU {d} in --max-memory/--device-map is outside this rank's share of "
                                        f"{len(own)} GPU(s) (GPUs are numbered within each rank's share)")
                return own[d] if own else d
            return d

        if mem:
            kw["max_memory"] = {shift(k): v for k, v in mem.items()}
        elif own and (dm is not None):
            full = get_max_memory()
            kw["max_memory"] = {g: full[g] for g in own if g in full}
            if "cpu" in full:
                kw["max_memory"]["cpu"] = full["cpu"] // max(1, self.local_world)
        if isinstance(dm, dict):
            kw["device_map"] = {k: shift(v) for k, v in dm.items()}
        if kw.get("offload_folder") is not None and self.world > 1:
            kw["offload_folder"] = os.path.join(str(kw["offload_folder"]), f"rank{self.rank}")
        return kw

    # ---- data ------------------------------------------------------------------------------------
    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global micro-batch of row indices."""
        if not self.enabled:
            return rows
        b = rows.shape[0] // self.world
        return rows[self.rank * b:(self.rank + 1) * b]

    # ---- collectives -----------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except RankStopped:
            raise
        except Exception as e:  # DistBackendError / RuntimeError: a peer failed or vanished
            _ignore_sigterm()  # we are stopping anyway: let this rank checkpoint and report before it exits
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = re.sub(r"\[[^\]]*\]\s*", "", msg).strip() or type(e).__name__  # gloo's [file:line] prefixes
            raise PeerFailure(f"rank {self.rank}: another rank failed or was stopped during {what} ({msg[:160]}); "
                                "the last checkpoint is kept: rerun with --resume") from None
        return t

    def sync_step(self, params: list[torch.Tensor], loss: float, tokens: int, failed: bool) -> tuple[float, int, bool]:
        """Average the Hook gradients across ranks (one all-reduce, with the loss, tokens and a failure flag);
        returns (mean loss, total tokens, whether any rank failed)."""
        if not self.enabled:
            return loss, tokens, failed
        dev = self.comm_device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).to(dev, torch.float32) for g in grads]
                         + [torch.tensor([0.0 if failed else loss, float(tokens), float(failed)], device=dev,
                                         dtype=torch.float32)])
        if failed:
            flat[:-3].zero_()
        self._all_reduce(flat, "the gradient all-reduce")
        n_failed = int(round(float(flat[-1])))
        if n_failed:
            return float("nan"), tokens, True
        flat = flat / self.world
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(g).to(g.device, g.dtype).clone()
            off += n
        return float(flat[-3]), int(round(float(flat[-2]) * self.world)), False

    def broadcast_params(self, params: list[torch.Tensor]) -> None:
        """Start every rank from rank 0's Hook weights."""
        if not self.enabled:
            return
        dev = self.comm_device
        with torch.no_grad():
            for p in params:
                t = p.detach().to(dev).clone()
                try:
                    dist.broadcast(t, src=0)
                except Exception as e:
                    raise TrainingError(f"rank {self.rank}: cannot reach the other ranks ({str(e)[:160]})") from None
                p.copy_(t.to(p.device, p.dtype))

    def reduce_eval(self, metrics: dict, n_tok: int) -> dict:
        """Token-weighted mean of per-shard validation metrics over all ranks."""
        if not self.enabled:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] * n_tok for k in keys] + [float(n_tok)], dtype=torch.float64,
                         device=self.comm_device)
        self._all_reduce(t, "validation")
        total = max(1.0, float(t[-1]))
        return {k: float(t[i]) / total for i, k in enumerate(keys)}

    def eval_shard(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks if not self.enabled else blocks[self.rank::self.world]

    def assemble_cache(self, n: int, compute: Callable[[torch.Tensor], tuple], blocks: torch.Tensor) -> tuple:
        """A per-row cache (teacher top-K) computed on rows ``rank::world`` and assembled on every rank."""
        if not self.enabled:
            return compute(blocks)
        mine = torch.arange(self.rank, n, self.world)
        parts = compute(blocks.index_select(0, mine))
        out = []
        for part in parts:
            full = torch.zeros((n,) + tuple(part.shape[1:]), dtype=part.dtype)
            full[mine] = part
            chunk = max(1, (64 << 20) // max(1, full[0].numel() * full.element_size()))  # ~64 MB per all-reduce
            for s in range(0, n, chunk):
                t = full[s:s + chunk].to(self.comm_device)
                self._all_reduce(t, "the teacher cache")
                full[s:s + chunk] = t.cpu()
            out.append(full)
        return tuple(out)

    def barrier(self) -> None:
        if self.enabled:
            try:
                dist.barrier()
            except Exception:
                pass


_CTX: DistContext | None = None


def current() -> DistContext:
    """The process group this process belongs to (a single-process context when none is initialised)."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        if _CTX is None or _CTX.world != dist.get_world_size():
            _CTX = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)),
                               int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), dist.get_backend())
        return _CTX
    return DistContext()


def launched() -> bool:
    """Whether this process was started by torchrun / accelerate launch with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(timeout_min: float | None = None) -> DistContext:
    """Join the process group described by torchrun's / accelerate's environment (no-op for one process)."""
    if not launched():
        return current()
    if not dist.is_initialized():
        backend = os.environ.get("HOOKMOE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            per = max(1, torch.cuda.device_count() // max(1, local_world))
            torch.cuda.set_device((local_rank * per) % torch.cuda.device_count())
        minutes = timeout_min if timeout_min is not None else float(os.environ.get("HOOKMOE_DIST_TIMEOUT_MIN", 30))
        try:
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=minutes))
        except Exception as e:
            raise TrainingError(f"cannot join the torch.distributed process group ({backend}): "
                                f"{str(e).strip().splitlines()[0][:200]}") from None
        _install_sigterm()
        import atexit

        atexit.register(shutdown)
    return current()


def _install_sigterm() -> None:
    """The launcher stops the surviving ranks with SIGTERM when one fails: turn it into an interrupt so that the
    training loop checkpoints its last completed step before exiting."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills
        raise RankStopped(f"rank stopped by the launcher (signal {signum}): another rank failed")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def _ignore_sigterm() -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        pass


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def fault_injection(rank: int, step: int) -> None:
    """Testing aid: ``HOOKMOE_TEST_KILL=RANK:STEP`` kills rank RANK (SIGKILL) when it starts step STEP."""
    spec = os.environ.get("HOOKMOE_TEST_KILL")
    if not spec:
        return
    r, s = (int(x) for x in spec.split(":"))
    if r == rank and s == step:
        os.kill(os.getpid(), signal.SIGKILL)
