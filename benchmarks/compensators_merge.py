"""Merge the per-run JSON files of benchmarks/compensators_demo.py (/tmp/comp/r_*.json, x_*.json) into one results file:
    python benchmarks/compensators_merge.py benchmarks/results/compensators_demo.json
"""
import json, glob, sys
out = {"description": "Compensators on the demo model (SmolLM2-135M -> CMoE E6 S2 K4, routers calibrated 60 steps + 45 "
       "expert fine-tune steps, as hookmoe demo builds it) at top-3 (Act 3.0). Every compensator trained with the same "
       "data (builtin train split, seed 2, 256-token blocks), steps, batch, lr and objective (KD to the native model, "
       "top-32 teacher cache); held-out perplexity on builtin heldout blocks (seed 0, 512 tokens). One process per run "
       "(OMP_NUM_THREADS=1), run concurrently on a shared 2-core VM.",
       "build_model": "PYTHONPATH=src python benchmarks/compensators_build_moe.py /tmp/comp/moe",
       "commands": [], "runs": {}}
for f in sorted(glob.glob("/tmp/comp/r_*.json") + glob.glob("/tmp/comp/x_*.json") + glob.glob("/tmp/comp/x40_*.json")):
    r = json.load(open(f))
    out["commands"] += r.get("commands", [])
    for name, rec in r["runs"].items():
        rec.update(steps=r.get("steps"), lr=r.get("lr"))
        if name in out["runs"]:  # the same run with other settings (more steps, another lr)
            name = f"{name} ({r.get('steps')} steps, lr {r.get('lr')})"
        out["runs"][name] = rec
    for k in ("model_params", "plan", "steps", "batch", "lr", "train_seq_len", "eval", "objective", "torch_threads"):
        out.setdefault(k, r.get(k))
native = out["runs"].get("none@native", {}).get("ppl")
base = out["runs"].get(f"none@{out['plan']}", {}).get("ppl")
for name, rec in out["runs"].items():
    if native and base:
        rec["vs_native_pct"] = 100.0 * (rec["ppl"] / native - 1)
        rec["gap_recovered_pct"] = 100.0 * (base - rec["ppl"]) / (base - native)
if native:
    out["targets"] = {"best_within_15pct_of_native": min(r["ppl"] for n, r in out["runs"].items() if r.get("params", 0) and r.get("params_pct", 0) <= 1.0) <= 1.15 * native if len(out["runs"]) > 2 else None,
                      "target_ppl_15pct": 1.15 * native,
                      "hook_family_recovery_ge_60pct": max([r["gap_recovered_pct"] for n, r in out["runs"].items() if n.startswith("hook") and r.get("params_pct", 9) <= 1.0] or [float("nan")]) >= 60}
out["notes"] = (
    "Targets not reached (best: hook at 1 % of the parameters, 30 layers x width 39). What bounds the frontier here is "
    "the training budget, not the parameter budget: the shared 2-core VM ran 5 concurrent runs at ~13 % of a core "
    "each, so each compensator got 10 steps x 4 x 256 tokens (the demo's Hook gets 90); the Hook's recovery grows with "
    "steps (10 steps 18.7 %, 20 steps 22.1 %, 40 steps 29.2 %; hook+router 14.0 % at 10 steps, 29.9 % at 40 steps; the demo's 90-step Hook at width 96 = 2.5 % params recovered 37.8 % on "
    "16 blocks). The router retune (0.08 % params) barely moves in 10 steps at lr 3e-3 and overshoots at 3e-2 (the "
    "CMoE router's only gradient is its straight-through estimator; weights of kept experts are fixed at 1, so the KD "
    "signal reaches the router only through which experts are selected). Output corrections trail the Hook at equal "
    "parameters. Evaluation: 8 x 512 held-out tokens (not the demo's 16), so absolute numbers differ from README's "
    "table (native 28.12 here vs 34.91 on 16 blocks).")
json.dump(out, open(sys.argv[1], "w"), indent=1)
for n, r in out["runs"].items():
    print(f"{n:24s} ppl {r['ppl']:.2f} params {r.get('params', 0):>9,} ({r.get('params_pct', 0):.2f}%) vs native {r.get('vs_native_pct', float('nan')):+.1f}% recovered {r.get('gap_recovered_pct', float('nan')):.1f}%")
print(out.get("targets"))
