"""The oneDNN CPU linear (hookmoe.cpu_gemm): same numbers as F.linear, gradients included, used where chosen."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hookmoe.kernels import cpu_gemm
from hookmoe.speed import runtime
from hookmoe.hook import load

pytestmark = pytest.mark.skipif(not cpu_gemm._onednn_available(torch.float32), reason="torch built without oneDNN")


@pytest.fixture
def force_onednn(monkeypatch):
    """oneDNN for every product, however small (tiny test shapes would otherwise stay on torch's BLAS)."""
    prev = cpu_gemm.set_backend("onednn")
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    calls = []
    real = cpu_gemm.onednn_linear

    def counting(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(cpu_gemm, "onednn_linear", counting)
    yield calls
    cpu_gemm.set_backend(prev)


def _spy(monkeypatch, module, name) -> list:
    """Replace ``module.name`` by a wrapper that records each call's result; returns the record."""
    results = []
    real = getattr(module, name)

    def wrapper(*args):
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(module, name, wrapper)
    return results


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_f_linear(force_onednn, monkeypatch, shape, bias):
    monkeypatch.setattr(cpu_gemm, "BWD_MIN_ROWS", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    y = cpu_gemm.linear(x, w, b)
    assert force_onednn, "the oneDNN kernel was not used"
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], gy)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    b2 = b.detach().requires_grad_() if bias else None
    y2 = F.linear(x2, w2, b2)
    ref = torch.autograd.grad(y2, [t for t in (x2, w2, b2) if t is not None], gy)
    assert y.shape == y2.shape
    assert _rel(y, y2) < 1e-5
    for a, r in zip(grads, ref):
        assert a.shape == r.shape and _rel(a, r) < 1e-5


@pytest.mark.parametrize("limit", ["GW_COPY_MAX", "BWD_MIN_ROWS"])
def test_weight_gradient_of_a_huge_output_or_few_rows_on_torch(force_onednn, monkeypatch, limit):
    monkeypatch.setattr(cpu_gemm, limit, 10 if limit == "GW_COPY_MAX" else 100)
    x = torch.randn(6, 16)
    w = torch.randn(8, 16, requires_grad=True)
    (gw,) = torch.autograd.grad(cpu_gemm.linear(x, w).sum(), [w])
    assert torch.allclose(gw, torch.ones(6, 8).t() @ x, rtol=1e-5, atol=1e-5)
    assert len(force_onednn) == 1  # the forward only


def test_only_the_needed_gradients_are_computed(force_onednn, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "BWD_MIN_ROWS", 1)
    x = torch.randn(6, 16)
    w = torch.randn(8, 16, requires_grad=True)
    (gw,) = torch.autograd.grad(cpu_gemm.linear(x, w).sum(), [w])
    assert torch.allclose(gw, torch.ones(6, 8).t() @ x, rtol=1e-5, atol=1e-5)
    # forward + dW only (no dX product for an input without grad)
    assert len(force_onednn) == 2


def test_bfloat16(force_onednn):
    if not cpu_gemm._onednn_available(torch.bfloat16):
        pytest.skip("no oneDNN bf16 on this CPU")
    x, w = torch.randn(9, 32).bfloat16(), torch.randn(16, 32).bfloat16()
    y = cpu_gemm.linear(x, w)
    assert y.dtype == torch.bfloat16 and force_onednn
    assert _rel(y.float(), F.linear(x.float(), w.float())) < 1e-2


def test_falls_back_to_torch(force_onednn, monkeypatch):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    cpu_gemm.linear(x.double(), w.double())  # dtype oneDNN is not used for
    wv = w.t().contiguous().t()  # a non-contiguous 2-D weight view is fine ...
    assert not wv.is_contiguous() and torch.allclose(cpu_gemm.linear(x, wv), F.linear(x, w), atol=1e-6)
    n = len(force_onednn)
    cpu_gemm.linear(x[0], w)  # ... a 1-D input is not
    cpu_gemm.set_backend("torch")
    y = cpu_gemm.linear(x, w)
    assert len(force_onednn) == n == 1
    assert torch.equal(y, F.linear(x, w))
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 10**9)
    cpu_gemm.set_backend("onednn")
    cpu_gemm.linear(x, w)  # too small a product
    assert len(force_onednn) == 1


def test_backend_setting_and_probe(monkeypatch):
    prev = cpu_gemm.set_backend("auto")
    try:
        with pytest.raises(ValueError, match="onednn"):
            cpu_gemm.set_backend("blas")
        assert cpu_gemm.set_backend("mkl") == "auto" and cpu_gemm.backend() == "torch"  # alias
        assert not cpu_gemm.uses_onednn(torch.float32)
        cpu_gemm.set_backend("auto")
        choice = cpu_gemm.uses_onednn(torch.float32)
        d = cpu_gemm.describe()
        assert d["backend"] == "auto" and d["onednn"]["float32"] is choice
        probe = d["probe"]["float32"]
        assert probe["torch_ms"] > 0 and probe["onednn_ms"] > 0
        assert choice == (probe["torch_ms"] >= cpu_gemm.AUTO_MARGIN * probe["onednn_ms"])
        monkeypatch.setenv(cpu_gemm.ENV, "bogus")
        monkeypatch.setattr(cpu_gemm, "_backend", None)
        with pytest.raises(ValueError, match=cpu_gemm.ENV):
            cpu_gemm.backend()
    finally:
        cpu_gemm._backend = "auto"
        cpu_gemm.set_backend(prev)


class Custom(nn.Linear):
    """A linear subclass with its own forward (accelerate must leave it alone)."""

    def forward(self, x):
        return super().forward(x) * 2


def test_accelerate_and_restore(force_onednn):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Custom(32, 8))
    x = torch.randn(5, 16)
    ref = model(x)
    assert not force_onednn
    assert cpu_gemm.accelerate(model) == 1  # the subclass with its own forward is left alone
    assert cpu_gemm.accelerate(model) == 0  # idempotent
    assert cpu_gemm.accelerate(nn.Linear(4, 4, device="meta")) == 0  # not on the CPU: left alone
    out = model(x)
    assert len(force_onednn) == 1 and _rel(out, ref) < 1e-5
    out.sum().backward()  # trains through the oneDNN backward
    assert model[0].weight.grad is not None
    buf = io.BytesIO()  # a whole accelerated model survives torch.save / torch.load and deepcopy
    torch.save(model, buf)
    buf.seek(0)
    for clone in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert torch.allclose(clone(x), out) and clone[0].forward.args[0] is clone[0]
    assert cpu_gemm.restore(model) == 1 and "forward" not in model[0].__dict__
    force_onednn.clear()
    model(x)
    assert not force_onednn


def test_loaded_models_are_accelerated():
    mm = load("tiny:mixtral")
    lins = [m for m in mm.model.modules() if isinstance(m, nn.Linear)]
    assert lins and all("forward" in m.__dict__ for m in lins)


@pytest.mark.parametrize("b,h,hkv,t,d", [(1, 4, 2, 300, 16), (2, 6, 6, 129, 8), (1, 8, 1, 64, 32)])
def test_causal_attention_matches_sdpa(b, h, hkv, t, d):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (h, hkv, hkv))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3).transpose(1, 2)
    got = cpu_gemm.causal_attention(q, k, v, 0.3)
    assert got.shape == (b, t, h, d)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_attention_function_falls_back_to_sdpa(force_onednn):
    """Masks, decode steps and autograd go to transformers' SDPA: same result, no oneDNN product."""
    mod = nn.Module()
    q, k, v = (torch.randn(1, 2, 80, 8) for _ in range(3))
    mask = torch.zeros(1, 1, 80, 80)
    for args, kw in [((q, k, v, mask), {}), ((q[:, :, -1:], k, v, None), {}), ((q, k, v, None), {"softcap": 1.0})]:
        if "softcap" in kw:
            with pytest.raises(ValueError, match="softcap"):  # SDPA's own refusal, not a silent oneDNN result
                cpu_gemm.attention_forward(mod, *args, **kw)
        else:
            cpu_gemm.attention_forward(mod, *args, **kw)
    assert not force_onednn
    out, _ = cpu_gemm.attention_forward(mod, q, k, v, None)
    assert force_onednn
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_runtime_prompt_path_per_expert_onednn(force_onednn, monkeypatch):
    """The runtime's per-expert oneDNN prompt path and oneDNN attention give the reference logits and
    greedy tokens, are really taken, and the model's attention setting is restored afterwards."""
    monkeypatch.setattr(runtime, "PER_EXPERT_MIN_MACS", 0)
    monkeypatch.setattr(cpu_gemm, "ATTN_MIN_LEN", 1)
    monkeypatch.setattr(cpu_gemm, "ATTN_BLOCK", 16)
    attn = _spy(monkeypatch, cpu_gemm, "causal_attention")
    taken = _spy(monkeypatch, runtime, "_per_expert_onednn")
    mm = load("tiny:mixtral")
    ids = torch.randint(0, mm.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), mm.routing("topk:1"):
        ref = mm.model(input_ids=ids).logits
        ref_tokens = runtime.reference_generate(mm, ids[:1], 6).tokens
        with runtime.Runtime(mm) as rt:
            assert rt.describe()["attention"] == cpu_gemm.ATTN_NAME
            got = rt.logits(ids)
            tokens = rt.generate(ids[:1], 6).tokens
    assert mm.model.config._attn_implementation == "sdpa"
    assert taken and all(taken) and attn
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_runtime_on_converted_models(force_onednn, monkeypatch, arch):
    """CMoE models (nested text config; Gemma-3's sliding-window layers fall back to SDPA) through the oneDNN
    runtime: reference logits, attention setting restored."""
    from hookmoe.cmoe import convert_dense
    from hookmoe.models import MoEModel
    from test_convert import E, K, S, blocks, tiny_dense

    monkeypatch.setattr(cpu_gemm, "ATTN_MIN_LEN", 1)
    monkeypatch.setattr(cpu_gemm, "ATTN_BLOCK", 8)
    attn = _spy(monkeypatch, cpu_gemm, "causal_attention")
    moe = convert_dense(tiny_dense(arch), None, blocks(8, 32, 1), num_experts=E, num_shared=S, top_k=K,
                        progress=False)
    mm = MoEModel(moe, None)
    x = blocks(2, 30, 3)
    with torch.inference_mode():
        ref = moe(x).logits
        with runtime.Runtime(mm) as rt:
            got = rt.logits(x)
    assert force_onednn
    assert bool(attn) == (arch == "llama")  # the tiny Gemma-3's 3 layers are all sliding-window: SDPA
    assert moe.config._attn_implementation == "sdpa"
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
