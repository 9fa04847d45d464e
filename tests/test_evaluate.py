"""Evaluation: perplexity (windows, BOS), multiple choice, the lm-eval bridge, Act/params, the eval CLI."""

import json
import math

import pytest
import torch

import hookmoe.eval as ev
from hookmoe.errors import EvalError
from hookmoe.cli import main
from hookmoe.data import MCItem
from hookmoe.routing import Plan


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (OpenMP sync costs more than it saves; on a busy machine a
    lot more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mx(tiny_models):
    return tiny_models("mixtral")


@pytest.fixture(scope="module")
def blocks():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 259, (4, 40), generator=g)


def _manual_nll(mm, ids: torch.Tensor, first: int) -> tuple[float, int]:
    """Summed NLL of ids[:, first:] from one plain forward."""
    with torch.no_grad():
        logits = mm.model(input_ids=ids).logits.float()
    lp = logits.log_softmax(-1)[:, first - 1:-1].gather(-1, ids[:, first:].unsqueeze(-1))
    return -float(lp.sum()), ids[:, first:].numel()


def test_perplexity_matches_manual_and_reports_act_and_params(mx, blocks):
    nat = ev.perplexity(mx, blocks, batch_size=3)
    nll, n = _manual_nll(mx, blocks, 1)
    assert nat["tokens"] == n == 4 * 39
    assert nat["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert nat["score"] == nat["ppl"] and nat["higher_is_better"] is False
    assert nat["act"] == 2.0 and set(nat["act_per_layer"]) == {"0", "1", "2", "3"}
    top1 = ev.perplexity(mx, blocks, plan="topk:1")
    tl = ev.perplexity(mx, blocks, plan="tlnle:k=2,l=2")
    assert top1["act"] == 1.0
    assert tl["act"] == 1.5 and tl["act_per_layer"]["1"] == 2.0 and tl["act_per_layer"]["2"] == 1.0
    assert tl["rules"] == {"0": "topk:2", "1": "topk:2", "2": "topk:1", "3": "topk:1"}
    pe = nat["params"]["per_expert"]
    assert nat["params"]["active"] - top1["params"]["active"] == 4 * pe
    assert nat["params"]["active"] - tl["params"]["active"] == 2 * pe
    assert top1["ppl"] != nat["ppl"]
    assert getattr(mx, "_routing_patch", None) is None  # nothing left applied
    json.dumps(tl)  # JSON-able


def test_sliding_windows_with_bos_match_manual(mx, blocks):
    full = ev.perplexity(mx, blocks)
    same = ev.perplexity(mx, blocks, window=40, stride=40)
    assert same["ppl"] == pytest.approx(full["ppl"], rel=1e-6)
    strided = ev.perplexity(mx, blocks, window=16, stride=8)
    assert strided["tokens"] == full["tokens"] and strided["ppl"] != full["ppl"]
    # BOS-prefixed blocks: BOS is context only, and every sliding window is re-prefixed with it
    bos = 2
    bb = blocks.clone()
    bb[:, 0] = bos
    old = mx.config.bos_token_id
    mx.config.bos_token_id = bos
    try:
        res = ev.perplexity(mx, bb, window=16, stride=10)
    finally:
        mx.config.bos_token_id = old
    stream = bb[:, 1:]
    total, count, begin, prev_end = 0.0, 0, 0, 0
    while prev_end < stream.shape[1]:
        end = min(begin + 15, stream.shape[1])
        ids = torch.cat([bb[:, :1], stream[:, begin:end]], 1)
        first = max(prev_end, begin) - begin + 1
        nll, n = _manual_nll(mx, ids, first)
        total, count = total + nll, count + n
        prev_end, begin = end, begin + 10
    assert res["bos"] is True and res["tokens"] == count == 4 * 39
    assert res["nll"] == pytest.approx(total / count, rel=1e-5)


def test_eval_errors_are_user_errors(mx, blocks):
    with pytest.raises(EvalError):
        ev.perplexity(mx, blocks, window=16, stride=20)
    with pytest.raises(EvalError):
        ev.perplexity(mx, blocks[:, :1])
    with pytest.raises(EvalError):
        ev.parse_tasks("arc_easy:x")
    assert ev.parse_tasks("paper-math") == [("gsm8k", 5), ("minerva_math", 4)]
    assert ev.parse_tasks("paper-general")[0] == ("arc_challenge", 0) and len(ev.parse_tasks("paper-general")) == 8
    assert ev.needs_calibration(mx, "naee") and not ev.needs_calibration(mx, "naee:0.4")


def test_routing_scope_keeps_the_plan_in_force(mx, blocks):
    mx.active_plan = mx.routing("topk:1")
    try:
        before = mx.active_plan.stats.act()
        assert ev.perplexity(mx, blocks[:2], plan="native")["act"] == 2.0
        patch = mx._routing_patch
        assert patch is not None and patch._active and patch.plan.describe() == "topk:1"
        r = ev.perplexity(mx, blocks[:2])  # plan=None: the plan in force
        assert r["act"] == 1.0 and r["plan"] == "topk:1"
    finally:
        mx._routing_patch.remove()
        mx.active_plan = None
    assert math.isnan(before) or before == 1.0


def _items():
    return [MCItem("The cat sat on the", ["mat", "moon", "idea"], 0),
            MCItem("Two plus two is", ["four", "seven"], 1),
            MCItem("Water boils at one hundred", ["degrees", "apples", "x"], 2)]


def test_multiple_choice_loglikelihoods_and_accuracy(mx):
    items = _items()
    res = ev.multiple_choice(mx, items, plan="topk:1", batch_size=3)
    reqs = ev.mc_requests(mx, items)
    assert res["requests"] == len(reqs) == 8 and res["items"] == 3 and res["act"] == 1.0
    with mx.routing("topk:1"):
        lls = ev.loglikelihoods(mx, reqs, batch_size=5)
        # one request by hand: the continuation's summed log-probs from an unpadded forward
        ii, ci, ids, n_cont, _ = reqs[3]
        t = torch.tensor([ids])
        with torch.no_grad():
            lp = mx.model(input_ids=t).logits.float().log_softmax(-1)
    manual = float(lp[0, len(ids) - n_cont - 1:-1].gather(-1, t[0, -n_cont:].unsqueeze(-1)).sum())
    assert lls[3] == pytest.approx(manual, abs=1e-4)
    tok = mx.tokenizer
    assert tok.decode(ids[-n_cont:]) == items[ii].continuation(ci)
    # accuracy from the log-likelihoods
    pos = 0
    acc = acc_n = 0
    for item in items:
        n = len(item.choices)
        ll = lls[pos:pos + n]
        norm = [x / len(item.choices[c]) for c, x in enumerate(ll)]  # lm-eval's acc_norm
        acc += int(max(range(n), key=lambda c: ll[c]) == item.label)
        acc_n += int(max(range(n), key=lambda c: norm[c]) == item.label)
        pos += n
    assert res["acc"] == pytest.approx(acc / 3) and res["acc_norm"] == pytest.approx(acc_n / 3)


def test_mc_sources(tmp_path):
    task = {"examples": [{"input": "Is fire hot?", "target_scores": {"yes": 1, "no": 0}},
                         {"input": "Is ice hot?", "target_scores": {"yes": 0, "no": 1}}]}
    (tmp_path / "task.json").write_text(json.dumps(task))
    items = ev.load_mc_source(str(tmp_path / "task.json"))
    assert [i.label for i in items] == [0, 1]
    assert len(ev.load_mc_source("builtin-mc:5")) == 5
    with pytest.raises(EvalError):
        ev.load_mc_source("builtin-mc:x")


def test_lm_eval_bridge_with_a_local_task(mx, tmp_path):
    pytest.importorskip("lm_eval")
    items = _items()
    with open(tmp_path / "data.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps({"question": it.context, "choices": it.choices, "label": it.label}) + "\n")
    (tmp_path / "hookmoe_unit_mc.yaml").write_text(
        "task: hookmoe_unit_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    res = ev.lm_eval_tasks(mx, "hookmoe_unit_mc", plan="topk:1", include_path=tmp_path, batch_size=4)
    t = res["tasks"]["hookmoe_unit_mc"]
    assert res["metric"] == "lm-eval" and t["metric"] == "acc" and t["samples"] == 3
    assert res["act"] == pytest.approx(1.0)
    ours = ev.multiple_choice(mx, items, plan="topk:1")
    assert t["metrics"]["acc,none"] == pytest.approx(ours["acc"])
    assert t["metrics"]["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert res["score"] == pytest.approx(ours["acc"])
    assert ev.lm_eval_tasks(mx, "hookmoe_unit_mc", include_path=tmp_path)["act"] == pytest.approx(2.0)
    with pytest.raises(EvalError, match="unknown lm-eval task"):
        ev.task_manager(tmp_path, ["no_such_task_xyz"], include_defaults=False)


def test_eval_cli_plans_calibration_and_errors(tmp_path, capsys):
    out = tmp_path / "json"
    with pytest.raises(SystemExit) as e:
        main(["eval", "tiny:mixtral", "--plan", "native", "--plan", "naee", "--data", "builtin", "--n-blocks", "2",
              "--block-len", "32", "--calib-blocks", "2", "--device", "cpu", "--json", str(out)])
    assert e.value.code == 0
    doc = json.loads(out.read_text())
    nat, naee = doc["results"]
    assert nat["act"] == 2.0 and 1.0 < naee["act"] < 2.0
    assert "calibrated on the train split of builtin" in naee["calibration"]
    assert all(r.startswith("naee:") for r in naee["rules"].values())
    assert Plan.parse(naee["plan_json"]).layers  # the concrete plan is reusable
    assert "calibrated on the train split" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["eval", "tiny:mixtral", "--metric", "mc", "--data", "builtin-mc:6", "--plan", "topk:1",
              "--device", "cpu", "--json", "-"])
    assert e.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["items"] == 6 and doc["results"][0]["act"] == 1.0
    for argv in (["eval", "tiny:mixtral", "--plan", "topk:9", "--data", "builtin"],
                 ["eval", "tiny:mixtral", "--plan", "bogus", "--data", "builtin"],
                 ["eval", "tiny:mixtral", "--metric", "ppl"]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--device", "cpu"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1
