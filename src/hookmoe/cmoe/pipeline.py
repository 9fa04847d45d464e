"""``hookmoe convert`` as one library call: load the dense model (optionally placed across devices, CPU and disk),
convert it, calibrate its routers, distill it, and write the MoE directory (:func:`run_convert`)."""

from __future__ import annotations

from hookmoe.cmoe.calibrate import calibrate_routers
from hookmoe.cmoe.convert import ConvertOptions, convert_dense, save_converted
from hookmoe.cmoe.distill import distill_moe
from hookmoe.errors import ConversionError


def run_convert(o: ConvertOptions, *, progress: bool | None = None):
    """Convert ``o.dense_model`` with the settings of ``o`` and write it to ``o.out`` (replaced only once the new
    model is complete; an existing folder is refused unless overwriting, before anything loads). Returns the MoE."""
    from hookmoe.data.blocks import make_blocks
    from hookmoe.files import atomic_dir, check_output
    from hookmoe.models.loading import load_causal_lm

    progress = o.progress if progress is None else progress
    check_output(o.out, kind="dir", flag="--out")  # before minutes of loading and converting
    dense, tok = load_causal_lm(o.dense_model, seed=o.seed, **o.load_kwargs())
    if tok is None:
        raise ConversionError(f"'{o.dense_model}' has no tokenizer; calibration text cannot be tokenised")
    blocks = make_blocks(tok, o.calib, o.calib_blocks, o.seq_len, split="train", seed=o.seed)
    moe = convert_dense(dense, tok, blocks, num_experts=o.experts, num_shared=o.shared, top_k=o.top_k,
                        activation_topk=o.activation_topk, seed=o.seed, progress=progress)
    if o.calibrate_steps > 0:
        more = make_blocks(tok, o.calib, 16, o.seq_len, split="train", seed=o.seed + 1)
        calibrate_routers(moe, dense, more, steps=o.calibrate_steps, rank_target=o.calibrate_target,
                          mse_weight=o.calibrate_mse_weight, seed=o.seed, progress=progress)
    if o.finetune_steps > 0:
        ft = make_blocks(tok, o.calib, o.finetune_blocks, min(o.seq_len, 256), split="train", seed=o.seed + 2)
        distill_moe(moe, dense, ft, steps=o.finetune_steps, lr=o.finetune_lr, seed=o.seed, train=o.finetune_train,
                    hidden_weight=o.finetune_hidden_weight, progress=progress)
    with atomic_dir(o.out) as work:  # a model already there is replaced only once the new one is complete
        save_converted(moe, tok, work)
    return moe
