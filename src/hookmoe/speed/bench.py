"""Speed benchmark: TTFT and ITL of routing plans (and Hooks), side by side, with their theoretical limits.

What is measured (as in the paper): **TTFT** for prompts of ``lengths`` tokens (default 1024/2048/4096)
and one new token; **ITL** = (e2e - TTFT) / (new - 1) for ``new_tokens`` (default 256) tokens after an
``itl_prompt``-token prompt. The decode steps are fed the greedy tokens, or (``decode_tokens="random"``,
the default for random-weight models, whose greedy outputs repeat one token and so route unlike text)
random tokens — the same work per step, with routing statistics like the prompt's, so that a dynamic
rule calibrated on the prompt keeps its Act while decoding (the Act of both phases is reported).
Timings are synchronised (CUDA events on a GPU; on the CPU the wall clock or, ``clock="cpu"``, the
process CPU time — one thread on a shared machine, preemption excluded), medians over ``repeats`` after
``warmup`` passes.

Trustworthy ratios on a noisy machine: all variants share one loaded model and are measured
**interleaved** — for every repeat and prompt length, plan A, plan B, ... one after the other (the order
reversed on every other repeat, ABBA), so drift hits all of them alike. Each ratio is the median of the
per-repeat paired ratios ``t_base / t_variant`` (spread: min..max over repeats).

Beside each measured ratio stands its **theoretical limit** — active FLOPs (routed + shared experts,
attention projections and the causal attention scores; the LM head for the last token) for prefill,
active weight bytes read per step for decode (for batch B the expected number of distinct experts under
uniform routing) — both from :mod:`hookmoe.accounting`, and the **efficiency**
``(measured - 1) / (limit - 1)``.

``--random-weights`` builds the model from its configuration alone (a local config, a hub id's config —
nothing else is downloaded — or a built-in preset of a published model's real shapes, :data:`PRESETS`),
with ``--layers N`` and ``--scale F`` (hidden, intermediate, vocabulary sizes and head count divided by F;
head dim, expert count, top-k, shared experts and their proportions kept; with fewer layers than the real
model the vocabulary shrinks by the same factor as the depth, so the LM head keeps its real share of the
per-token work and the theoretical limits equal the real model's) so the shapes fit a small machine.
"""

from __future__ import annotations

from hookmoe import progress as progress_bars

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from hookmoe.errors import BenchError
from hookmoe.machine import machine_info
from hookmoe.models.loading import MODEL_HELP, LoadOptions
from hookmoe.options import Options, argument, option
from hookmoe.routing.plan import PLAN_HELP
from hookmoe.speed.cost import cost_model, kv_bytes_per_step, prefill_flops
from hookmoe.speed.shapes import PRESETS, random_model


BENCH_FORMAT = "hookmoe-bench/1"


DEFAULT_LENGTHS = (1024, 2048, 4096)


DEFAULT_LENGTHS_TEXT = ",".join(map(str, DEFAULT_LENGTHS))




@dataclass
class Variant:
    plan: str
    hook: str | None = None  # a hook directory, or "random[:L]" (an untrained Hook of the paper's shape)
    runtime: str = "fast"  # fast | reference
    label: str = ""
    resolved_plan: Any = None  # calibrated Plan for dynamic rules that needed it

    def __post_init__(self):
        if not self.label:
            self.label = self.plan + (f" + hook({self.hook})" if self.hook else "")
            if self.runtime != "fast":
                self.label += f" [{self.runtime}]"


def parse_variants(plans: Sequence[str], hooks: Sequence[str] = (),
                   runtimes: Sequence[str] = ("fast",)) -> list[Variant]:
    """Variants from ``--plan`` values (``PLAN`` or ``PLAN@HOOK``), ``--hook`` values (each combined with
    every plan after the first) and runtimes (each variant under each runtime)."""
    if not plans:
        plans = ["native", "topk:1"]
    base: list[tuple[str, str | None]] = []
    for p in plans:
        p = str(p).strip()
        if not p:
            raise BenchError("empty --plan value")
        if "@" in p:
            plan, hook = p.split("@", 1)
            base.append((plan.strip() or "native", hook.strip() or None))
        else:
            base.append((p, None))
    for h in hooks:
        for plan, hook in list(base[1:] if len(base) > 1 else base):
            if hook is None and (plan, h) not in base:
                base.append((plan, h))
    seen, out = set(), []
    for rt in runtimes:
        if rt not in ("fast", "reference"):
            raise BenchError(f"unknown runtime '{rt}' (use fast, reference or both)")
        for plan, hook in base:
            key = (plan, hook, rt)
            if key in seen:
                continue
            seen.add(key)
            out.append(Variant(plan, hook, rt))
    return out


class _Activation:
    """Puts a variant in force on the shared model: experts path, hook, plan (undone by ``close``)."""

    def __init__(self, mm, v: Variant, impls: dict[str, str], count: bool = False):
        from hookmoe.routing.plan import Dynamic, Plan
        from hookmoe.routing.patch import apply_plan
        from hookmoe.speed.runtime import set_experts

        self.mm = mm
        self.patch = None
        self.saved_k: list = []
        set_experts(mm, impls[v.runtime])
        self.hookset = _attach_hook(mm, v.hook) if v.hook else None
        plan = v.resolved_plan if v.resolved_plan is not None else Plan.parse(v.plan)
        rules = plan.resolve(mm)
        if count or any(isinstance(r, Dynamic) for r in rules.values()):
            self.patch = apply_plan(mm, plan, count=count)
        else:
            # static plan: exactly what routing.py does for static rules (router.top_k), minus its counting hook
            for layer in mm.layers:
                r = rules[layer.index]
                self.saved_k.append((layer.router, layer.router.top_k))
                layer.router.top_k = getattr(r, "k", mm.native_top_k)

    def close(self) -> None:
        if self.patch is not None:
            self.patch.remove()
        for router, k in self.saved_k:
            router.top_k = k
        if self.hookset is not None:
            from hookmoe.hook.inject import remove_hooks

            remove_hooks(self.mm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _attach_hook(mm, spec: str):
    from hookmoe.hook.inject import attach_hooks
    from hookmoe.hook.inject import insert_hooks

    if spec == "random" or spec.startswith("random:"):
        if ":" in spec:
            try:
                layers = [int(x) for x in spec.split(":", 1)[1].split(",")]
            except ValueError:
                raise BenchError(f"bad hook spec '{spec}' (use random or random:LAYER[,LAYER])") from None
        else:
            idx = mm.moe_layer_indices
            layers = [idx[len(idx) // 2]]
        return insert_hooks(mm, layers, init="paper", seed=0)
    if not Path(spec).is_dir():
        raise BenchError(f"hook directory not found: {spec} (or use random[:LAYER] for an untrained hook)")
    return attach_hooks(mm, spec)


def _stats(xs: list[float]) -> dict:
    xs_sorted = sorted(xs)
    n = len(xs_sorted)

    def q(p):
        if n == 1:
            return xs_sorted[0]
        pos = p * (n - 1)
        lo = int(math.floor(pos))
        hi = min(n - 1, lo + 1)
        return xs_sorted[lo] + (xs_sorted[hi] - xs_sorted[lo]) * (pos - lo)

    return {"median": statistics.median(xs_sorted), "min": xs_sorted[0], "max": xs_sorted[-1],
            "q25": q(0.25), "q75": q(0.75), "n": n}


RUNTIMES = {"fast": ("fast",), "reference": ("reference",), "both": ("fast", "reference")}


def _lengths_text(value: Any) -> str:
    """``--lengths`` as canonical text (``"1024,2048"``, ``"none"``) from text or a sequence of whole numbers."""
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text.lower() in ("", "none", "0"):
            return "none"
        try:
            vals = [int(x) for x in text.split(",") if x]
        except ValueError:
            raise BenchError(f"--lengths must be comma-separated whole numbers (or none), got '{value}'") from None
    else:
        vals = [int(v) for v in value]
        if not vals:
            return "none"
    if any(v < 1 for v in vals):
        raise BenchError(f"--lengths must be positive whole numbers, got '{value}'")
    return ",".join(map(str, vals))


@dataclass(kw_only=True)
class BenchConfig(Options):
    """What :func:`bench` measures and how (one source for its keyword arguments and ``hookmoe bench``'s flags)."""

    error: ClassVar[type] = BenchError

    lengths: str = option(DEFAULT_LENGTHS_TEXT, "TTFT prompt lengths (comma-separated; none = ITL only; the API "
                          "also takes a sequence of whole numbers)")
    new_tokens: int = option(256, "new tokens for ITL (0 = TTFT only; ITL needs at least 2)", min=0)
    itl_prompt: int = option(128, "prompt length for the ITL run", min=1)
    batch_size: int = option(1, "sequences per batch", min=1)
    repeats: int = option(5, "interleaved timed repeats", min=1)
    warmup: int = option(1, "warm-up passes per variant", min=0)
    compile: str = option("auto", "torch.compile the decode step: auto (on CUDA) | on | off (the API also takes "
                          "True / False)", choices=("auto", "on", "off"))
    clock: str = option("wall", "wall | cpu (process CPU time, needs --threads 1: excludes preemption on a shared "
                        "machine)", choices=("wall", "cpu"))
    act: Optional[float] = option(None, "calibrate dynamic plans to this Act first", min=0, min_open=True)
    seed: int = option(0, "random seed (prompt tokens, tiny:<arch> and random weights)")
    check_outputs: bool = option(True, "check the fast runtime's greedy tokens against the reference path",
                                 flags=("--check/--no-check",))
    decode_tokens: Optional[str] = option(None, "greedy | random: what the ITL decode steps are fed (default: random "
                                          "for random-weight models, whose greedy outputs repeat; greedy otherwise)",
                                          choices=("greedy", "random"))

    def check(self) -> None:
        self.lengths = _lengths_text(self.lengths)
        if isinstance(self.compile, bool):
            self.compile = "on" if self.compile else "off"
        if self.new_tokens == 1:
            raise BenchError(f"--new-tokens must be >= 2 (ITL needs two tokens) or 0 (no ITL), got {self.new_tokens}")
        if not self.prompt_lengths and not self.new_tokens:
            raise BenchError("nothing to measure: give prompt lengths (TTFT) or --new-tokens (ITL)")

    def validate(self) -> None:
        """Check every setting again (after a field was changed in place)."""
        self.__post_init__()

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        return () if self.lengths == "none" else tuple(int(x) for x in self.lengths.split(","))

    @property
    def compile_mode(self) -> Any:
        """``compile`` as :class:`~hookmoe.speed.runtime.Runtime` takes it: "auto", True or False."""
        return {"auto": "auto", "on": True, "off": False}[self.compile]


@dataclass(kw_only=True)
class BenchOptions(BenchConfig, LoadOptions):
    """``hookmoe bench``: the model (loaded, or built with random weights), the variants, and the
    :class:`BenchConfig` (run by :func:`run_bench`)."""

    model: str = argument(MODEL_HELP + "; with --random-weights also a preset: " + ", ".join(PRESETS))
    plan: Optional[list[str]] = option(None, PLAN_HELP + " (repeat; the first is the base; PLAN@HOOK adds a hook; "
                                       "default: native and topk:1)", flags=("--plan",))
    hook: Optional[list[str]] = option(None, "hook directory or random[:LAYER] (repeat); each is added to every "
                                       "plan after the first", flags=("--hook",))
    random_weights: bool = option(False, "build the model from its config (or preset) with random weights",
                                  flags=("--random-weights",))
    layers: Optional[int] = option(None, "with --random-weights: decoder layers", min=1)
    scale: float = option(1.0, "with --random-weights: divide hidden/intermediate/vocab sizes and heads by this",
                          min=0, min_open=True)
    runtime: str = option("fast", "fast (hookmoe runtime) | reference (stock transformers generate) | both",
                          choices=tuple(RUNTIMES))
    threads: Optional[int] = option(None, "CPU threads (torch.set_num_threads)", min=1)
    as_json: Optional[Path] = option(None, "write the results JSON here ('-' = stdout)", flags=("--json",))
    plot_path: Optional[Path] = option(None, "bar plot PNG (default: next to --json)", flags=("--plot",))
    progress: bool = option(True, "progress bars")

    def check(self) -> None:
        super().check()
        name = self.model.split(":", 1)[1] if self.model.startswith("preset:") else self.model
        if not self.random_weights and (name in PRESETS or self.model.startswith("preset:")):
            raise BenchError(f"'{self.model}' is a random-weight preset: add --random-weights")
        if not self.random_weights and (self.layers is not None or self.scale != 1.0):
            raise BenchError("--layers and --scale need --random-weights")


def run_bench(o: BenchOptions, *, progress: bool = True, note: Callable[[str], None] | None = None) -> dict:
    """``hookmoe bench``: load (or build) ``o.model``, benchmark the variants of ``o.plan`` x ``o.hook`` x
    ``o.runtime`` with :func:`bench`; ``note`` is told what changed and when timings may be unreliable."""
    if o.threads is not None:
        torch.set_num_threads(o.threads)
    if o.random_weights:
        mm = random_model(o.model, scale=o.scale, layers=o.layers, device=o.device, dtype=o.dtype, seed=o.seed)
        mm.random_weights = True
    else:
        from hookmoe.hook import load

        mm = load(o.model, seed=o.seed, **o.load_kwargs())
    variants = parse_variants(o.plan or [], o.hook or [], RUNTIMES[o.runtime])
    res = bench(mm, variants, o, progress=progress, note=note)
    busy = _busy_note(mm, o.clock)
    if busy and note is not None:
        note(busy)
    res["model"]["random_weights"] = _random_weights(mm)
    res["model"]["scale"], res["model"]["layers_arg"] = o.scale, o.layers
    return res


def _random_weights(mm) -> bool:
    """Random weights (``--random-weights``, ``tiny:<arch>``): greedy decoding repeats one token there."""
    return bool(getattr(mm, "random_weights", False)) or str(getattr(mm, "source", "")).startswith("tiny:")


def _fit_lengths(mm, cfg: BenchConfig) -> tuple[list[int], str | None]:
    """The TTFT prompt lengths; the default ones shrunk to fit a model with few positions (and a note saying so)."""
    lengths = list(cfg.prompt_lengths)
    maxpos = _max_positions(mm)
    if cfg.lengths != DEFAULT_LENGTHS_TEXT or maxpos is None or max(DEFAULT_LENGTHS) < maxpos:
        return lengths, None
    fit = sorted({max(8, maxpos // d) for d in (8, 4, 2)})
    text = ",".join(map(str, fit))
    return fit, f"this model takes at most {maxpos} positions: TTFT prompt lengths {text} instead of " \
        f"{DEFAULT_LENGTHS_TEXT}"


def _max_positions(mm) -> int | None:
    v = getattr(mm.config, "max_position_embeddings", None)
    return int(v) if v else None


def bench(mm, variants: Sequence[Variant], cfg: BenchConfig | None = None, *, progress: bool = True,
          note: Callable[[str], None] | None = None) -> dict:
    """Benchmark ``variants`` on the loaded model ``mm``; returns the result dict (see module docstring).
    ``note``: told when the default prompt lengths were shrunk to fit the model."""
    from hookmoe.compat import experts_implementation
    from hookmoe.routing.plan import Plan
    from hookmoe.speed.runtime import Runtime, reference_generate, set_experts

    cfg = cfg or BenchConfig()
    cfg.validate()
    if not variants:
        raise BenchError("nothing to benchmark: give at least one --plan")
    if cfg.clock == "cpu":
        if mm.device.type != "cpu":
            raise BenchError("--clock cpu measures CPU devices only; use --clock wall on a GPU")
        if torch.get_num_threads() != 1:
            raise BenchError("--clock cpu sums the CPU time of all threads; use it with --threads 1")
    for v in variants:  # parse every plan and find every hook up front: bad input fails before any timing
        Plan.parse(v.plan).resolve(mm)
        if v.hook and not (v.hook == "random" or v.hook.startswith("random:")) and not Path(v.hook).is_dir():
            raise BenchError(f"hook directory not found: {v.hook} (or use random[:LAYER] for an untrained hook)")
    lengths, lengths_note = _fit_lengths(mm, cfg)
    if lengths_note and note is not None:
        note(lengths_note)
    decode_tokens = cfg.decode_tokens or ("random" if _random_weights(mm) else "greedy")
    maxpos = _max_positions(mm)
    need = max([t + 1 for t in lengths] + [cfg.itl_prompt + cfg.new_tokens])
    if maxpos is not None and need > maxpos:
        raise BenchError(f"prompt + new tokens ({need}) exceed the model's max_position_embeddings ({maxpos})")
    dev = mm.device
    vocab = int(mm.config.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    lo = min(3, vocab - 1)
    prompts = {t: torch.randint(lo, vocab, (cfg.batch_size, t), generator=gen).to(dev) for t in lengths}
    itl_ids = torch.randint(lo, vocab, (cfg.batch_size, cfg.itl_prompt), generator=gen).to(dev)
    n_probe = max(2, min(8, cfg.new_tokens or 8))
    forced = None
    if decode_tokens == "random" and cfg.new_tokens:
        forced = torch.randint(lo, vocab, (cfg.batch_size, cfg.new_tokens - 1), generator=gen).to(dev)

    orig_impl = experts_implementation(mm.model)
    impls = {"fast": "hookmoe", "reference": orig_impl if orig_impl != "hookmoe" else "grouped_mm"}
    rt = Runtime(mm, compile=cfg.compile_mode, clock=cfg.clock)  # sets the hookmoe experts; restored at the end

    def run(v: Variant, ids, n: int):
        feed = forced[:, : n - 1] if forced is not None and n > 1 and ids is itl_ids else None
        if v.runtime == "fast":
            return rt.generate(ids, n, decode_inputs=feed)
        return reference_generate(mm, ids, n, clock=cfg.clock, decode_inputs=feed)

    try:
        _calibrate(mm, variants, cfg, itl_ids, impls)
        info = {}
        for v in variants:
            info[v.label] = _variant_info(mm, v, cfg, itl_ids, impls, lambda ids, n, v=v: run(v, ids, n))
        samples: dict[str, dict[str, list[float]]] = {v.label: {} for v in variants}
        total = (cfg.warmup + cfg.repeats * (len(lengths) + (1 if cfg.new_tokens else 0))) * len(variants)
        with progress_bars.bar(progress, "benchmarking", total, auto_refresh=False) as advance:
            for _ in range(cfg.warmup):
                for v in variants:
                    with _Activation(mm, v, impls):
                        if lengths:
                            run(v, prompts[lengths[0]], 1)
                        run(v, itl_ids, n_probe)
                    advance(1)
            for r in range(cfg.repeats):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for t in lengths:
                    for v in order:
                        with _Activation(mm, v, impls):
                            g = run(v, prompts[t], 1)
                        samples[v.label].setdefault(f"ttft@{t}", []).append(g.ttft_s)
                        samples[v.label].setdefault(f"wall:ttft@{t}", []).append(g.wall_ttft_s)
                        advance(1)
                if cfg.new_tokens:
                    for v in order:
                        with _Activation(mm, v, impls):
                            g = run(v, itl_ids, cfg.new_tokens)
                        samples[v.label].setdefault("itl", []).append(g.itl_s)
                        samples[v.label].setdefault("e2e", []).append(g.e2e_s)
                        samples[v.label].setdefault("ttft_itl_prompt", []).append(g.ttft_s)
                        n_new = g.tokens.shape[1]
                        samples[v.label].setdefault("wall:itl", []).append(
                            (g.wall_e2e_s - g.wall_ttft_s) / (n_new - 1))
                        advance(1)
        checks = _check_outputs(mm, variants, itl_ids, impls, rt) if cfg.check_outputs else {}
    finally:
        rt.close()
        set_experts(mm, orig_impl)
    desc = rt.describe()
    desc["reference_experts"] = impls["reference"]
    res = _assemble(mm, variants, cfg, lengths, samples, info, checks, desc)
    res["settings"]["decode_tokens"] = decode_tokens
    if lengths_note:
        res["settings"]["lengths_note"] = lengths_note
    return res


def _calibrate(mm, variants, cfg: BenchConfig, ids, impls) -> None:
    """Fit dynamic plans that need it (naee / entropy:ACT, or any dynamic plan when ``cfg.act`` is set) on
    the benchmark's own ITL prompt tokens (with the variant's hook in place, as it changes the routing)."""
    from hookmoe.eval.scope import needs_calibration
    from hookmoe.routing.plan import Dynamic, Plan
    from hookmoe.speed.runtime import set_experts

    for v in variants:
        plan = Plan.parse(v.plan)
        dyn = any(isinstance(r, Dynamic) for r in plan.resolve(mm).values())
        if not dyn or not (needs_calibration(mm, plan) or cfg.act is not None):
            continue
        from hookmoe.routing.calibrate import calibrate_plan

        set_experts(mm, impls[v.runtime])
        blocks = ids.detach().cpu()
        if blocks.shape[1] < 64:
            blocks = blocks.repeat(1, math.ceil(64 / blocks.shape[1]))
        hookset = _attach_hook(mm, v.hook) if v.hook else None
        try:
            v.resolved_plan = calibrate_plan(mm, plan, blocks, target_act=cfg.act)
        finally:
            if hookset is not None:
                from hookmoe.hook.inject import remove_hooks

                remove_hooks(mm)
        v.label += f" (calibrated{f' to Act {cfg.act:g}' if cfg.act is not None else ''})"


def _variant_info(mm, v: Variant, cfg: BenchConfig, ids, impls, run) -> dict:
    """Act of one variant for prefill (the ITL prompt) and for decode (the new tokens of a full ITL run), and
    the cost model of each phase (limits use the Act of their own phase: dynamic rules may differ)."""
    from hookmoe.hook.inject import get_hooks

    with _Activation(mm, v, impls, count=True) as act:
        stats = act.patch.stats
        run(ids, 1)
        pre, pre_tok = stats.act_per_layer(), stats.tokens
        dec = dict(pre)
        if cfg.new_tokens:
            stats.reset()
            run(ids, cfg.new_tokens)
            tot, tot_tok = stats.act_per_layer(), stats.tokens
            dec = {i: (tot[i] * tot_tok - pre[i] * pre_tok) / max(1.0, tot_tok - pre_tok) for i in tot}
        pre = {int(i): float(a) for i, a in pre.items()}
        dec = {int(i): float(a) for i, a in dec.items()}
        hs = get_hooks(mm)
        return {  # costs are counted while the variant's hook is in the model
            "act": sum(pre.values()) / len(pre), "act_per_layer": pre,
            "act_decode": sum(dec.values()) / len(dec), "act_decode_per_layer": dec,
            "rules": act.patch.per_layer(),
            "plan": (v.resolved_plan.to_dict() if v.resolved_plan is not None else v.plan),
            "hook_params": hs.num_params() if hs is not None else 0,
            "cost": cost_model(mm, pre, batch_size=cfg.batch_size),
            "cost_decode": cost_model(mm, dec, batch_size=cfg.batch_size),
        }


def _check_outputs(mm, variants, ids, impls, rt) -> dict:
    """Greedy tokens of the fast runtime vs the stock path, per plan (a correctness check beside timing)."""
    from hookmoe.speed.runtime import reference_generate

    res = {}
    n = 16
    for v in variants:
        if v.runtime != "fast":
            continue
        with _Activation(mm, v, impls):
            fast = rt.generate(ids[:1], n).tokens
        ref_v = Variant(v.plan, v.hook, "reference", resolved_plan=v.resolved_plan)
        with _Activation(mm, ref_v, impls):
            ref = reference_generate(mm, ids[:1], n).tokens
        res[v.label] = bool(torch.equal(fast.cpu(), ref.cpu()))
    return {"greedy_tokens_identical_to_reference": res, "tokens_checked": n}


def _paired(a: list[float], b: list[float]) -> dict:
    """Median and range of the per-repeat ratios a_i / b_i."""
    st = _stats([x / y for x, y in zip(a, b)])
    return {"median": st["median"], "min": st["min"], "max": st["max"]}


def _assemble(mm, variants, cfg, lengths, samples, info, checks, runtime_desc) -> dict:
    """The result JSON: one row per variant (medians, paired ratios against its base, limits, efficiency), the
    Hook overhead and dynamic-vs-static sections, the command, machine, model and settings."""
    metrics = [f"ttft@{t}" for t in lengths] + (["itl"] if cfg.new_tokens else [])
    base_by_rt: dict[str, Variant] = {}
    for v in variants:
        base_by_rt.setdefault(v.runtime, v)
    rows = [_variant_row(mm, cfg, v, base_by_rt[v.runtime], metrics, samples, info) for v in variants]
    argv = sys.argv[1:] if Path(sys.argv[0]).name.startswith("hookmoe") else sys.argv
    return {
        "format": BENCH_FORMAT,
        "command": " ".join(["hookmoe"] + list(argv)) if argv is not sys.argv else " ".join(argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "model": {"source": mm.source, "arch": mm.arch, "layers": mm.num_layers, "moe_layers": len(mm.layers),
                  "experts": mm.num_experts, "native_top_k": mm.native_top_k,
                  "hidden_size": int(mm.config.hidden_size), "expert_intermediate_size": mm.expert_intermediate_size,
                  "vocab_size": int(mm.config.vocab_size), "dtype": str(mm.dtype).replace("torch.", ""),
                  "device": str(mm.device)},
        "settings": {"lengths": lengths, "new_tokens": cfg.new_tokens, "itl_prompt": cfg.itl_prompt,
                     "batch_size": cfg.batch_size, "repeats": cfg.repeats, "warmup": cfg.warmup, "act": cfg.act,
                     "clock": cfg.clock, "decode_tokens": cfg.decode_tokens, "seed": cfg.seed,
                     "order": "interleaved, ABBA across repeats",
                     "runtime": runtime_desc},
        "variants": rows,
        "hook_overhead": _hook_overhead(mm, cfg, variants, metrics, samples, info),
        "dynamic_vs_static": _dynamic_vs_static(mm, variants, metrics, samples, info),
        "checks": checks,
    }


def _variant_row(mm, cfg, v: Variant, base: Variant, metrics: list[str], samples, info) -> dict:
    """One variant: Act, parameters, and per metric its timings, paired ratio to ``base``, limit, efficiency."""
    vi, bi = info[v.label], info[base.label]
    entry: dict[str, Any] = {"label": v.label, "plan": vi["plan"], "hook": v.hook, "runtime": v.runtime,
                             "base": base.label, "act": vi["act"], "act_per_layer": vi["act_per_layer"],
                             "act_decode": vi["act_decode"], "act_decode_per_layer": vi["act_decode_per_layer"],
                             "rules": {str(k): r for k, r in vi["rules"].items()},
                             "params_active": vi["cost"]["active_params"], "hook_params": vi["hook_params"],
                             "metrics": {}}
    for m in metrics:
        xs = samples[v.label][m]
        raw = _stats(xs)
        st: dict[str, Any] = {"median_ms": raw["median"] * 1e3, "min_ms": raw["min"] * 1e3,
                              "max_ms": raw["max"] * 1e3, "q25_ms": raw["q25"] * 1e3, "q75_ms": raw["q75"] * 1e3,
                              "n": raw["n"], "samples_ms": [x * 1e3 for x in xs]}
        if cfg.clock != "wall":
            wall = samples[v.label][f"wall:{m}"]
            w = _stats(wall)
            st["wall_clock"] = {"median_ms": w["median"] * 1e3, "min_ms": w["min"] * 1e3, "max_ms": w["max"] * 1e3}
            if v is not base:
                st["wall_clock"]["ratio"] = _paired(samples[base.label][f"wall:{m}"], wall)["median"]
        if m == "itl":
            st["e2e_median_ms"] = statistics.median(samples[v.label]["e2e"]) * 1e3
            limit = bi["cost_decode"]["decode_weight_bytes"] / vi["cost_decode"]["decode_weight_bytes"]
            st["weight_bytes_per_step"] = vi["cost_decode"]["decode_weight_bytes"]
            st["kv_bytes_per_step"] = kv_bytes_per_step(mm, cfg.itl_prompt + cfg.new_tokens // 2, cfg.batch_size)
        else:
            t = int(m.split("@")[1])
            fv = prefill_flops(mm, vi["cost"], t, cfg.batch_size)
            limit = prefill_flops(mm, bi["cost"], t, cfg.batch_size) / fv
            st["flops"] = fv
        if v is not base:
            ps = _paired(samples[base.label][m], xs)
            st["ratio"], st["ratio_min"], st["ratio_max"] = ps["median"], ps["min"], ps["max"]
            st["ratio_of_medians"] = statistics.median(samples[base.label][m]) / statistics.median(xs)
            st["limit"] = limit
            st["efficiency"] = (ps["median"] - 1) / (limit - 1) if abs(limit - 1) > 0.02 else None
        entry["metrics"][m] = st
    return entry


def _hook_overhead(mm, cfg, variants, metrics: list[str], samples, info) -> list[dict]:
    """"P + hook" against "P" under the same runtime: measured overhead and the cost model's expectation."""
    by_key = {(v.plan, v.hook, v.runtime): v for v in variants}
    overhead = []
    for v in variants:
        plain = by_key.get((v.plan, None, v.runtime)) if v.hook else None
        if plain is None:
            continue
        o: dict[str, Any] = {"variant": v.label, "without_hook": plain.label,
                             "hook_params": info[v.label]["hook_params"]}
        for m in metrics:
            ps = _paired(samples[v.label][m], samples[plain.label][m])
            hv, pv = info[v.label], info[plain.label]
            if m == "itl":
                expected = hv["cost_decode"]["decode_weight_bytes"] / pv["cost_decode"]["decode_weight_bytes"] - 1
            else:
                t = int(m.split("@")[1])
                expected = prefill_flops(mm, hv["cost"], t, cfg.batch_size) / prefill_flops(mm, pv["cost"], t,
                                                                                            cfg.batch_size) - 1
            o[m] = {"overhead": ps["median"] - 1, "min": ps["min"] - 1, "max": ps["max"] - 1, "expected": expected}
        overhead.append(o)
    return overhead


def _dynamic_vs_static(mm, variants, metrics: list[str], samples, info) -> list[dict]:
    """Dynamic rules against static plans of (about) the same Act, under the same runtime and Hook."""
    from hookmoe.routing.plan import Dynamic, Plan

    def is_dynamic(v):
        plan = v.resolved_plan if v.resolved_plan is not None else Plan.parse(v.plan)
        return any(isinstance(r, Dynamic) for r in plan.resolve(mm).values())

    out = []
    for v in variants:
        if not is_dynamic(v):
            continue
        for w in variants:
            if w is v or w.runtime != v.runtime or w.hook != v.hook or is_dynamic(w):
                continue
            a_v, a_w = info[v.label]["act"], info[w.label]["act"]
            if abs(a_v - a_w) > 0.05 * a_w:
                continue
            d: dict[str, Any] = {"dynamic": v.label, "static": w.label, "act_dynamic": a_v, "act_static": a_w,
                                 "act_decode_dynamic": info[v.label]["act_decode"],
                                 "act_decode_static": info[w.label]["act_decode"]}
            for m in metrics:
                ps = _paired(samples[v.label][m], samples[w.label][m])
                d[m] = {"slowdown": ps["median"] - 1, "min": ps["min"] - 1, "max": ps["max"] - 1}
            out.append(d)
    return out


def _busy_note(mm, clock: str) -> str | None:
    """A hint when CPU timings are at the mercy of other jobs (OpenMP threads stall when cores are shared)."""
    if mm.device.type != "cpu" or clock == "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > cores - 0.5:
        return (f"the machine is busy (load {load:.1f} on {cores} cores): for stable CPU timings use "
                "--threads 1 --clock cpu")
    return None
