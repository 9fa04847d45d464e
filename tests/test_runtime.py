"""The fast runtime: same outputs as the reference path, dropped experts never computed, plans and hooks kept."""

import pytest
import torch

from conftest import ARCHS
from hookmoe.speed import runtime as R
from hookmoe.errors import RuntimeOptionError
from hookmoe.compat import experts_implementation, sentinel_skips
from hookmoe.hook import insert_hooks, remove_hooks
from hookmoe.hook import load
from hookmoe.routing import apply_plan


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core machine OpenMP barriers stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load(f"tiny:{arch}", device="cpu")
        return cache[arch]

    return get


def _logits(mm, ids, impl):
    R.set_experts(mm, impl)
    with torch.no_grad():
        return mm.model(ids).logits


def _prompt(n=12, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (b, n), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_match_reference(arch, models):
    mm = models(arch)
    prev = experts_implementation(mm.model)
    ids = _prompt(24, b=2, seed=1)
    ref = _logits(mm, ids, "eager")
    fast = _logits(mm, ids, "hookmoe")  # host path (CPU eager)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)
    # the device path (CUDA / torch.compile) computes the same on CPU
    R.set_experts(mm, "hookmoe")
    orig = R.host_experts_forward
    R.host_experts_forward = R.device_experts_forward
    try:
        with torch.no_grad():
            dev = mm.model(ids).logits
    finally:
        R.host_experts_forward = orig
    assert torch.allclose(dev, ref, atol=1e-5, rtol=1e-4)
    # greedy tokens: runtime == stock `generate` (with the model's own experts implementation)
    R.set_experts(mm, prev)
    p = _prompt(10, seed=2)
    want = R.reference_generate(mm, p, 12).tokens
    with R.Runtime(mm) as rt:
        assert experts_implementation(mm.model) == "hookmoe"
        got = rt.generate(p, 12)
    assert experts_implementation(mm.model) == prev  # restored
    assert torch.equal(got.tokens, want)
    assert got.tokens.shape == (1, 12) and 0 < got.ttft_s <= got.e2e_s


def test_forced_decode_inputs_match_a_full_forward(models):
    mm = models("olmoe")
    p, forced = _prompt(10, seed=13), _prompt(5, seed=14)
    with R.Runtime(mm) as rt:
        got = rt.generate(p, 6, decode_inputs=forced).tokens
        logits = rt.logits(torch.cat([p, forced], dim=1))
    assert torch.equal(got[0], logits[0, 9:].argmax(-1))
    ref = R.reference_generate(mm, p, 6, decode_inputs=forced).tokens  # stock generate, forced the same way
    assert torch.equal(ref[0, :5], forced[0])


def test_left_padded_batch_matches_generate(models):
    mm = models("qwen2_moe")
    ids = _prompt(10, b=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    want = R.reference_generate(mm, ids, 6, attention_mask=mask).tokens
    with R.Runtime(mm) as rt:
        got = rt.generate(ids, 6, attention_mask=mask).tokens
    assert torch.equal(got, want)


def test_eos_stops_rows(models):
    mm = models("mixtral")
    with R.Runtime(mm) as rt:
        free = rt.generate(_prompt(8, seed=4), 10).tokens[0].tolist()
        eos = free[3]
        got = rt.generate(_prompt(8, seed=4), 10, eos_token_id=eos).tokens[0].tolist()
    assert got[: free.index(eos) + 1] == free[: free.index(eos) + 1]
    assert all(t == eos for t in got[free.index(eos):])


def _count_rows(monkeypatch):
    """Rows each expert actually processes on the runtime path: {(id(experts), e): rows} (both the per-slot
    decode path and the grouped-GEMM prefill path are counted)."""
    rows = {}
    orig_one, orig_grouped = R._expert, R._grouped_rows

    def one(self, e, x):
        rows[(id(self), e)] = rows.get((id(self), e), 0) + x.shape[0]
        return orig_one(self, e, x)

    def grouped(self, xs, offs, e_rows, gmm):
        sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long()).tolist()
        assert sum(sizes) == xs.shape[0]  # no sentinel row reaches the GEMMs
        for e, c in enumerate(sizes):
            if c:
                rows[(id(self), e)] = rows.get((id(self), e), 0) + c
        return orig_grouped(self, xs, offs, e_rows, gmm)

    monkeypatch.setattr(R, "_expert", one)
    monkeypatch.setattr(R, "_grouped_rows", grouped)
    return rows


def test_decode_computes_only_the_selected_experts(models, monkeypatch):
    mm = models("qwen3_moe")
    rows = _count_rows(monkeypatch)
    with R.Runtime(mm) as rt, mm.routing("topk:1"):
        rows.clear()
        rt.generate(_prompt(6, seed=12), 3)  # prefill of 6 tokens + 2 single-token decode steps
    for layer in mm.layers:
        per = [rows.get((id(layer.experts), e), 0) for e in range(mm.num_experts)]
        assert sum(per) == 6 + 2 and max(per) <= 8


@pytest.mark.parametrize("plan,k", [("native", 2), ("topk:1", 1)])
def test_static_plans_compute_exactly_k_rows_per_token(plan, k, models, monkeypatch):
    mm = models("mixtral")
    rows = _count_rows(monkeypatch)
    ids = _prompt(20, b=2, seed=5)
    R.set_experts(mm, "hookmoe")
    try:
        with mm.routing(plan):
            with torch.no_grad():
                mm.model(ids)
    finally:
        R.set_experts(mm, "grouped_mm")
    for layer in mm.layers:
        per = [rows.get((id(layer.experts), e), 0) for e in range(mm.num_experts)]
        assert sum(per) == ids.numel() * k


@pytest.mark.parametrize("plan", ["topp:0.25", "ratio:0.25", "naee:0.75", "entropy:t=1.94"])
def test_dynamic_rules_skip_dropped_slots_and_keep_semantics(plan, models, monkeypatch):
    mm = models("mixtral")
    assert sentinel_skips("hookmoe")
    ids = _prompt(32, b=2, seed=6)
    R.set_experts(mm, "eager")  # reference: dropped slots keep a valid index with weight 0
    with mm.routing(plan):
        with torch.no_grad():
            ref = mm.model(ids).logits
    rows = _count_rows(monkeypatch)
    R.set_experts(mm, "hookmoe")
    try:
        with mm.routing(plan) as patch:
            with torch.no_grad():
                got = mm.model(ids).logits
            act = patch.stats.act_per_layer()
    finally:
        R.set_experts(mm, "grouped_mm")
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    for layer in mm.layers:
        computed = sum(rows.get((id(layer.experts), e), 0) for e in range(mm.num_experts))
        assert computed == round(act[layer.index] * ids.numel())  # only kept slots were computed
    assert 1.0 < sum(act.values()) / len(act) < 2.0  # the rule dropped some slots, not all


def test_switching_implementation_reapplies_a_dynamic_plan(models):
    mm = models("olmoe")
    R.set_experts(mm, "eager")
    patch = apply_plan(mm, "topp:0.4")
    try:
        with R.Runtime(mm) as rt:
            assert mm._routing_patch is not patch and mm._routing_patch._active  # re-applied for sentinels
            assert mm._routing_patch.plan.describe() == "topp:0.4"
            rt.generate(_prompt(6), 3)
    finally:
        mm._routing_patch.remove()
        R.set_experts(mm, "grouped_mm")


def test_hook_runs_on_the_runtime_path(models):
    mm = models("deepseek_v2")
    ids = _prompt(16, seed=7)
    insert_hooks(mm, [mm.moe_layer_indices[-1]], init="paper")
    try:
        ref = _logits(mm, ids, "eager")
        got = _logits(mm, ids, "hookmoe")
        remove_hooks(mm)
        plain = _logits(mm, ids, "hookmoe")
    finally:
        remove_hooks(mm)
        R.set_experts(mm, "grouped_mm")
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the hook did something


def test_bfloat16_within_dtype_tolerance():
    mm = load("tiny:mixtral", device="cpu", dtype="bfloat16")
    ids = _prompt(16, seed=8)
    ref = _logits(mm, ids, "eager").float()
    got = _logits(mm, ids, "hookmoe").float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_experts_and_dynamic_rule_compile_without_graph_breaks(models):
    mm = models("mixtral")
    R.set_experts(mm, "hookmoe")
    block = mm.layers[0].block
    x = torch.randn(1, 12, mm.config.hidden_size, generator=torch.Generator().manual_seed(9))
    try:
        with mm.routing("entropy:t=1.9,max=2") as patch:
            with torch.no_grad():
                want = block(x)
                patch.stats.reset()
                torch._dynamo.reset()
                got = torch.compile(block, fullgraph=True)(x)  # raises on any graph break
            assert patch.stats.tokens == 12  # counting still works inside the compiled graph
    finally:
        torch._dynamo.reset()
        R.set_experts(mm, "grouped_mm")
    assert torch.allclose(got, want, atol=1e-5)


def test_runtime_options_and_errors(models):
    mm = models("granitemoe")
    with R.Runtime(mm) as rt:
        d = rt.describe()
        assert d["experts_implementation"] == "hookmoe" and d["device"] == "cpu"
        assert d["compile"] is False and d["cache"] == "dynamic"  # CPU: eager (see module docstring)
        with pytest.raises(RuntimeOptionError):
            rt.generate(_prompt(4), 0)
    with pytest.raises(RuntimeOptionError):
        R.Runtime(mm, cache="paged")
    with pytest.raises(RuntimeOptionError):
        R.Runtime(mm, clock="sundial")
    with pytest.raises(RuntimeOptionError):
        R.set_experts(mm, "no-such-impl")
    # the static cache (used when compiling) gives the same tokens
    with R.Runtime(mm, cache="static") as rt:
        a = rt.generate(_prompt(9, seed=10), 5).tokens
    with R.Runtime(mm) as rt:
        b = rt.generate(_prompt(9, seed=10), 5).tokens
    assert torch.equal(a, b)


def test_compiled_decode_follows_plan_and_hook_changes(models):
    """torch.compile on the CPU (what CUDA uses by default): switching plans/hooks must not replay a stale graph."""
    mm = models("mixtral")
    p = _prompt(8, seed=15)
    want = {}
    R.set_experts(mm, "eager")
    want["native"] = R.reference_generate(mm, p, 5).tokens  # no plan: no module hooks at all
    with mm.routing("topp:0.25"):
        want["topp:0.25"] = R.reference_generate(mm, p, 5).tokens
    insert_hooks(mm, [1], init="paper")
    want["hook"] = R.reference_generate(mm, p, 5).tokens
    remove_hooks(mm)
    torch._dynamo.reset()
    try:
        with R.Runtime(mm, compile=True) as rt:
            assert rt.describe()["cache"] == "static"
            assert torch.equal(rt.generate(p, 5).tokens, want["native"])
            with mm.routing("topp:0.25"):  # hooks added after the first compilation
                assert torch.equal(rt.generate(p, 5).tokens, want["topp:0.25"])
            insert_hooks(mm, [1], init="paper")
            assert torch.equal(rt.generate(p, 5).tokens, want["hook"])
    finally:
        remove_hooks(mm)
        torch._dynamo.reset()
        R.set_experts(mm, "grouped_mm")
    assert not torch.equal(want["native"], want["topp:0.25"]) or not torch.equal(want["native"], want["hook"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runtime_compiles_and_matches():  # pragma: no cover - CPU-only CI
    mm = load("tiny:mixtral", device="cuda", dtype="bfloat16")
    p = _prompt(10, seed=11).cuda()
    want = R.reference_generate(mm, p, 8).tokens
    with R.Runtime(mm) as rt:
        assert rt.describe()["compile"] is True and rt.describe()["cache"] == "static"
        got = rt.generate(p, 8).tokens
    assert (got == want).float().mean() >= 0.75  # bf16 + a different kernel order may flip a near-tie


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_lean_decode_step_is_bit_identical(arch, models):
    """The runtime's own decode step (no mask builder / outer modules) gives exactly the model's logits and
    tokens, with a dynamic plan and a Hook in force; unpadded batches use it, padded ones fall back."""
    from hookmoe.hook import insert_hooks, remove_hooks

    mm = models(arch)
    p = _prompt(10, b=2, seed=4)
    forced = _prompt(7, b=2, seed=5)
    with R.Runtime(mm, lean=True) as rt:
        assert rt.describe()["decode_step"].startswith("lean")
    insert_hooks(mm, [mm.moe_layer_indices[0]], init="paper", seed=0)
    try:
        with mm.routing("ratio:0.5"):
            with R.Runtime(mm, lean=False) as rt:
                want = rt.generate(p, 8, decode_inputs=forced).tokens
                want_greedy = rt.generate(p, 8).tokens
            calls = []
            orig = R.LeanDecoder.__call__

            def spy(self, *a):
                out = orig(self, *a)
                calls.append(out)
                return out

            R.LeanDecoder.__call__ = spy
            try:
                with R.Runtime(mm) as rt:
                    got = rt.generate(p, 8, decode_inputs=forced).tokens
                    got_greedy = rt.generate(p, 8).tokens
            finally:
                R.LeanDecoder.__call__ = orig
    finally:
        remove_hooks(mm)
    assert len(calls) == 14
    assert torch.equal(got, want) and torch.equal(got_greedy, want_greedy)
    # step logits equal the full forward's last-position logits (one forward over prompt + forced tokens)
    with torch.no_grad(), mm.routing("ratio:0.5"):
        R.set_experts(mm, "hookmoe")
        full = mm.model(torch.cat([p, forced[:, :1]], -1)).logits[:, -1]
        with R.Runtime(mm) as rt:
            from transformers import DynamicCache
            cache = DynamicCache(config=mm.config)
            mm.model(p, past_key_values=cache, use_cache=True)
            step = rt._lean(forced[:, :1], torch.full((2, 1), p.shape[1]), cache)[:, -1]
    assert torch.allclose(step, full, atol=1e-5, rtol=1e-4)


def test_lean_decode_step_refused_where_unsupported(models):
    mm = models("gpt_oss")  # sliding-window layers: the mask matters
    with pytest.raises(RuntimeOptionError, match="no lean decode step"):
        R.Runtime(mm, lean=True)
    with R.Runtime(mm) as rt:
        assert rt.describe()["decode_step"] == "model forward"
