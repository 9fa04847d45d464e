"""Build the demo's MoE (SmolLM2 -> CMoE E6 S2 K4, 60 router-calibration steps, 45 expert fine-tune steps), with the
demo's data seeds and budgets, and save it for benchmarks/compensators_demo.py.

    PYTHONPATH=src python benchmarks/compensators_build_moe.py /tmp/comp/moe
"""
import sys
import time


from hookmoe import cmoe as cv
from hookmoe.data.blocks import make_blocks
from hookmoe.demo import DemoConfig, locate_model, resolve_budgets
from hookmoe.models.loading import load_causal_lm

out = sys.argv[1]
cfg = resolve_budgets(DemoConfig())
t0 = time.perf_counter()
dense, tok = load_causal_lm(str(locate_model(cfg.model)), dtype="float32", device="cpu")
kw = dict(seed=cfg.seed, progress=False)
convert_blocks = make_blocks(tok, cfg.calib_src, cfg.convert_blocks, cfg.seq_len, split="train", **kw)
router_blocks = make_blocks(tok, cfg.calib_src, cfg.router_blocks, cfg.seq_len, split="train", seed=cfg.seed + 1,
                            progress=False)
finetune_blocks = make_blocks(tok, cfg.calib_src, cfg.finetune_blocks, cfg.finetune_seq_len, split="train",
                              seed=cfg.seed + 4, progress=False)
moe = cv.convert_dense(dense, tok, convert_blocks, num_experts=cfg.experts, num_shared=cfg.shared, top_k=cfg.top_k,
                       seed=cfg.seed, progress=False)
cv.calibrate_routers(moe, dense, router_blocks, steps=cfg.router_steps, seed=cfg.seed, progress=False)
cv.distill_moe(moe, dense, finetune_blocks, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
               batch_size=cfg.finetune_batch, train=cfg.finetune_train, seed=cfg.seed, progress=False)
cv.save_converted(moe, tok, out)
print(f"saved {out} in {time.perf_counter() - t0:.0f} s", flush=True)
