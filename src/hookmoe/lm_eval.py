"""``python -m hookmoe.lm_eval ...``: lm-evaluation-harness's own command line with the ``hookmoe`` model type.

lm-eval has no plugin discovery, so this entry point imports :mod:`hookmoe.lm_eval_model` (which registers
``--model hookmoe``) and then runs lm-eval's CLI unchanged — every option of ``lm-eval run`` works::

    python -m hookmoe.lm_eval --model hookmoe \\
        --model_args pretrained=mistralai/Mixtral-8x7B-v0.1,plan=tlnle:k=2,l=16,hook=runs/hook \\
        --tasks arc_easy --batch_size 8 --output_path results/
    accelerate launch -m hookmoe.lm_eval --model hookmoe --model_args pretrained=... --tasks arc_easy

After lm-eval's table it prints one line per evaluated hookmoe model: the plan and the measured Act (real tokens
only); ``--output_path`` / ``--show_config`` JSON carries ``act`` and ``act_per_layer`` under ``config``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from hookmoe.errors import UserError

    try:
        from lm_eval.__main__ import cli_evaluate

        from hookmoe.eval.lm_eval_model import reports
    except (ImportError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
    for r in reports():
        if r.get("act") is None:
            continue
        per = ", ".join(f"{i}: {a:.3f}" for i, a in r["act_per_layer"].items())
        print(f"hookmoe: plan {r['plan']}, Act {r['act']:.4f} over {int(r['tokens'])} real tokens "
              f"(native k = {r['native_top_k']}); per layer: {per}")


if __name__ == "__main__":
    main()
