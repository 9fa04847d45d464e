"""Routing plans: equivalence, dropped experts cost nothing, dynamic rules, Act accounting."""

import json

import pytest
import torch

from conftest import ARCHS
from hookmoe.errors import PlanError
from hookmoe.models import MoEModel, build_tiny, tiny_tokenizer
from hookmoe.routing import Plan, apply_plan


def logits(mm, ids, **kw):
    with torch.no_grad():
        return mm.model(ids, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_native_plan_is_bit_identical(arch, tiny_models, ids):
    mm = tiny_models(arch)
    ref = logits(mm, ids)
    with mm.routing("native") as patch:
        got = logits(mm, ids)
    assert torch.equal(got, ref)
    assert patch.stats.act() == pytest.approx(mm.native_top_k)
    assert torch.equal(logits(mm, ids), ref)  # removed cleanly


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_equals_model_rebuilt_with_that_k(arch, tiny_models, ids):
    mm = tiny_models(arch)
    for k in sorted({1, mm.native_top_k - 1, mm.native_top_k + 1}):
        if not 1 <= k <= mm.max_top_k:
            continue
        rebuilt = build_tiny(arch, num_experts_per_tok=k)
        rebuilt.load_state_dict(mm.model.state_dict())
        with torch.no_grad():
            want = rebuilt(ids).logits
        with mm.routing(f"topk:{k}") as patch:
            got = logits(mm, ids)
        assert (got - want).abs().max().item() <= 1e-5
        assert patch.stats.act() == pytest.approx(k)
        if k != mm.native_top_k:
            assert not torch.allclose(got, logits(mm, ids))  # the plan really changed something


@pytest.fixture
def grouped_mm_rows(monkeypatch):
    """Record the rows each expert's GEMM actually processes on the grouped_mm path."""
    calls = []
    orig = torch.nn.functional.grouped_mm

    def spy(inp, weight, offs=None, **kw):
        calls.append(torch.diff(offs, prepend=offs.new_zeros(1)).tolist())
        return orig(inp, weight, offs=offs, **kw)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", spy)
    return calls


def _capture_final(mm):
    """Forward hooks (registered after the plan's) that see each router's final (weights, index)."""
    seen = {}
    handles = []
    for layer in mm.layers:
        def hook(mod, args, out, i=layer.index):
            from hookmoe.compat import split_router_output

            ro = split_router_output(out, mm.num_experts)
            seen[i] = (ro.weights.detach().clone(), ro.index.detach().clone())
        handles.append(layer.router.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plan", ["topk:1", "ratio:0.3"])
def test_dropped_experts_cost_nothing_on_grouped_mm(arch, plan, tiny_models, ids, grouped_mm_rows):
    mm = tiny_models(arch)
    assert mm.experts_implementation == "grouped_mm"
    with mm.routing(plan) as patch:
        seen, handles = _capture_final(mm)
        logits(mm, ids)
        for h in handles:
            h.remove()
    per_layer = patch.stats.expert_counts()
    # two GEMMs (up, down) per MoE layer, in layer order
    assert len(grouped_mm_rows) == 2 * len(mm.layers)
    n_tokens = ids.numel()
    for j, layer in enumerate(mm.layers):
        up, down = grouped_mm_rows[2 * j], grouped_mm_rows[2 * j + 1]
        assert up == down
        w, idx = seen[layer.index]
        kept = idx[idx < mm.num_experts]
        want = torch.bincount(kept, minlength=mm.num_experts).tolist()
        assert up == want, f"layer {layer.index}: rows {up} != kept assignments {want}"
        assert [int(c) for c in per_layer[layer.index]] == want
    total_rows = sum(sum(rows) for rows in grouped_mm_rows[::2])
    assert total_rows < n_tokens * mm.native_top_k * len(mm.layers)
    if plan == "topk:1":
        assert sum(grouped_mm_rows[0]) == n_tokens


def _reference_keep(kind, value, p_sorted, thresholds=None, probs=None):
    """Slow per-token reference of the dynamic rules over sorted candidate probabilities."""
    keep = []
    for j, p in enumerate(p_sorted):
        if j == 0:
            keep.append(True)
        elif kind == "topp":
            keep.append(sum(p_sorted[:j]) < value)
        elif kind == "ratio":
            keep.append(p >= (1 - value) * p_sorted[0])
        elif kind == "naee":
            keep.append(p >= value * p_sorted[0])
        elif kind == "entropy":
            h = -sum(q * torch.log(torch.tensor(max(q, 1e-20))).item() for q in probs)
            k = 1 + sum(h > t for t in thresholds)
            keep.append(j < k)
    return keep


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_rules_match_slow_reference(arch, tiny_models, ids):
    from hookmoe.compat import split_router_output

    mm = tiny_models(arch)
    probe = mm.layers[-1]
    cases = [("topp", 0.3, None), ("ratio", 0.6, None), ("naee", 0.7, None), ("entropy", None, (2.0, 2.4, 2.6))]
    for kind, value, th in cases:
        spec = f"entropy:t={'/'.join(map(str, th))}" if th else f"{kind}:{value}"
        original = {}

        def first(mod, args, out):
            ro = split_router_output(out, mm.num_experts)
            original["out"] = (ro.logits.detach().float().clone(), ro.weights.detach().clone(), ro.index.clone())

        h0 = probe.router.register_forward_hook(first)  # runs before the plan's hook
        with mm.routing(spec):
            seen, handles = _capture_final(mm)
            logits(mm, ids)
            for h in handles:
                h.remove()
        h0.remove()
        lg, w0, i0 = original["out"]
        w1, i1 = seen[probe.index]
        if mm.adapter.score == "sigmoid":
            probs = lg.sigmoid() / lg.sigmoid().sum(-1, keepdim=True)
        else:
            probs = lg.softmax(-1)
        kept_per_token = []
        for t in range(lg.shape[0]):
            cand = i0[t].tolist()
            ps = [probs[t, e].item() for e in cand]
            order = sorted(range(len(cand)), key=lambda j: -ps[j])
            keep_sorted = _reference_keep(kind, value, [ps[j] for j in order], th, probs[t].tolist())
            keep = {cand[order[j]] for j, kp in enumerate(keep_sorted) if kp}
            got = {e for e, wt in zip(i1[t].tolist(), w1[t].tolist()) if e < mm.num_experts and wt != 0}
            assert got == keep, f"{spec} token {t}: kept {got}, reference {keep}"
            assert len(got) >= 1
            kept_per_token.append(len(got))
            # weights: the architecture's own semantics for the kept set
            w_orig = {e: wt for e, wt in zip(cand, w0[t].tolist())}
            w_new = {e: wt for e, wt in zip(i1[t].tolist(), w1[t].tolist()) if e in keep}
            total = sum(w_orig.values())
            kept_total = sum(w_orig[e] for e in keep)
            for e in keep:
                want = w_orig[e] * (total / kept_total) if mm.renormalize else w_orig[e]
                assert w_new[e] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert min(kept_per_token) >= 1


def test_dynamic_rule_keeping_k_matches_static_topk(tiny_models, ids):
    mm = tiny_models("mixtral")
    with mm.routing("topk:1"):
        want = logits(mm, ids)
    with mm.routing("ratio:0.000001"):  # keeps only the top expert (ties aside)
        got = logits(mm, ids)
    assert (got - want).abs().max().item() <= 1e-5


def test_tlnle_and_layers_plans_resolve_per_layer(tiny_models):
    mm = tiny_models("deepseek_v2")  # layer 0 is dense
    assert mm.moe_layer_indices == [1, 2, 3]
    rules = Plan.parse("tlnle:k=4,l=2").resolve(mm)
    assert {i: r.k for i, r in rules.items()} == {1: 4, 2: 3, 3: 3}
    rules = Plan.parse("tlnle:l=1,r=2").resolve(mm)
    assert {i: r.k for i, r in rules.items()} == {1: 3, 2: 3, 3: 4}
    assert {i: r.k for i, r in Plan.parse("layers:1,2,3").resolve(mm).items()} == {1: 1, 2: 2, 3: 3}
    assert {i: r.k for i, r in Plan.parse("layers:9,1,2,3").resolve(mm).items()} == {1: 1, 2: 2, 3: 3}
    sched = Plan.parse("topp:0.8..0.4").resolve(mm)
    assert [round(r.value, 6) for r in sched.values()] == [0.8, 0.6, 0.4]


def test_plan_json_round_trip(tmp_path, tiny_models, ids):
    mm = tiny_models("qwen2_moe")
    plan = Plan(base="topk:3", layers={"2-3": "topk:1", "0": "naee:0.5"}, name="mine")
    path = plan.save(tmp_path / "plan.json")
    again = Plan.parse(str(path))
    assert again.to_dict() == plan.to_dict()
    with mm.routing(str(path)) as patch:
        logits(mm, ids)
    assert patch.per_layer() == {0: "naee:0.5", 1: "topk:3", 2: "topk:1", 3: "topk:1"}
    act = patch.stats.act_per_layer()
    assert act[1] == pytest.approx(3) and act[2] == pytest.approx(1) and 1 <= act[0] <= 4


@pytest.mark.parametrize("bad, fragment", [
    ("topk:0", "must be >= 1"),
    ("topk:99", "out of range"),
    ("topk:x", "whole number"),
    ("tlnle:k=2,l=40", "out of range"),
    ("tlnle:k=1,l=1", "must be >= 2"),
    ("tlnle:k=2", "needs the first reduced layer"),
    ("topp:0", "(0, 1]"),
    ("topp:1.5", "(0, 1]"),
    ("ratio:-1", "(0, 1]"),
    ("layers:2,2", "MoE layers"),
    ("bogus:3", "unknown plan"),
    ("naee", "needs calibration"),
    ("entropy:1.5", "needs calibration"),
    ("topp:0.5,max=99", "out of range"),
    ("topp:0.5,foo=1", "unknown option"),
    ("missing.json", "not found"),
])
def test_bad_plans_give_clear_errors(bad, fragment, tiny_models):
    mm = tiny_models("mixtral")
    with pytest.raises(PlanError, match=None) as e:
        apply_plan(mm, bad)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)
    assert all(layer.router.top_k == mm.native_top_k for layer in mm.layers)


def test_plan_file_errors(tmp_path, tiny_models):
    mm = tiny_models("mixtral")
    p = tmp_path / "p.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        apply_plan(mm, str(p))
    p.write_text(json.dumps({"base": "topk:1", "layers": {"7": "topk:1"}}))
    with pytest.raises(PlanError, match="out of range"):
        apply_plan(mm, str(p))


def test_remove_restores_router_state(tiny_models, ids):
    mm = tiny_models("gpt_oss")
    ref = logits(mm, ids)
    flags = [getattr(layer.experts, "_is_expert_parallel", None) for layer in mm.layers]
    patch = apply_plan(mm, "topp:0.5")
    # transformers 5.23 masks sentinel rows only with this flag; 5.17 has no flag and always masks
    assert all(getattr(layer.experts, "_is_expert_parallel", True) for layer in mm.layers)
    patch.remove()
    assert all(layer.router.top_k == mm.native_top_k for layer in mm.layers)
    assert [getattr(layer.experts, "_is_expert_parallel", None) for layer in mm.layers] == flags
    assert torch.equal(logits(mm, ids), ref)
    # applying a new plan replaces the one in force
    p1 = apply_plan(mm, "topk:1")
    p2 = apply_plan(mm, "native")
    assert not p1._active and p2._active
    p2.remove()


def test_act_excludes_padding(tiny_models):
    mm = tiny_models("olmoe")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(2, 259, (1, 12), generator=g)
    b = torch.randint(2, 259, (1, 5), generator=g)
    # one padded batch (left padding) vs the two sequences alone
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 7:], mask[1, 7:] = b[0], 1
    with mm.routing("ratio:0.5") as patch:
        logits(mm, batch, attention_mask=mask)
        padded = patch.stats.act_per_layer()
        tokens_padded = patch.stats.tokens
        patch.stats.reset()
        logits(mm, a)
        logits(mm, b)
        alone = patch.stats.act_per_layer()
    assert tokens_padded == 17
    for i in padded:
        assert padded[i] == pytest.approx(alone[i], abs=1e-4)
    with mm.routing("topk:1") as patch:
        logits(mm, batch, attention_mask=mask)
    assert patch.stats.act() == pytest.approx(1.0) and patch.stats.tokens == 17


def test_act_not_double_counted_with_gradient_checkpointing():
    model = build_tiny("mixtral")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mm = MoEModel(model, tiny_tokenizer())
    ids = torch.randint(2, 259, (2, 8))
    with mm.routing("ratio:0.5") as patch:
        out = model(ids, labels=ids)
        before = (patch.stats.tokens, patch.stats.act_per_layer())
        out.loss.backward()
        after = (patch.stats.tokens, patch.stats.act_per_layer())
    assert before[0] == 16
    assert after == before
    assert any(p.grad is not None for p in model.parameters())


def test_generate_with_plan_counts_every_step(tiny_models):
    mm = tiny_models("qwen3_moe")
    enc = mm.encode(["hello there", "hi"])
    with mm.routing("topk:2") as patch, torch.no_grad():
        out = mm.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    real_prompt = int(enc["attention_mask"].sum())
    assert out.shape[1] == enc["input_ids"].shape[1] + 4
    # prompt tokens + 3 decode steps x 2 sequences (the 4th token needs no forward)
    assert patch.stats.tokens == real_prompt + 3 * 2
    assert patch.stats.act() == pytest.approx(2.0)


def _old_dynamic(rule, logits, w, idx, cap, score, renorm):
    """The straightforward implementation (argsort, keep_sorted, scatter back), for bit-for-bit comparison."""
    from hookmoe.routing import keep_sorted, router_probs

    probs = router_probs(logits, score)
    p = probs.gather(-1, idx)
    order = p.argsort(-1, descending=True)
    keep_s = keep_sorted(rule, p.gather(-1, order), probs, cap)
    keep = torch.zeros_like(keep_s).scatter(-1, order, keep_s)
    new_w = w * keep.to(w.dtype)
    if renorm:
        new_w = new_w * (w.sum(-1, keepdim=True) / new_w.sum(-1, keepdim=True).clamp_min(1e-20))
    return new_w, keep


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_fast_selector_is_bit_identical_to_sort_and_scatter(score):
    from hookmoe.routing import Dynamic, make_selector

    g = torch.Generator().manual_seed(3)
    n, e = 257, 16
    logits = torch.randn(n, e, generator=g) * 2
    rules = [Dynamic("topp", 0.45), Dynamic("topp", 0.9), Dynamic("ratio", 0.7), Dynamic("naee", 0.3),
             Dynamic("entropy", thresholds=(2.4, 2.0, 2.6)), Dynamic("entropy", thresholds=(1.5,))]
    probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    dropped = set()  # rules that dropped some candidate somewhere (the comparison is not vacuous)
    for k, cap in [(4, 4), (6, 3), (1, 1)]:
        top_w, top_i = probs.topk(k, -1)
        shuffle = torch.rand(n, k, generator=g).argsort(-1)
        for sorted_cand in (True, False):
            w, idx = (top_w, top_i) if sorted_cand else (top_w.gather(-1, shuffle), top_i.gather(-1, shuffle))
            for renorm in (False, True):
                if renorm:
                    w = w / w.sum(-1, keepdim=True)
                for rule in rules:
                    select = make_selector(rule, cap, score, renorm=renorm, sorted_candidates=sorted_cand)
                    got_w, got_keep = select(logits, w, idx)
                    want_w, want_keep = _old_dynamic(rule, logits, w, idx, cap, score, renorm)
                    what = f"{rule.describe()} k={k} cap={cap} sorted={sorted_cand} renorm={renorm}"
                    assert torch.equal(got_keep, want_keep), what
                    assert torch.equal(got_w, want_w), what
                    assert bool(got_keep.any(-1).all()), what
                    if k > 1 and not bool(got_keep.all()):
                        dropped.add(rule.describe())
    assert len(dropped) >= 5, dropped


def test_router_candidate_order_flags_match_the_routers(tiny_models):
    """Routers flagged as sorting their candidates really return them by descending probability."""
    from hookmoe.compat import router_sorts_candidates, split_router_output

    for arch in ARCHS:
        mm = tiny_models(arch)
        router = mm.layers[0].router
        if not router_sorts_candidates(router):
            continue
        x = torch.randn(64, mm.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ro = split_router_output(router(x), mm.num_experts)
        probs = ro.logits.float().softmax(-1)
        p = probs.gather(-1, ro.index)
        assert bool((p[:, :-1] >= p[:, 1:]).all()), arch
