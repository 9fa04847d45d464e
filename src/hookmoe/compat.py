"""Everything that depends on the installed transformers version lives here, and only here.

Facts checked against transformers 5.17 and 5.23 (see DESIGN.md §2):

* Routers return a 3-tuple of (router logits, top-k weights, top-k indices) — except Granite-MoE on 5.17,
  which returns (indices, weights, logits). Instead of a version table we recognise the parts by dtype and
  shape (indices are integer, logits have one column per expert) and give the tuple back in the order we
  received it, so both layouts work.
* A dropped top-k slot costs nothing on the ``grouped_mm`` experts path when it carries the sentinel
  expert index ``num_experts``: the sort pushes it to the tail and ``histc`` leaves it out of the group
  offsets. 5.17 always masks the uninitialised sentinel rows; 5.23 only when ``experts._is_expert_parallel``
  is set, so we set it while a plan that drops slots is applied. Other paths (``eager``, ``batched_mm``)
  crash on or compute sentinel rows, so there a dropped slot keeps a valid index with weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")


def check_transformers() -> None:
    if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
        raise RuntimeError(
            f"hookmoe needs transformers >= {MIN_TRANSFORMERS}, found {TRANSFORMERS_VERSION}; "
            "run `pip install -U 'transformers>=5.17'`"
        )


@dataclass
class RouterOutput:
    """A router's output with its parts named, plus the slots they came from."""

    logits: torch.Tensor | None
    weights: torch.Tensor
    index: torch.Tensor
    order: tuple[int, int, int]  # positions of (logits, weights, index) in the original tuple

    def pack(self, weights: torch.Tensor, index: torch.Tensor) -> tuple:
        out: list = [None, None, None]
        out[self.order[0]] = self.logits
        out[self.order[1]] = weights
        out[self.order[2]] = index
        return tuple(out)


def split_router_output(out: tuple, num_experts: int) -> RouterOutput:
    if not isinstance(out, tuple) or len(out) != 3:
        raise RuntimeError(f"unexpected router output (expected a 3-tuple, got {type(out).__name__})")
    int_pos = [i for i, t in enumerate(out) if torch.is_tensor(t) and not t.is_floating_point()]
    if len(int_pos) != 1:
        raise RuntimeError("unexpected router output: cannot find the top-k indices")
    i_idx = int_pos[0]
    k = out[i_idx].shape[-1]
    rest = [i for i in range(3) if i != i_idx]
    # weights have the top-k width; logits have one column per expert (prefer the non-top-k one)
    w_pos = [i for i in rest if out[i].shape[-1] == k]
    if len(w_pos) == 2:  # k == num_experts: ambiguous, use the documented layout
        i_log, i_w = (0, 1) if i_idx == 2 else (2, 1)
    elif len(w_pos) == 1:
        i_w = w_pos[0]
        i_log = [i for i in rest if i != i_w][0]
    else:
        raise RuntimeError("unexpected router output: cannot find the top-k weights")
    return RouterOutput(out[i_log], out[i_w], out[i_idx], (i_log, i_w, i_idx))


def experts_implementation(model) -> str:
    return getattr(model.config, "_experts_implementation", None) or "eager"


def sentinel_skips(experts_impl: str) -> bool:
    """Whether a slot with index == num_experts is skipped (not computed) by this experts path.

    ``hookmoe`` is hookmoe's own runtime path (runtime.py), which never computes sentinel slots.
    """
    return experts_impl in ("grouped_mm", "hookmoe")


def enable_sentinels(experts: torch.nn.Module) -> object:
    """Make the grouped_mm path mask sentinel rows; returns the previous state for :func:`restore_sentinels`."""
    prev = getattr(experts, "_is_expert_parallel", None)
    if prev is not None:
        experts._is_expert_parallel = True
    return prev


def restore_sentinels(experts: torch.nn.Module, prev: object) -> None:
    if prev is not None:
        experts._is_expert_parallel = prev


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. gradient-checkpoint recomputation).

    Under ``torch.compile`` (inference graphs of runtime.py) it is False, so that counting compiles without
    a graph break (the graph-task id is not traceable).
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


# Routers whose top-k candidates come out of ``torch.topk(..., sorted=True)`` over the routing probabilities
# (or over logits that the probabilities are monotone in): column 0 is the most probable candidate, column j
# the (j+1)-th. DeepSeek-V2/V3 call ``topk(sorted=False)`` (and V3 selects by bias-corrected scores), so their
# candidates come in no particular order. Checked against transformers 5.17 and 5.23.
_SORTED_ROUTERS = frozenset({"MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter",
                             "GraniteMoeTopKRouter", "GptOssTopKRouter"})


def router_sorts_candidates(router: torch.nn.Module) -> bool:
    """Whether ``router`` returns its top-k candidates sorted by descending probability (column 0 = most
    probable). Unknown routers: False (callers then sort)."""
    return type(router).__name__ in _SORTED_ROUTERS


_HUB_REACHABLE: bool | None = None


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the model hub cannot be used right now, or None: ``HF_HUB_OFFLINE`` is set (honoured), or one quick
    connection attempt to the hub failed (made once per process). Lets hub ids fail in one line at once instead of
    after minutes of retries."""
    global _HUB_REACHABLE
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        constants = None
    if str(os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on") or \
            bool(getattr(constants, "HF_HUB_OFFLINE", False)):
        return "the hub is off (HF_HUB_OFFLINE is set)"
    if _HUB_REACHABLE is None:
        host = urlparse(getattr(constants, "ENDPOINT", None) or "https://huggingface.co").hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return None if _HUB_REACHABLE else "the model hub cannot be reached (no network)"
