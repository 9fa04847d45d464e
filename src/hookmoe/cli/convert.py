"""``hookmoe convert``: a dense model into an MoE (CMoE), with optional router calibration and distillation."""

from __future__ import annotations

from typing import Optional




def register_cli(app) -> None:
    import typer

    @app.command()
    def convert(dense_model: str = typer.Argument(..., help="dense llama / qwen2 / gemma3 model: hub id, dir, "
                                                             ".gguf, smollm2 or gemma3-270m"),
                experts: int = typer.Option(16, "--experts", help="routed experts per FFN"),
                shared: int = typer.Option(2, "--shared", help="shared (always-on) experts per FFN"),
                top_k: int = typer.Option(2, "--top-k", help="native k of the converted MoE"),
                out: str = typer.Option(..., "--out", help="output directory (a normal transformers model dir)"),
                calib: str = typer.Option("builtin", help="calibration text source"),
                calib_blocks: int = typer.Option(8, help="blocks for activation profiling"),
                seq_len: int = typer.Option(512, help="tokens per block"),
                calibrate_steps: int = typer.Option(0, "--calibrate-steps",
                                                    help="router calibration steps against the dense model (0 = off)"),
                calibrate_target: str = typer.Option(
                    "auto", "--calibrate-target",
                    help="experts the router learns to pick: gain (best fit to the dense FFN), norm (largest "
                         "outputs; better for many small experts) or auto (norm from 16 routed experts on)"),
                calibrate_mse_weight: Optional[float] = typer.Option(
                    None, "--calibrate-mse-weight",
                    help="weight of the routed-output MSE term in router calibration (0 = ranking loss only; "
                         "default: 1 below 16 routed experts, 0 from 16 on)"),
                finetune_steps: int = typer.Option(0, "--finetune-steps",
                                                   help="KD fine-tune steps of the MoE blocks against the dense model "
                                                        "(0 = off; experts then no longer sum to the dense FFN)"),
                finetune_lr: float = typer.Option(3e-4, "--finetune-lr"),
                finetune_train: str = typer.Option("experts", "--finetune-train",
                                                   help="what the fine-tune trains: experts (routers frozen; "
                                                        "measured best), moe (routers + experts) or routers"),
                finetune_hidden_weight: float = typer.Option(
                    0.0, "--finetune-hidden-weight",
                    help="add layer-wise hidden-state distillation with this weight (0 = KL on logits only)"),
                finetune_blocks: int = typer.Option(64, help="blocks of fine-tune text"),
                activation_topk: Optional[int] = typer.Option(None, help="K_a: neurons marked per token when "
                                                                         "profiling (default: FFN size / 16)"),
                seed: int = typer.Option(0),
                no_progress: bool = typer.Option(False, "--no-progress")):
        """CMoE: convert a dense model into an MoE (training-free; optional router calibration and KD fine-tune)."""
        from hookmoe.cli.common import progress_bars
        from hookmoe.data.blocks import make_blocks
        from hookmoe.errors import UserError
        from hookmoe.files import atomic_dir, check_output
        from hookmoe.models.loading import load_causal_lm

        try:  # the converted-model class needs transformers >= 5.23; every other command works without it
            from hookmoe.cmoe.calibrate import RANK_TARGETS, calibrate_routers
            from hookmoe.cmoe.convert import convert_dense, save_converted
            from hookmoe.cmoe.distill import distill_moe
        except ImportError as e:
            raise UserError(f"hookmoe convert needs transformers >= 5.23 ({e})") from None
        if calibrate_target not in ("auto",) + RANK_TARGETS:  # refused before minutes of loading and converting
            raise UserError(f"--calibrate-target must be auto, {' or '.join(RANK_TARGETS)}; got '{calibrate_target}'")
        if calibrate_mse_weight is not None and calibrate_mse_weight < 0:
            raise UserError(f"--calibrate-mse-weight must be >= 0, got {calibrate_mse_weight}")
        check_output(out, kind="dir", flag="--out")  # before minutes of loading and converting
        with progress_bars(not no_progress):  # transformers' loading bars too
            dense, tok = load_causal_lm(dense_model, dtype="float32", device="cpu")
            if tok is None:
                raise UserError(f"'{dense_model}' has no tokenizer; calibration text cannot be tokenised")
            blocks = make_blocks(tok, calib, calib_blocks, seq_len, split="train", seed=seed)
            moe = convert_dense(dense, tok, blocks, num_experts=experts, num_shared=shared, top_k=top_k,
                                activation_topk=activation_topk, seed=seed, progress=not no_progress)
            if calibrate_steps > 0:
                more = make_blocks(tok, calib, 16, seq_len, split="train", seed=seed + 1)
                calibrate_routers(moe, dense, more, steps=calibrate_steps, rank_target=calibrate_target,
                                  mse_weight=calibrate_mse_weight, seed=seed, progress=not no_progress)
            if finetune_steps > 0:
                ft = make_blocks(tok, calib, finetune_blocks, min(seq_len, 256), split="train", seed=seed + 2)
                distill_moe(moe, dense, ft, steps=finetune_steps, lr=finetune_lr, seed=seed,
                            train=finetune_train, hidden_weight=finetune_hidden_weight,
                            progress=not no_progress)
            with atomic_dir(out) as work:  # a model already there is replaced only once the new one is complete
                save_converted(moe, tok, work)
            print(f"converted {dense_model}: {experts} routed + {shared} shared experts per FFN, top-{top_k} -> {out}")
