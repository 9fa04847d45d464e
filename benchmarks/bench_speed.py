"""Speed benchmarks of issue 5 (fewer experts => faster): writes benchmarks/results/bench_<name>.json (+ .png).

Every run is one ``hookmoe bench`` command (recorded verbatim in its JSON, with machine and versions).
Random-weight models with the real shapes of Mixtral-8x7B and Qwen1.5-MoE-A2.7B, scaled to fit a 2-core /
24 GiB CPU machine (``--scale F``: hidden/intermediate/vocab sizes and head count divided by F; ``--layers N``:
the vocabulary also shrinks with the depth so the LM head keeps its real share and the theoretical limits
equal the real models').

On a shared machine, CPU timings use one thread and the process CPU clock (``--threads 1 --clock cpu``):
OpenMP threads stall when other jobs hold the cores, and the CPU clock excludes preemption. Wall-clock
times are recorded beside them in the JSON (``wall_clock``).

    python benchmarks/bench_speed.py --list
    python benchmarks/bench_speed.py                 # all runs (about 15-20 minutes on 2 shared cores)
    python benchmarks/bench_speed.py --only mixtral_s8
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CPU = ["--threads", "1", "--clock", "cpu"]
MIXTRAL = ["mixtral-8x7b", "--random-weights"]
QWEN = ["qwen1.5-moe-a2.7b", "--random-weights"]

RUNS: dict[str, tuple[str, list[str]]] = {
    # native -> reduced k at every prompt length and for decode, a static plan and a dynamic rule at Act 1.5
    "mixtral_s8": ("Mixtral-8x7B shapes /8, 4 layers: native vs top-1, TLNLE vs NAEE at Act 1.5",
                   MIXTRAL + ["--scale", "8", "--layers", "4", "--plan", "native", "--plan", "topk:1",
                              "--plan", "tlnle:k=2,l=2", "--plan", "naee", "--act", "1.5",
                              "--lengths", "1024,2048,4096", "--new-tokens", "256", "--itl-prompt", "128",
                              "--repeats", "3"] + CPU),
    # the Hook's cost at the real depth (one Hook in 32 layers: +1.65% active parameters, as in Mixtral)
    "mixtral_s8_hook": ("Mixtral-8x7B shapes /8, all 32 layers: top-1 vs top-1 + Hook (paper shape, layer 16)",
                        MIXTRAL + ["--scale", "8", "--layers", "32", "--plan", "topk:1", "--plan", "topk:1@random",
                                   "--lengths", "1024", "--new-tokens", "128", "--repeats", "7"] + CPU),
    # decode at larger shapes: the fixed per-layer framework overhead weighs less
    "mixtral_s4_decode": ("Mixtral-8x7B shapes /4, 4 layers: decode only",
                          MIXTRAL + ["--scale", "4", "--layers", "4", "--plan", "native", "--plan", "topk:1",
                                     "--lengths", "none", "--new-tokens", "256", "--repeats", "3"] + CPU),
    "mixtral_s2_decode": ("Mixtral-8x7B shapes /2, 2 layers: decode only, native vs top-1, top-1 vs ratio at Act 1",
                          MIXTRAL + ["--scale", "2", "--layers", "2", "--plan", "native", "--plan", "topk:1",
                                     "--plan", "ratio:0.5", "--act", "1.02",
                                     "--lengths", "none", "--new-tokens", "256", "--repeats", "5"] + CPU),
    # the same plans through stock transformers (model.generate, grouped_mm experts) and through the runtime
    "mixtral_s8_stock": ("Mixtral-8x7B shapes /8, 4 layers: hookmoe runtime vs stock transformers",
                         MIXTRAL + ["--scale", "8", "--layers", "4", "--plan", "native", "--plan", "topk:1",
                                    "--runtime", "both", "--lengths", "1024", "--new-tokens", "256",
                                    "--repeats", "3"] + CPU),
    # Qwen: native top-4 -> top-1; dynamic top-p calibrated to Act 2 against static top-2 (uniform, same Act)
    "qwen_s8": ("Qwen1.5-MoE-A2.7B shapes /8, 8 layers: native (top-4) vs top-1, top-2 vs top-p at Act 2",
                QWEN + ["--scale", "8", "--layers", "8", "--plan", "native", "--plan", "topk:1",
                        "--plan", "topk:2", "--plan", "topp:0.5", "--act", "2",
                        "--lengths", "1024,2048,4096", "--new-tokens", "256", "--itl-prompt", "128",
                        "--repeats", "5"] + CPU),
    # decode at larger shapes (the fixed per-layer framework overhead weighs less), with a dynamic rule
    "qwen_s2_decode": ("Qwen1.5-MoE-A2.7B shapes /2, 4 layers: decode only, native vs top-1, top-2 vs top-p at Act 2",
                       QWEN + ["--scale", "2", "--layers", "4", "--plan", "native", "--plan", "topk:1",
                               "--plan", "topk:2", "--plan", "topp:0.5", "--act", "2",
                               "--lengths", "none", "--new-tokens", "256", "--repeats", "5"] + CPU),
    # the real (unscaled) Qwen shapes, 2 of 24 layers: fixed per-layer costs weigh as in the real model
    "qwen_s1_decode": ("Qwen1.5-MoE-A2.7B real shapes (unscaled), 2 layers: decode only, native vs top-1, "
                       "top-2 vs top-p at Act 2",
                       QWEN + ["--scale", "1", "--layers", "2", "--plan", "native", "--plan", "topk:1",
                               "--plan", "topk:2", "--plan", "topp:0.5", "--act", "2",
                               "--lengths", "none", "--new-tokens", "128", "--repeats", "7"] + CPU),
    # the real Qwen shapes for prompts too, so that one scale per model covers prefill and decode
    "qwen_s1_prefill": ("Qwen1.5-MoE-A2.7B real shapes (unscaled), 2 layers: prefill only, native vs top-1, "
                        "top-2 vs top-p at Act 2",
                        QWEN + ["--scale", "1", "--layers", "2", "--plan", "native", "--plan", "topk:1",
                                "--plan", "topk:2", "--plan", "topp:0.5", "--act", "2",
                                "--lengths", "1024,2048,4096", "--new-tokens", "0", "--repeats", "3"] + CPU),
    # prefill at larger shapes (the per-call costs of the expert products weigh less: see SPEED.md)
    "mixtral_s2_prefill": ("Mixtral-8x7B shapes /2, 2 layers: prefill only, native vs top-1",
                           MIXTRAL + ["--scale", "2", "--layers", "2", "--plan", "native", "--plan", "topk:1",
                                      "--lengths", "1024,2048,4096", "--new-tokens", "0", "--repeats", "5"] + CPU),
    # 7 short repeats: a paired median robust to the occasional stall of a shared machine
    "qwen_s8_hook": ("Qwen1.5-MoE-A2.7B shapes /8, all 24 layers: top-1 vs top-1 + Hook (paper shape)",
                     QWEN + ["--scale", "8", "--layers", "24", "--plan", "topk:1", "--plan", "topk:1@random",
                             "--lengths", "1024", "--new-tokens", "128", "--repeats", "7"] + CPU),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these (see --list)")
    ap.add_argument("--list", action="store_true", help="list the runs and exit")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, cmd) in RUNS.items():
            print(f"{name:18s} {what}\n{'':18s} hookmoe bench {shlex.join(cmd)}")
        return 0
    names = args.only or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"unknown run(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    hookmoe = Path(sys.executable).with_name("hookmoe")
    exe = [str(hookmoe)] if hookmoe.exists() else [sys.executable, "-m", "hookmoe.cli"]
    for name in names:
        what, cmd = RUNS[name]
        out = args.out / f"bench_{name}.json"
        full = exe + ["bench"] + cmd + ["--json", str(out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd())
                                                     else out)]
        print(f"== {name}: {what}\n   {shlex.join(['hookmoe'] + full[len(exe):])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(full)
        print(f"   done in {time.time() - t0:.0f} s (exit {rc})", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
