"""`hookmoe info MODEL --memory`: bytes from the config alone, checked against hand calculations."""

import json

import pytest

from conftest import run_cli

from hookmoe.models.memory import estimate_memory

# Mixtral-8x7B's shape (https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json)
H, L, E, F, V, HEADS, KVH, K = 4096, 32, 8, 14336, 32000, 32, 8, 2
HD = H // HEADS
MIXTRAL_CFG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H, "intermediate_size": F,
    "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KVH, "num_local_experts": E,
    "num_experts_per_tok": K, "vocab_size": V, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

# hand calculation: per layer q,o (h*h each) + k,v (h*kvh*hd each) + router (h*E) + 2 norms + E experts of 3*h*f;
# embeddings + LM head (untied) + final norm
EXPERT = 3 * H * F
NON_EXPERT_LAYER = 2 * H * H + 2 * H * KVH * HD + H * E + 2 * H
TOTAL = L * (NON_EXPERT_LAYER + E * EXPERT) + 2 * V * H + H
DENSE_PART = TOTAL - L * E * EXPERT


run = run_cli  # conftest: hookmoe ARGV in-process -> (status, stdout, stderr)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral-8x7b-config")
    (d / "config.json").write_text(json.dumps(MIXTRAL_CFG))  # no weights, no tokenizer
    return d


def test_hand_calculation_is_the_known_size():
    assert TOTAL == 46_702_792_704  # Mixtral-8x7B's published 46.7B parameters


def test_mixtral_8x7b_shape_from_a_config_only_directory(mixtral_dir, capsys):
    code, out, err = run(["info", str(mixtral_dir), "--memory", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["params_total"] == TOTAL
    assert d["weight_bytes"] == TOTAL * 2  # bf16 by default
    assert d["params_active"] == DENSE_PART + L * K * EXPERT == 12_879_925_248
    assert d["kv_bytes_per_1k_tokens"] == 2 * L * KVH * HD * 1024 * 2 == 128 * 2 ** 20
    assert d["kv_bytes"] == 2 * L * KVH * HD * 2048 * 2  # batch 1 x 2048 tokens
    # device suggestion: 87 GiB of bf16 weights do not fit one 80 GiB GPU, do fit two
    assert d["inference"]["gpus"] == 2 and d["hook_training"]["gpus"] == 2
    # fp32 weights: 4 bytes per parameter -> 3 GPUs of 80 GiB (174 GiB / 72 GiB usable)
    code, out, err = run(["info", str(mixtral_dir), "--memory", "--json", "--dtype", "float32"], capsys)
    d32 = json.loads(out)
    assert d32["weight_bytes"] == TOTAL * 4 and d32["kv_bytes_per_1k_tokens"] == 2 * L * KVH * HD * 1024 * 4
    assert d32["inference"]["gpus"] == 3
    code, out, err = run(["info", str(mixtral_dir), "--memory", "--json", "--gpus", "1", "--gpu-memory", "141"], capsys)
    d = json.loads(out)  # one 141 GiB GPU holds the bf16 weights for inference
    assert d["inference"]["on_devices"]["fits"] and d["inference"]["gpus"] == 1


@pytest.mark.parametrize("plan,ks", [("native", [2] * 32), ("topk:1", [1] * 32),
                                     ("tlnle:k=2,l=16", [2] * 16 + [1] * 16)])
def test_active_params_under_plans(mixtral_dir, plan, ks):
    d = estimate_memory(str(mixtral_dir), plan=plan)
    assert d["params_active"] == DENSE_PART + sum(ks) * EXPERT
    assert d["params_total"] == TOTAL and d["notes"] == []


def test_hook_training_formula(mixtral_dir):
    """Hook at layer 14, batch 2 x 1024, kd objective: the documented formula, term by term."""
    d = estimate_memory(str(mixtral_dir), plan="topk:1", batch=2, seq_len=1024, hook_layers=[14])
    tr = d["hook_training"]
    tokens = 2 * 1024
    hook_params = 2 * H * F + 1  # Linear1 + Linear2 (width = expert size for a coarse MoE) + r
    assert tr["hook_params"] == hook_params and tr["hook_state"] == 16 * hook_params
    assert tr["logits"] == 3 * V * tokens * 4  # kd: logits, their gradient, the teacher's log-probs
    e = 2
    attn = e * (H + 2 * H + 2 * KVH * HD + 2 * HD) + 4 + 4 * HEADS
    moe = 4 * E + 1 * (e * (3 * F + H) + 28)  # topk:1, without the norm
    norm = e * H + 4
    hook = e * (2 * H + F)
    assert tr["activation_layers"] == L - 14
    expected = (L - 15) * (attn + norm + moe) + moe + hook + norm
    assert tr["activations"] == pytest.approx(expected * tokens)
    assert tr["transient"] == pytest.approx((attn + norm + moe) * tokens)
    assert tr["total"] == pytest.approx(TOTAL * 2 + 16 * hook_params + tr["activations"] + tr["logits"]
                                        + tr["transient"])
    # checkpointing keeps one hidden state per layer + one layer's activations
    ck = estimate_memory(str(mixtral_dir), plan="topk:1", batch=2, seq_len=1024, hook_layers=[14],
                         grad_checkpointing=True)["hook_training"]
    assert ck["activations"] == pytest.approx(((L - 14) * e * H + attn + norm + moe + hook + norm) * tokens)


def test_tiny_mixtral_cli(capsys):
    code, out, err = run(["info", "tiny:mixtral", "--memory", "--json", "--plan", "topk:1"], capsys)
    assert code == 0, err
    d = json.loads(out)
    # tiny:mixtral: hidden 64, 4 layers, 8 experts of 64, 4 heads (hd 16), 2 kv heads, vocab 260, untied
    h, layers, e, f, v, kvh, hd = 64, 4, 8, 64, 260, 2, 16
    expert = 3 * h * f
    layer = 2 * h * h + 2 * h * kvh * hd + h * e + 2 * h
    total = layers * (layer + e * expert) + 2 * v * h + h
    assert d["params_total"] == total and d["weight_bytes"] == 2 * total
    assert d["params_active"] == total - layers * e * expert + layers * 1 * expert
    assert d["kv_bytes_per_1k_tokens"] == 2 * layers * kvh * hd * 1024 * 2
    code, out, err = run(["info", "tiny:mixtral", "--memory"], capsys)  # the table
    assert code == 0 and "KV cache / 1k tokens" in out and "Hook training" in out


def test_mla_and_sliding_window_caches():
    # DeepSeek-V2 MLA: the compressed latent (kv_lora_rank 16) + the shared rope key (8) per layer and token
    d = estimate_memory("tiny:deepseek_v2", dtype="fp32")
    assert d["kv_bytes_per_1k_tokens"] == 4 * (16 + 8) * 1024 * 4 and d["attention"] == "mla"
    # GPT-OSS: 2 of 4 layers slide over 64 tokens
    d = estimate_memory("tiny:gpt_oss", dtype="bf16", seq_len=4096)
    per_tok = 2 * 2 * 16 * 2
    assert d["kv_bytes_per_1k_tokens"] == 2 * per_tok * 1024 + 2 * per_tok * 64
    assert d["kv_bytes"] == 2 * per_tok * 4096 + 2 * per_tok * 64


def test_dynamic_plan_is_an_upper_bound_with_a_note():
    d = estimate_memory("tiny:qwen2_moe", plan="topp:0.5")
    assert d["params_active"] == d["params_active_native"]
    assert d["notes"] and "calibration" in d["notes"][0]


def test_no_weights_are_loaded(monkeypatch, mixtral_dir):
    import transformers

    def boom(*a, **k):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    assert estimate_memory(str(mixtral_dir))["params_total"] == TOTAL


def test_bad_input_is_one_line(capsys, tmp_path):
    code, out, err = run(["info", str(tmp_path), "--memory"], capsys)
    assert code == 2 and "config.json" in err and "Traceback" not in err
    code, out, err = run(["info", "tiny:mixtral", "--memory", "--hook-layer", "9"], capsys)
    assert code == 2 and "--hook-layer" in err
    code, _, err = run(["info", "tiny:mixtral", "--memory", "--dtype", "fp7"], capsys)
    assert code == 2 and "--dtype" in err


@pytest.mark.parametrize("arch,plan,tol", [("mixtral", "topk:1", 0.05), ("deepseek_v2", "native", 0.05),
                                          ("qwen2_moe", "native", 0.08), ("gpt_oss", "native", 0.25)])
def test_activation_estimate_against_what_autograd_saves(arch, plan, tol):
    """The formula against the bytes of the tensors autograd saves (frozen weights and buffers left out)."""
    import torch

    import hookmoe
    from hookmoe.kernels import cpu_gemm
    from hookmoe.hook import insert_hooks

    mm = hookmoe.load(f"tiny:{arch}", device="cpu")
    cpu_gemm.restore(mm.model)  # plain torch linears: what a GPU run saves
    for p in mm.model.parameters():
        p.requires_grad_(False)
    hs = insert_hooks(mm, [2], dtype=torch.float32)
    for p in hs.parameters():
        p.requires_grad_(True)
    b, t = 2, 128
    storages = {}

    frozen = {t.untyped_storage().data_ptr() for t in list(mm.model.parameters()) + list(mm.model.buffers())}

    def pack(x):
        s = x.untyped_storage()
        if s.data_ptr() not in frozen:
            storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return x

    with mm.routing(plan), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        mm.model(input_ids=torch.randint(2, 259, (b, t)), use_cache=False)
    measured = sum(storages.values())
    est = estimate_memory(mm, dtype="fp32", plan=plan, batch=b, seq_len=t, hook_layers=[2])["hook_training"]
    assert est["activations"] == pytest.approx(measured, rel=tol)
