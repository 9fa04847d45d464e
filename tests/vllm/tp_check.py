"""Run by test_vllm_plugin.py in a subprocess: tensor parallelism 2 on vLLM's CPU backend with hookmoe's plugin
(per-layer k + a Hook) against hookmoe's own path. Prints one JSON line."""

import json
import sys
from pathlib import Path

import vllm_helpers as H


def main(work: Path) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import hookmoe
    from hookmoe.serving import export_for_engine

    mm = H.tiny_mm("mixtral")
    plan = "layers:2,1,1,2"
    hook = H.make_hook(mm, [1], work / "hook", plan)
    out = export_for_engine(mm, work / "out", plan=plan, hook=hook, target="vllm").path
    llm = LLM(model=str(out), dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0,
              skip_tokenizer_init=True, tensor_parallel_size=2, distributed_executor_backend="mp")
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in H.PROMPTS],
                        SamplingParams(temperature=0, max_tokens=H.NEW_TOKENS, logprobs=H.LOGPROBS, detokenize=False,
                                       ignore_eos=True), use_tqdm=False)
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "logprobs": [[{int(t): float(lp.logprob) for t, lp in step.items()} for step in o.outputs[0].logprobs]
                        for o in outs]}
    ref = H.reference_logprobs(hookmoe.load(str(out), device="cpu"), H.PROMPTS, res["tokens"])
    print("RESULT " + json.dumps({"diff": H.max_logprob_diff(res, ref),
                                  "greedy_equal": [t == lp.argmax(-1).tolist() for t, lp in zip(res["tokens"], ref)]}),
          flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
