"""A runtime in which fewer experts really means faster.

Why: with stock transformers, top-2 -> top-1 barely moves decode latency (DESIGN.md §4) because the time
goes to per-kernel / per-op overhead, not expert math. Two parts fix that:

1. **The ``hookmoe`` experts implementation** (registered in transformers' ``ALL_EXPERTS_FUNCTIONS``
   and selected with ``model.set_experts_implementation("hookmoe")``; every supported architecture's
   experts class dispatches through it). It consumes the router's ``(index, weights)`` output exactly
   like the built-in paths, so routing plans (``routing.py`` hooks on the router), Hooks (pre-hooks on the
   MoE block) and shared experts keep working. A slot whose index is the sentinel ``num_experts`` (a
   dropped slot of a dynamic rule) is never computed. Two internal paths, chosen per call:

   * **host path** (CPU eager; host syncs are free there): one token (batch-1 decode) runs its selected
     experts on *views* of their weights, summed in place — no sort, no scatter, no weight gather; a
     handful of tokens is grouped by expert in Python; a prompt is sorted by expert once and both
     projections run as one grouped GEMM each (``torch.nn.functional.grouped_mm``'s CPU kernel, one C++
     loop over the experts — a loop of ``mm`` on older torch). Sentinel slots sort last and are cut off.
   * **device path** (CUDA, or any device under ``torch.compile``): no host sync — sort slots by expert,
     ``torch.nn.functional.grouped_mm`` with per-expert offsets (empty experts and the sentinel tail cost
     nothing), falling back to an opaque custom op (``hookmoe::grouped_mm_loop``) where the fused kernel
     is unavailable, so compiled graphs do not break (tested with ``fullgraph=True``, Hook and dynamic
     rules included).

2. **:class:`Runtime`** — greedy generation on an :class:`~hookmoe.models.MoEModel` through the fastest
   path for the device at hand (``describe()`` says which): the ``hookmoe`` experts; for unpadded batches
   of Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE (no sliding window) its own decode step (``lean``), which
   calls the decoder layers directly and skips the mask builder, position bookkeeping, output dataclasses and
   outer-module machinery of ``model(...)`` (bit-identical logits; ``lean=False`` turns it off); on CUDA a static KV
   cache (length bucketed to 256) and a ``torch.compile``-d decode step (``mode="reduce-overhead"`` = CUDA
   graphs); on CPU eager with a dynamic cache — measured on Mixtral-8x7B shapes /8 (4 layers, 1 thread): a
   compiled decode step was 1-4 % faster per token after 10-40 s of compilation per plan, and did not
   improve the top-2 -> top-1 ratio; ``compile=True`` forces it. Outputs equal the reference path (greedy
   tokens identical, logits within dtype tolerance — tests/test_runtime.py). Timings are synchronised:
   CUDA events on a GPU, ``time.perf_counter`` (``clock="wall"``) or the process CPU time
   (``clock="cpu"``: one thread on a shared machine, preemption excluded) on the CPU.

On the CPU, products go to oneDNN where it is the faster kernel (``cpu_gemm``: the model's linears, the
experts — one product per expert for prompts — and, inside the runtime, prompts' causal attention,
registered with transformers as ``hookmoe_sdpa`` with SDPA for everything else). Measured on Mixtral-8x7B
shapes /2 (2 layers, 1 thread, AMD EPYC): native TTFT at 1024 / 4096 tokens 4.42 / 21.2 s with torch's
BLAS, 2.01 / 9.18 s with oneDNN linears, experts and attention (benchmarks/results/SPEED.md).

What still costs time that k does not remove (CPU, measured by benchmarks/bench_profile.py): the
per-layer Python/op overhead of transformers' attention, norms and decoder layer (~0.4 ms per layer per
decode step on 2 shared EPYC cores).

Example::

    mm = hookmoe.models.load("tiny:mixtral")
    with Runtime(mm) as rt, mm.routing("topk:1"):
        res = rt.generate(input_ids, max_new_tokens=32)
        res.tokens, res.ttft_s, res.e2e_s
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from hookmoe.kernels import cpu_gemm
from hookmoe.errors import RuntimeOptionError

IMPL_NAME = "hookmoe"
SMALL_SLOTS = 32  # up to this many (token, expert) slots the host path groups in Python, without a sort
PER_EXPERT_MIN_MACS = 1 << 22  # smallest mean per-expert gate/up product run as its own oneDNN call




# --------------------------------------------------------------------------------------------------
# The experts implementation
# --------------------------------------------------------------------------------------------------


def _proj(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x @ w.T + b`` for weights stored ``[out, in]``; ``x @ w + b`` for transposed ``[in, out]``."""
    if transposed:
        return torch.addmm(b, x, w) if b is not None else x @ w
    return cpu_gemm.linear(x, w, b)


def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` (an int) on rows ``x`` using views of the stacked weights (nothing is copied)."""
    tr = getattr(self, "is_transposed", False)
    bias = getattr(self, "has_bias", False)
    if getattr(self, "has_gate", True):
        h = _proj(x, self.gate_up_proj[e], self.gate_up_proj_bias[e] if bias else None, tr)
        h = self._apply_gate(h)
    else:
        h = self.act_fn(_proj(x, self.up_proj[e], self.up_proj_bias[e] if bias else None, tr))
    o = _proj(h, self.down_proj[e], self.down_proj_bias[e] if bias else None, tr)
    if getattr(self, "has_post_expert_norm", False):
        o = self.post_expert_norm(o)
    return o


def _acc_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


def host_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """Host-grouped experts (CPU eager). Same contract as transformers' experts forward functions."""
    n, k = top_k_index.shape
    num_experts = self.num_experts
    flat = top_k_index.reshape(-1)
    wflat = top_k_weights.reshape(-1)
    acc = _acc_dtype(hidden_states.dtype)
    s_total = flat.numel()
    if n == 1:  # one token (batch-1 decode): run its selected experts on views of their weights, no scatter
        y_sum = None
        same = acc == hidden_states.dtype
        # routing weights as Python floats: a float32 scalar multiply, the same numbers as a [1] tensor's
        wts = wflat.tolist() if wflat.dtype == torch.float32 or same else None
        for s, e in enumerate(flat.tolist()):
            if 0 <= e < num_experts:
                y = _expert(self, e, hidden_states)
                if not same:
                    y = y.to(acc)
                y = y * (wts[s] if wts is not None else wflat[s:s + 1].to(acc))
                if y_sum is None:
                    y_sum = y
                else:
                    y_sum += y
        if y_sum is None:
            return torch.zeros_like(hidden_states)
        return y_sum if same else y_sum.to(hidden_states.dtype)
    out = torch.zeros((n, hidden_states.shape[-1]), dtype=acc, device=hidden_states.device)
    if s_total <= SMALL_SLOTS:
        groups: dict[int, list[int]] = {}
        for s, e in enumerate(flat.tolist()):
            if 0 <= e < num_experts:
                groups.setdefault(e, []).append(s)
        for e, slots in groups.items():
            if len(slots) == 1:
                s = slots[0]
                t = s // k
                y = _expert(self, e, hidden_states[t:t + 1])
                out[t:t + 1].add_(y.to(acc) * wflat[s:s + 1, None].to(acc))
            else:
                sl = torch.tensor(slots, device=flat.device)
                tok = sl // k
                y = _expert(self, e, hidden_states.index_select(0, tok))
                out.index_add_(0, tok, y.to(acc) * wflat.index_select(0, sl)[:, None].to(acc))
        return out.to(hidden_states.dtype)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(0, num_experts), minlength=num_experts + 1).tolist()
    valid = s_total - counts[num_experts]  # sentinel slots sort last and are cut off: never computed
    order = order[:valid]
    tok = order // k
    xs = hidden_states.index_select(0, tok)
    ws = wflat.index_select(0, order)[:, None].to(acc)
    if _per_expert_onednn(self, hidden_states, valid, counts[:num_experts]):
        start = 0
        for e, c in enumerate(counts[:num_experts]):
            if c:
                rows = slice(start, start + c)
                out.index_add_(0, tok[rows], _expert(self, e, xs[rows]).to(acc) * ws[rows])
                start += c
        return out.to(hidden_states.dtype)
    offs_list = []
    run = 0
    for c in counts[:num_experts]:
        run += c
        offs_list.append(run)
    offs = torch.tensor(offs_list, dtype=torch.int32, device=flat.device)
    ys = _grouped_rows(self, xs, offs, flat.index_select(0, order), _cpu_grouped_mm)
    out.index_add_(0, tok, ys.to(acc) * ws)
    return out.to(hidden_states.dtype)


def _per_expert_onednn(self, hidden_states: torch.Tensor, rows: int, counts: list[int]) -> bool:
    """Prompt path: one oneDNN product per expert instead of torch's grouped GEMM, where oneDNN is the CPU
    kernel in force (``cpu_gemm``) and the experts' products are large enough for it to pay (measured: a
    Mixtral-shaped expert on 128 rows 2.7x faster than the grouped kernel's per-expert MKL call)."""
    if getattr(self, "is_transposed", False) or not cpu_gemm.uses_onednn(hidden_states.dtype):
        return False
    busy = sum(1 for c in counts if c)
    w = self.gate_up_proj if getattr(self, "has_gate", True) else self.up_proj
    return busy > 0 and rows * w.shape[-1] * w.shape[-2] >= busy * PER_EXPERT_MIN_MACS


def _grouped_rows(self, xs: torch.Tensor, offs: torch.Tensor, e_rows: torch.Tensor, gmm) -> torch.Tensor:
    """Experts on rows sorted by expert (group g = rows ``offs[g-1]:offs[g]``) with a grouped matmul
    ``gmm(x, w[E, in, out], offs)``; ``e_rows`` (the expert of each row) only serves biases."""
    tr = getattr(self, "is_transposed", False)
    bias = getattr(self, "has_bias", False)

    def proj(x, w, b):
        y = gmm(x.to(w.dtype), w if tr else w.transpose(-2, -1), offs)
        return y + b[e_rows] if b is not None else y

    if getattr(self, "has_gate", True):
        h = self._apply_gate(proj(xs, self.gate_up_proj, self.gate_up_proj_bias if bias else None))
    else:
        h = self.act_fn(proj(xs, self.up_proj, self.up_proj_bias if bias else None))
    o = proj(h, self.down_proj, self.down_proj_bias if bias else None)
    if getattr(self, "has_post_expert_norm", False):
        o = self.post_expert_norm(o)
    return o


_CPU_GROUPED_MM = hasattr(F, "grouped_mm")


def _cpu_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's CPU grouped GEMM (one C++ loop over the experts) where it applies, else a loop of ``mm``."""
    global _CPU_GROUPED_MM
    align = 16 // x.element_size()
    if _CPU_GROUPED_MM and x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and x.dtype in (
            torch.float32, torch.bfloat16):
        try:
            return F.grouped_mm(x, w, offs=offs)
        except (RuntimeError, NotImplementedError):  # an older torch without the CPU kernel
            _CPU_GROUPED_MM = False
    return _grouped_mm_loop(x, w, offs)


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[rows of group g] = x[rows] @ w[g]`` (w: ``[G, in, out]``); rows past ``offs[-1]`` are zero."""
    out = torch.zeros((x.shape[0], w.shape[-1]), dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


torch.library.custom_op("hookmoe::grouped_mm_loop", _grouped_mm_loop, mutates_args=(),
                        schema="(Tensor x, Tensor w, Tensor offs) -> Tensor")


@torch.library.register_fake("hookmoe::grouped_mm_loop")
def _grouped_mm_loop_fake(x, w, offs):
    return x.new_empty((x.shape[0], w.shape[-1]))


def _fused_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.device.type != "cuda" or not hasattr(F, "grouped_mm"):
        return False
    if w.dtype not in (torch.bfloat16, torch.float16) or torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(d % 8 == 0 for d in w.shape[-2:])


def _device_gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _fused_grouped_mm_ok(x, w):
        y = F.grouped_mm(x, w, offs=offs)
        return torch.where((torch.arange(y.shape[0], device=y.device) < offs[-1]).unsqueeze(-1), y, 0)
    return torch.ops.hookmoe.grouped_mm_loop(x, w, offs)


def device_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Sorted grouped-GEMM experts without host syncs (CUDA graphs / torch.compile friendly)."""
    n, k = top_k_index.shape
    num_experts = self.num_experts
    flat = top_k_index.reshape(-1)
    e_sorted, order = torch.sort(flat)  # sentinels (== num_experts) go to the tail
    tok = order // k
    xs = hidden_states[tok]
    hist_in = e_sorted.float() if e_sorted.device.type in ("cpu", "mps") else e_sorted.int()
    counts = torch.histc(hist_in, bins=num_experts, min=0, max=num_experts - 1)  # sentinels fall outside
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    valid = (e_sorted < num_experts).unsqueeze(-1)
    # sentinel rows past offs[-1] are left uninitialised by grouped kernels: zero them before the gate and
    # drop them after the down projection
    o = _grouped_rows(self, xs.masked_fill(~valid, 0), offs, e_sorted.clamp(max=num_experts - 1), _device_gmm)
    acc = _acc_dtype(hidden_states.dtype)
    w_sorted = top_k_weights.reshape(-1)[order].to(acc)
    o = torch.where(valid, o.to(acc) * w_sorted[:, None], 0)
    unsorted = torch.empty_like(o).index_copy_(0, order, o)
    return unsorted.view(n, k, -1).sum(1).to(hidden_states.dtype)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``hookmoe`` experts implementation: host path on CPU eager, device path otherwise."""
    if hidden_states.device.type == "cpu" and not torch.compiler.is_compiling():
        return host_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return device_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Make ``experts_implementation="hookmoe"`` known to transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if ALL_EXPERTS_FUNCTIONS.get(IMPL_NAME) is not experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(IMPL_NAME, experts_forward)


def set_experts(mm, impl: str = IMPL_NAME) -> str:
    """Switch ``mm``'s experts implementation; returns the previous one. Re-applies a plan in force so that
    dynamic rules use sentinel indices when the new path skips them."""
    from hookmoe.compat import experts_implementation

    if impl == IMPL_NAME:
        register()
    prev = experts_implementation(mm.model)
    if impl != prev:
        try:
            mm.model.set_experts_implementation(impl)
        except (ValueError, KeyError) as e:
            raise RuntimeOptionError(f"cannot use experts implementation '{impl}': {str(e).splitlines()[0]}") from None
        patch = getattr(mm, "_routing_patch", None)
        if patch is not None and patch._active:
            from hookmoe.routing.patch import apply_plan

            mm.active_plan = apply_plan(mm, patch.plan, count=patch._count)
    return prev


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Timer:
    """Reads the chosen clock and the wall clock together. On CUDA with the wall clock, marks are CUDA events
    (no host sync inside the measured region; resolved after the final synchronise)."""

    def __init__(self, clock, device: torch.device | None = None):
        self.clock = clock
        self.cuda = device is not None and device.type == "cuda" and clock is time.perf_counter
        self.t0 = self.w0 = 0.0
        self.ev0 = None

    def start(self) -> None:
        if self.cuda:
            self.ev0 = torch.cuda.Event(enable_timing=True)
            self.ev0.record()
        self.w0, self.t0 = time.perf_counter(), self.clock()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return self.clock() - self.t0, time.perf_counter() - self.w0

    def value(self, mark) -> tuple[float, float]:
        """(chosen clock, wall) seconds of a mark; call after the device is synchronised."""
        if self.cuda:
            s = self.ev0.elapsed_time(mark) / 1e3
            return s, s
        return mark


def clock_fn(name: str, device: torch.device):
    """``wall`` (synchronised wall clock) or ``cpu`` (this process's CPU time: on a shared machine with one
    thread, the time a dedicated core would take — preemption by other jobs excluded; CPU devices only)."""
    if name not in CLOCKS:
        raise RuntimeOptionError(f"unknown clock '{name}' (use wall or cpu)")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeOptionError("the cpu clock only measures CPU devices; use the wall clock on a GPU")
    return CLOCKS[name]


@dataclass
class Generation:
    """Greedy generation result: new tokens ``[B, n]`` and timings in seconds (synchronised) on the chosen
    clock; ``wall_ttft_s`` / ``wall_e2e_s`` are always the wall clock."""

    tokens: torch.Tensor
    ttft_s: float
    e2e_s: float
    wall_ttft_s: float | None = None
    wall_e2e_s: float | None = None

    @property
    def itl_s(self) -> float:
        n = self.tokens.shape[1]
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else float("nan")


# Decoder stacks whose batch-1 / unpadded decode step the runtime drives itself (``LeanDecoder``): the model
# body is embed_tokens -> rotary_emb -> layers(hidden, attention_mask, position_ids, past_key_values,
# use_cache, position_embeddings) -> norm and the head a plain ``lm_head`` (checked against transformers 5.23).
LEAN_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"})


class LeanDecoder:
    """One decode step without the framework's per-call work that does not depend on the input: the causal
    mask builder (for one new token with no padding and no sliding window the mask is ``None`` — full
    attention to the cache, exactly what the stock path passes), position bookkeeping, output dataclasses
    and the outer modules' call machinery. The decoder layers are called as the model's body calls them, so
    routing plans (router hooks), Hooks (MoE-block pre-hooks) and the experts implementation all apply;
    logits are bit-identical to ``model(...)`` (tests/test_runtime.py)."""

    def __init__(self, mm):
        self.mm = mm
        self.body = mm.model.model
        self.head = mm.model.lm_head
        self.layers = list(self.body.layers[: mm.model.config.num_hidden_layers])

    @staticmethod
    def supported(mm) -> bool:
        model = mm.model
        cfg = model.config
        body = getattr(model, "model", None)
        if cfg.model_type not in LEAN_MODEL_TYPES or body is None or not isinstance(
                getattr(model, "lm_head", None), torch.nn.Linear):
            return False
        if not all(hasattr(body, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")):
            return False
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
            return False
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
            return False
        return getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager", cpu_gemm.ATTN_NAME)

    def usable(self) -> bool:
        """No forward hooks on the skipped outer modules other than a routing plan's mask bookkeeping (which
        only matters for padded batches, never taken here)."""
        from hookmoe.routing.patch import RoutingPatch

        for mod in (self.mm.model, self.body, self.head, self.body.embed_tokens, self.body.norm, self.body.rotary_emb):
            for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
                for fn in hooks.values():
                    if not isinstance(getattr(fn, "__self__", None), RoutingPatch):
                        return False
        return True

    def __call__(self, input_ids: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """Logits ``[B, 1, V]`` of one step; ``position``: ``[B, 1]`` positions of the new tokens."""
        h = self.body.embed_tokens(input_ids)
        pe = self.body.rotary_emb(h, position_ids=position)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=position, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)
        return self.head(self.body.norm(h))


@dataclass
class Runtime:
    """Fast greedy inference for an MoE model (see module docstring).

    ``compile``: ``"auto"`` (CUDA: yes; CPU: no), True or False. ``cache``: ``"auto"`` (static when
    compiling, else dynamic), ``"static"`` or ``"dynamic"``. ``experts``: ``"hookmoe"`` (default) or any
    transformers implementation (``grouped_mm``, ``eager``, ...) for comparisons. The previous experts
    implementation is restored by :meth:`close` (or on leaving a ``with`` block).
    """

    mm: Any
    compile: Any = "auto"
    cache: str = "auto"
    experts: str = IMPL_NAME
    clock: str = "wall"
    lean: Any = "auto"
    _prev_impl: str | None = field(default=None, init=False, repr=False)
    _prev_attn: str | None = field(default=None, init=False, repr=False)
    _compiled: Any = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.cache not in ("auto", "static", "dynamic"):
            raise RuntimeOptionError(f"unknown cache '{self.cache}' (use auto, static or dynamic)")
        dev = self.mm.device
        if self.compile == "auto":
            self.compile = dev.type == "cuda"
        elif not isinstance(self.compile, bool):
            raise RuntimeOptionError(f"compile must be auto, true or false, got '{self.compile}'")
        if self.cache == "auto":
            self.cache = "static" if self.compile else "dynamic"
        if self.lean not in ("auto", True, False):
            raise RuntimeOptionError(f"lean must be auto, true or false, got '{self.lean}'")
        supported = LeanDecoder.supported(self.mm)
        if self.lean is True and not supported:
            raise RuntimeOptionError(f"no lean decode step for model type '{self.mm.model.config.model_type}' "
                                     f"(supported: {', '.join(sorted(LEAN_MODEL_TYPES))}, without sliding window)")
        self._lean = LeanDecoder(self.mm) if supported and self.lean is not False and not self.compile else None
        self._clock = clock_fn(self.clock, dev)
        self._prev_impl = set_experts(self.mm, self.experts)
        cfg = self.mm.model.config
        if (dev.type == "cpu" and not self.compile and getattr(cfg, "_attn_implementation", None) == "sdpa"
                and cpu_gemm.uses_onednn(self.mm.dtype)):
            # prompts' causal attention on oneDNN products (cpu_gemm.causal_attention); SDPA for the rest
            self.mm.model.set_attn_implementation(cpu_gemm.register_attention())
            self._prev_attn = "sdpa"

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._prev_attn is not None:
            self.mm.model.set_attn_implementation(self._prev_attn)
            self._prev_attn = None
        if self._prev_impl is not None:
            set_experts(self.mm, self._prev_impl)
            self._prev_impl = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        dev = self.mm.device
        mode = "reduce-overhead (CUDA graphs)" if self.compile and dev.type == "cuda" else (
            "default" if self.compile else None)
        return {"experts_implementation": self.experts, "device": str(dev), "dtype": str(self.mm.dtype),
                "cache": self.cache, "compile": bool(self.compile), "compile_mode": mode,
                "attention": getattr(self.mm.model.config, "_attn_implementation", None),
                "cpu_gemm": cpu_gemm.describe() if dev.type == "cpu" else None,
                "decode_step": "lean (batch without padding)" if self._lean is not None else "model forward",
                "threads": torch.get_num_threads(), "clock": self.clock}

    # ---- forward helpers ------------------------------------------------------------------------
    def _decode_fn(self):
        if not self.compile:
            return self.mm.model
        if self._compiled is None:
            mode = "reduce-overhead" if self.mm.device.type == "cuda" else None
            compiled = torch.compile(self.mm.model, mode=mode, dynamic=False)

            def step(**kw):
                # routing plans and Hooks live in module hooks: guard on them (dynamo's default skips hook
                # guards and would replay the graph of whichever plan was compiled first)
                with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
                    return compiled(**kw)

            self._compiled = step
        return self._compiled

    def _new_cache(self, max_len: int):
        from transformers import DynamicCache, StaticCache

        cfg = self.mm.model.config
        if self.cache == "static":  # length bucketed to 256 so that compiled graphs are reused
            return StaticCache(config=cfg, max_cache_len=-(-max_len // 256) * 256)
        return DynamicCache(config=cfg)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits (one forward, no cache) through this runtime's experts path."""
        return self.mm.model(input_ids=input_ids.to(self.mm.device), attention_mask=attention_mask,
                             use_cache=False).logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None, decode_inputs: torch.Tensor | None = None) -> Generation:
        """Greedy decoding of ``max_new_tokens`` tokens (all of them unless ``eos_token_id`` ends every row).

        ``ttft_s`` is the time to the first new token (prefill + one argmax), ``e2e_s`` the whole call;
        both are synchronised on the device. ``decode_inputs`` (``[B, max_new_tokens - 1]``) feeds these
        tokens to the decode steps instead of the argmax (same work per step; for speed measurements on
        random-weight models, whose greedy outputs repeat and so route unlike text).
        """
        if max_new_tokens < 1:
            raise RuntimeOptionError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if decode_inputs is not None and tuple(decode_inputs.shape) != (input_ids.shape[0], max_new_tokens - 1):
            raise RuntimeOptionError("decode_inputs must have shape [batch, max_new_tokens - 1]")
        dev = self.mm.device
        model = self.mm.model
        ids = input_ids.to(dev)
        b, t = ids.shape
        mask = attention_mask.to(dev) if attention_mask is not None else None
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: let attention use its causal fast path
        pos = None
        if mask is not None:
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cache = self._new_cache(t + max_new_tokens)
        step = self._decode_fn()
        lean = self._lean if (self._lean is not None and mask is None and self.cache == "dynamic"
                              and self._lean.usable()) else None
        timer = _Timer(self._clock, dev)
        sync(dev)
        timer.start()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(t, device=dev), logits_to_keep=1)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        first = timer.mark()
        toks = [nxt]
        done = None
        if eos_token_id is not None:
            done = nxt.squeeze(-1) == eos_token_id
        last_pos = pos[:, -1:] if pos is not None else None
        for i in range(1, max_new_tokens):
            if done is not None and bool(done.all()):
                break
            cp = torch.tensor([t + i - 1], device=dev)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((b, 1))], dim=-1)
                last_pos = last_pos + 1
                step_pos = last_pos
            else:
                step_pos = cp.view(1, 1).expand(b, 1) if self.compile else None
            feed = nxt if decode_inputs is None else decode_inputs[:, i - 1:i].to(dev)
            if lean is not None:
                step_logits = lean(feed, cp.view(1, 1).expand(b, 1), cache)
            else:
                step_logits = step(input_ids=feed, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                                   use_cache=True, cache_position=cp).logits
            nxt = step_logits[:, -1, :].argmax(-1, keepdim=True)
            if done is not None:
                nxt = torch.where(done.unsqueeze(-1), torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt.squeeze(-1) == eos_token_id)
            toks.append(nxt)
        tokens = torch.cat(toks, dim=-1)
        end = timer.mark()
        sync(dev)
        (ttft, wall_ttft), (e2e, wall_e2e) = timer.value(first), timer.value(end)
        return Generation(tokens, ttft, e2e, wall_ttft, wall_e2e)


def reference_generate(mm, input_ids: torch.Tensor, max_new_tokens: int, *,
                       attention_mask: torch.Tensor | None = None, clock: str = "wall",
                       decode_inputs: torch.Tensor | None = None) -> Generation:
    """The stock path: ``model.generate`` (greedy, exactly ``max_new_tokens``, EOS not special — like
    :meth:`Runtime.generate` without ``eos_token_id``) with the model's experts implementation; TTFT is taken
    when the first step's logits are ready."""
    from transformers import LogitsProcessor, LogitsProcessorList

    dev = mm.device
    timer = _Timer(clock_fn(clock, dev), dev)
    stamp: dict[str, Any] = {}

    class _FirstStep(LogitsProcessor):  # called once per step, right after the forward
        def __call__(self, input_ids, scores):
            if "first" not in stamp:
                stamp["first"] = timer.mark()
            return scores

    class _Force(LogitsProcessor):  # the token chosen at step j (the input of step j + 1) is decode_inputs[:, j]
        def __init__(self):
            self.j = -1

        def __call__(self, input_ids, scores):
            self.j += 1
            if self.j < decode_inputs.shape[1]:
                forced = decode_inputs[:, self.j:self.j + 1].to(scores.device)
                scores = torch.full_like(scores, float("-inf")).scatter_(1, forced, 0.0)
            return scores

    import copy

    ids = input_ids.to(dev)
    mask = attention_mask.to(dev) if attention_mask is not None else torch.ones_like(ids)
    pad = getattr(mm.tokenizer, "pad_token_id", None) if mm.tokenizer is not None else None
    # exactly max_new_tokens greedy tokens: no EOS stop (and no EOS suppression, unlike min_new_tokens)
    gc = copy.deepcopy(mm.model.generation_config)
    gc.eos_token_id = None
    saved_eos = mm.model.generation_config.eos_token_id  # None fields are filled from it: unset it for the call
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    gc.pad_token_id = pad if pad is not None else 0
    for attr in ("temperature", "top_p", "top_k"):
        setattr(gc, attr, None)
    mm.model.generation_config.eos_token_id = None
    try:
        with torch.inference_mode():
            sync(dev)
            timer.start()
            out = mm.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc,
                                    logits_processor=LogitsProcessorList(
                                        [_FirstStep()] + ([_Force()] if decode_inputs is not None else [])))
            end = timer.mark()
            sync(dev)
    finally:
        mm.model.generation_config.eos_token_id = saved_eos
    tokens = out[:, ids.shape[1]:]
    e2e, wall_e2e = timer.value(end)
    ttft, wall_ttft = timer.value(stamp.get("first", end))
    return Generation(tokens, ttft, e2e, wall_ttft, wall_e2e)
