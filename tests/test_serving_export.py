"""Engine export format (main environment, no vLLM): plain checkpoint for a uniform top-k, hookmoe format otherwise."""

import json

import pytest
import torch

import hookmoe
from hookmoe.errors import ArtifactError, ModelError, PlanError
from hookmoe.hook import insert_hooks, remove_hooks
from hookmoe.models import MoEModel, build_tiny, tiny_tokenizer
from hookmoe.serving import export_for_engine, read_spec


def _mm(arch="mixtral"):
    return MoEModel(build_tiny(arch, seed=0), tiny_tokenizer(), source=f"tiny:{arch}")


@pytest.mark.parametrize("arch,k", [("mixtral", 1), ("qwen2_moe", 2)])
def test_uniform_topk_export_loads_in_plain_transformers_as_the_reduced_model(tmp_path, ids, arch, k):
    from transformers import AutoModelForCausalLM

    mm = _mm(arch)
    out = export_for_engine(mm, tmp_path / "out", plan=f"topk:{k}", target="vllm")
    assert out.format == "plain" and out.top_k == k
    cfg = json.loads((out.path / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == k and cfg["architectures"][0].startswith(type(mm.model).__name__[:5])
    assert mm.config.num_experts_per_tok != k  # the in-memory model is left as it was
    plain = AutoModelForCausalLM.from_pretrained(str(out.path), dtype=torch.float32).eval()  # no hookmoe involved
    with torch.no_grad():
        got = plain(input_ids=ids).logits
        with mm.routing(f"topk:{k}"):
            want = mm.model(input_ids=ids).logits
        native = mm.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - native).abs().max() > 1e-2  # the reduction is real
    # hookmoe.load(OUT) agrees (the export manifest records the plan)
    re = hookmoe.load(str(out.path), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(re.model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_plan_or_hook_export_names_hookmoe_classes_and_carries_them(tmp_path, ids):
    mm = _mm("mixtral")
    hs = insert_hooks(mm, [1], init="paper", seed=1)
    hs.save_pretrained(tmp_path / "hook", plan="layers:2,1,1,2")
    remove_hooks(mm)
    out = export_for_engine(mm, tmp_path / "out", plan="layers:2,1,1,2", hook=tmp_path / "hook", target="vllm")
    cfg = json.loads((out.path / "config.json").read_text())
    assert out.format == "hookmoe" and cfg["architectures"] == ["HookmoeMixtralForCausalLM"]
    assert (out.path / "hook" / "hook.safetensors").is_file() and (out.path / "plan.json").is_file()
    spec = read_spec(out.path)
    assert {i: spec.top_k(i) for i in spec.rules} == {0: 2, 1: 1, 2: 1, 3: 2} and spec.hook_layers == [1]
    # a Hook alone (uniform plan) still needs the hookmoe format; --target transformers keeps the native class
    out2 = export_for_engine(mm, tmp_path / "out2", plan="topk:1", hook=tmp_path / "hook", target="transformers")
    assert out2.format == "hookmoe"
    assert json.loads((out2.path / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    # hookmoe.load restores plan + Hook from either
    a, b = hookmoe.load(str(out.path), device="cpu"), hookmoe.load(str(out2.path), device="cpu")
    assert a.hookset is not None and a.active_plan.per_layer()[1] == "topk:1"
    assert b.hookset is not None


def test_bad_exports_are_refused_with_one_sentence(tmp_path):
    mm = _mm("mixtral")
    hs = insert_hooks(mm, [1], init="paper", seed=1)
    hs.save_pretrained(tmp_path / "hook", plan="topk:1")
    remove_hooks(mm)
    out = export_for_engine(mm, tmp_path / "out", plan="topk:1", hook=tmp_path / "hook", target="vllm").path
    (out / "plan.json").write_text(json.dumps({"format": "hookmoe-plan/1", "base": "layers:1,1,2"}))
    with pytest.raises(PlanError, match="does not fit this mixtral model"):
        read_spec(out)
    (out / "plan.json").write_text(json.dumps({"format": "hookmoe-plan/1", "base": "topk:1"}))
    (out / "hook" / "hook.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        read_spec(out)
    # architectures the plugin does not serve are refused at export for --target vllm
    with pytest.raises(ModelError, match="vLLM cannot serve"):
        export_for_engine(_mm("granitemoe"), tmp_path / "g", plan="layers:2,1,1,2", target="vllm")
    # never overwrite a user's directory
    with pytest.raises(ArtifactError, match="not empty"):
        export_for_engine(mm, out, plan="topk:1", target="vllm")


def test_cli_export_target(tmp_path):
    from hookmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "tiny:mixtral", "--plan", "topk:1", "--out", str(tmp_path / "o"), "--target", "vllm"])
    assert e.value.code == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_experts_per_tok"] == 1
    with pytest.raises(SystemExit) as e:
        main(["export", "tiny:mixtral", "--plan", "topk:1", "--out", str(tmp_path / "p"), "--target", "sglang"])
    assert e.value.code == 2


def test_vllm_plugin_imports_without_vllm():
    import importlib.util

    import hookmoe.serving.vllm_plugin as plugin

    names = plugin.architectures()
    assert "HookmoeMixtralForCausalLM" in names and "HookmoeQwen2MoeForCausalLM" in names
    assert all(v.startswith("hookmoe.serving.vllm_models:") for v in names.values())
    if importlib.util.find_spec("vllm") is None or not str(importlib.util.find_spec("vllm").origin).endswith(".py"):
        with pytest.raises(ImportError):
            plugin.register()  # vLLM is imported only when vLLM itself calls the plugin
