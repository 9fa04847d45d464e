"""Allocators: exact budgets, optimal knapsack, measured and data-free sensitivity, each allocator's plan."""

import itertools
import json
import random

import pytest
import torch

from hookmoe.search import allocators as al
from hookmoe.cli import main
from hookmoe.errors import UserError
from hookmoe.models import load
from hookmoe.routing import measure_act
from hookmoe.search import Scorer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def qw(tiny_models):
    return tiny_models("qwen2_moe")  # 4 MoE layers, 16 experts, native top-4, a shared expert


def _blocks(n=4, t=48, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, t), generator=g)


def _planted(native_k=4):
    """Layer 2 is nearly free to cut, layers 1 and 3 are dear, layer 0 gains a lot from a 5th expert."""
    d = {"0": {"2": 5.0, "3": 2.0, "5": -2.0}, "1": {"2": 3.0, "3": 1.0, "5": 0.0},
         "2": {"2": 0.02, "3": 0.01, "5": 0.0}, "3": {"2": 3.0, "3": 1.0, "5": 0.0}}
    return {"format": al.SENSITIVITY_FORMAT, "kind": "nll", "native_k": native_k, "ks": [2, 3, 5], "delta": d}


# ---- budgets and solvers ---------------------------------------------------------------------------


def test_budget_is_exact_or_the_nearest_below(qw):
    assert al.budget_for_act(qw, 3.5) == (14, True)
    assert al.budget_for_act(qw, 3.0) == (12, True)
    assert al.budget_for_act(qw, 3.3) == (13, False)
    with pytest.raises(al.AllocationError, match="--act"):
        al.budget_for_act(qw, 4.5)
    with pytest.raises(al.AllocationError, match="--act"):
        al.budget_for_act(qw, 0.5)


def test_knapsack_is_optimal_and_greedy_meets_the_budget():
    rng = random.Random(0)
    for _ in range(5):
        costs = {li: {k: (0.0 if k == 4 else rng.uniform(-0.3, 2.0)) for k in (1, 2, 3, 4, 5)} for li in range(4)}
        table = al.knapsack(costs)
        for b in range(4, 21):
            brute = min(sum(costs[li][k] for li, k in enumerate(ch))
                        for ch in itertools.product((1, 2, 3, 4, 5), repeat=4) if sum(ch) == b)
            cost, ks = table[b]
            assert sum(ks.values()) == b
            assert cost == pytest.approx(brute, abs=1e-12)
            assert cost == pytest.approx(sum(costs[li][k] for li, k in ks.items()), abs=1e-12)
            g_cost, g_ks, _ = al.greedy_allocate(costs, {li: 4 for li in range(4)}, b)
            assert sum(g_ks.values()) == b and g_cost >= cost - 1e-12


@pytest.mark.parametrize("name", ["dp", "greedy"])
def test_sensitivity_allocators_cut_the_cheap_layer_and_raise_the_one_that_gains(qw, name):
    plan = al.allocate(qw, name, target_act=3.5, sensitivity=_planted())
    ks = {int(i): k for i, k in plan.meta["allocation"]["ks"].items()}
    # budget 14 of 16: layer 2 loses two experts (cost 0.02); layer 0 gains one (-2) paid by layer 1 or 3 (+1)
    assert ks[0] == 5 and ks[2] == 2 and sorted([ks[1], ks[3]]) == [3, 4]
    assert sum(ks.values()) == 14 and plan.meta["allocation"]["exact"] is True
    assert plan.meta["allocation"]["predicted_cost"] == pytest.approx(-0.98)
    act, per = measure_act(qw, plan, _blocks(2, 16))
    assert act == 3.5 and per == {i: float(k) for i, k in ks.items()}


def test_a_table_plan_is_kept_only_when_it_measures_better_than_uniform(qw):
    """With calibration data and a whole Act, dp checks its plan against uniform top-k on that data and keeps the
    better (the planted table says layer 0 gains from 5 experts; whatever the tiny model says, the kept plan is the
    one with the lower measured NLL, and the record holds both)."""
    from hookmoe.eval.perplexity import perplexity_core
    from hookmoe.routing.patch import routing_scope

    cb = _blocks(3, 32)
    plan = al.allocate(qw, "dp", target_act=3.0, sensitivity=_planted(), calib=cb)
    guard = plan.meta["allocation"]["uniform_check"]
    assert guard["kept"] in ("uniform", "allocated") and guard["tokens"] == cb.numel()
    ks = {int(i): k for i, k in plan.meta["allocation"]["ks"].items()}
    if guard["kept"] == "uniform":
        assert set(ks.values()) == {3} and guard["nll_uniform"] <= guard["nll_allocated"]
    else:
        assert len(set(ks.values())) > 1 and guard["nll_allocated"] < guard["nll_uniform"]
    with routing_scope(qw, plan):
        kept_nll = perplexity_core(qw, cb, batch_size=8)["nll"]
    assert kept_nll == pytest.approx(min(guard["nll_uniform"], guard["nll_allocated"]), rel=1e-6)
    # a plan that cannot be uniform (Act 3.25 is not a whole k) or no data: no check, the table's plan as it is
    assert "uniform_check" not in al.allocate(qw, "dp", target_act=3.25, sensitivity=_planted(), calib=cb).meta[
        "allocation"]
    assert "uniform_check" not in al.allocate(qw, "dp", target_act=3.0, sensitivity=_planted()).meta["allocation"]


def test_tolerance_mode_predicts_from_the_measured_nll():
    class M:  # only what the table allocators read
        native_top_k, max_top_k, moe_layer_indices = 4, 16, [0, 1, 2, 3]
        layers = [0, 1, 2, 3]

    # budget 13 costs at best 0.02 (exp -> 2.02% > 1.5%); budget 14 can even gain (-0.98): the smallest within
    plan = al.allocate(M(), "dp", tolerance=0.015, sensitivity=_planted())
    a = plan.meta["allocation"]
    assert a["budget"] == 14 and a["ks"]["0"] == 5 and a["ks"]["2"] == 2
    assert a["predicted_rise"] == pytest.approx(2.718281828 ** -0.98 - 1, rel=1e-6)
    tight = al.allocate(M(), "greedy", tolerance=0.0, sensitivity=_planted())
    assert tight.meta["allocation"]["budget"] == 14  # 14 gains, 13 loses


def test_every_allocator_meets_the_target_act_exactly(qw):
    cb = _blocks()
    sens = al.measure_sensitivity(qw, cb, batch_size=2)
    for name in al.ALLOCATORS:
        for target in (3.0, 3.5, 2.75):
            plan = al.allocate(qw, name, target_act=target, sensitivity=sens if name != "weights" else None,
                               calib=cb)
            a = plan.meta["allocation"]
            assert a["allocator"] == name and a["exact"] is True and a["act"] == target
            assert a["budget"] == round(target * 4)
            act, per = measure_act(qw, plan, cb[:2, :16])
            assert act == pytest.approx(target, abs=1e-12), (name, plan.base)
            assert plan.base != "native"
    near = al.allocate(qw, "dp", target_act=3.3, sensitivity=sens)
    assert near.meta["allocation"]["act"] == 3.25 and near.meta["allocation"]["exact"] is False
    assert "nearest budget below" in near.meta["allocation"]["note"]
    assert getattr(qw, "_routing_patch", None) is None


def test_tlnle_allocator_is_the_paper_shape(qw):
    p = al.allocate(qw, "tlnle", target_act=3.5)
    assert p.base == "tlnle:k=4,l=2"
    assert al.allocate(qw, "tlnle", target_act=3.0).base == "topk:3"
    assert al.allocate(qw, "tlnle", target_act=2.25).base == "tlnle:k=3,l=1"
    with pytest.raises(al.AllocationError, match="--data"):
        al.allocate(qw, "tlnle", tolerance=0.01)


def test_measured_sensitivity_equals_full_evaluations_and_is_json(qw):
    from hookmoe.eval import perplexity
    from hookmoe.routing import Plan

    cb = _blocks(3, 32)
    sens = al.measure_sensitivity(qw, Scorer(qw, "ppl", blocks=cb, batch_size=2), ks=[3, 5])
    json.loads(json.dumps(sens))
    assert sens["ks"] == [3, 5] and sens["evals"] == 1 + 4 * 2
    base = perplexity(qw, cb, plan="native", batch_size=2)["nll"]
    for li in (0, 2):  # layer 2 runs from cached states entering it
        for k in (3, 5):
            full = perplexity(qw, cb, plan=Plan(base="native", layers={str(li): f"topk:{k}"}), batch_size=2)["nll"]
            assert sens["delta"][str(li)][str(k)] == pytest.approx(full - base, abs=1e-6)
    assert any(abs(v) > 1e-6 for row in sens["delta"].values() for v in row.values())


def test_a_layer_whose_routed_experts_are_silent_is_cut_first():
    mm = load("tiny:qwen2_moe", device="cpu")  # a private copy: its weights are edited
    layer = mm.layer(2)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            if "down" in name:
                p.zero_()
    cb = _blocks(2, 32)
    sens = al.measure_sensitivity(mm, cb, ks=[2, 3])
    assert all(abs(v) < 1e-6 for v in sens["delta"]["2"].values())
    ws = al.weight_sensitivity(mm, tokens=128)
    assert all(abs(v) < 1e-6 for v in ws["delta"]["2"].values())
    assert all(ws["delta"][str(i)]["3"] > 0 and ws["delta"][str(i)]["5"] < 0 for i in (0, 1, 3))
    plan = al.allocate(mm, "weights", target_act=3.5, sensitivity=ws)
    assert plan.meta["allocation"]["ks"] == {"0": 4, "1": 4, "2": 2, "3": 4}


def test_within_tolerance_scores_plans(qw):
    sc = Scorer(qw, "ppl", blocks=_blocks(2, 32), batch_size=2)
    sens = al.measure_sensitivity(qw, sc)
    plan = al.allocate(qw, "dp", tolerance=0.002, sensitivity=sens, scorer=sc)
    a = plan.meta["allocation"]
    assert a["scored"] and all("drop" in s for s in a["scored"])
    if a.get("drop") is not None:
        assert a["drop"] <= 0.002
        # the next lower budget of the same allocator (if scored) was over the tolerance
        assert all(s["drop"] > 0.002 for s in a["scored"] if s["budget"] < a["budget"])


def test_bad_input_is_a_user_error(qw):
    with pytest.raises(UserError, match="--allocator"):
        al.get_allocator("magic")
    with pytest.raises(UserError, match="exactly one"):
        al.allocate(qw, "dp", target_act=3.0, tolerance=0.01, sensitivity=_planted())
    with pytest.raises(UserError, match="--calib"):
        al.allocate(qw, "dp", target_act=3.0)
    with pytest.raises(UserError, match="native k"):
        al.allocate(qw, "dp", target_act=3.0, sensitivity=_planted(native_k=2))


def test_search_cli_with_an_allocator(tmp_path, capsys):
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as e:
        main(["search", "tiny:qwen2_moe", "--data", "builtin", "--allocator", "dp", "--act", "3.5", "--out", str(out),
              "--n-blocks", "2", "--block-len", "32", "--calib-blocks", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    d = json.loads(out.read_text())
    assert d["base"].startswith("layers:") and d["meta"]["allocation"]["act"] == 3.5
    assert sum(int(k) for k in d["base"].split(":")[1].split(",")) == 14
    with pytest.raises(SystemExit) as e:
        main(["search", "tiny:qwen2_moe", "--data", "builtin", "--allocator", "nope", "--act", "3.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().startswith("error:") and "--allocator" in err
    assert len(err.strip().splitlines()) == 1


def test_run_cli_trains_the_hook_under_the_allocated_plan(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "tiny:qwen2_moe", "--calib", "builtin", "--tolerance", "0.01", "--out", str(out),
            "--n-train", "4", "--n-val", "2", "--n-eval", "2", "--block-len", "32", "--search-hook-steps", "1",
            "--hook-steps", "2", "--hook-batch-size", "2", "--hook-candidates", "1", "--max-evals", "3",
            "--allocator", "weights", "--act", "3.25", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["allocation"]["allocator"] == "weights" and res["allocation"]["act"] == 3.25
    hp = json.loads((out / "hook_plan.json").read_text())
    assert hp["base"].startswith("layers:")
    assert res["evals"]["reduced + hook"]["act"] == pytest.approx(3.25, abs=1e-12)


def test_dp2_remeasures_around_its_plan(qw):
    cb = _blocks(3, 32)
    sens = al.measure_sensitivity(qw, cb)
    ks = {int(i): k for i, k in al.allocate(qw, "dp", target_act=3.0, sensitivity=sens).meta["allocation"]["ks"].items()}
    local = al.measure_sensitivity(qw, cb, base=ks, down=1, up=1)
    assert local["base_ks"] == {str(i): k for i, k in ks.items()}
    from hookmoe.eval import perplexity

    base = perplexity(qw, cb, plan=al.plan_from_ks(qw, ks))["nll"]
    li = 3
    k = ks[li] - 1 if ks[li] > 1 else ks[li] + 1
    full = perplexity(qw, cb, plan=al.plan_from_ks(qw, {**ks, li: k}))["nll"]
    assert local["delta"][str(li)][str(k)] == pytest.approx(full - base, abs=1e-6)
    plan = al.allocate(qw, "dp2", target_act=3.0, sensitivity=sens, calib=cb)
    a = plan.meta["allocation"]
    assert a["act"] == 3.0 and a["rounds"] >= 1 and a["history"][0] == {str(i): k for i, k in ks.items()}
    with pytest.raises(UserError, match="--calib"):
        al.allocate(qw, "dp2", target_act=3.0, sensitivity=sens)
