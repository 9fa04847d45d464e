"""Calibration, the layer-cached sweep, the §3.3 search, Hook-layer selection, compare and the run pipeline."""

import json

import pytest
import torch

import hookmoe.routing as routing
import hookmoe.search as se
import hookmoe.search.paper as se_paper
from hookmoe.errors import SearchError
from hookmoe.cli import main
from hookmoe.errors import PlanError
from hookmoe.routing import Plan, TopK


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


def _blocks(n=4, t=48, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, t), generator=g)


# ---- calibration ---------------------------------------------------------------------------------


def test_naee_betas_are_per_layer_medians_and_plans_round_trip(mx):
    cb = _blocks()
    stats = routing.collect_router_stats(mx, cb, batch_size=3)
    assert set(stats) == {0, 1, 2, 3}
    assert stats[0].p_sorted.shape == (cb.numel(), 2) and stats[0].entropy.shape == (cb.numel(),)
    assert bool((stats[0].p_sorted[:, 0] >= stats[0].p_sorted[:, 1]).all())
    plan = routing.calibrate_plan(mx, "naee", cb)
    for i in range(4):
        assert float(plan.layers[str(i)].split(":")[1]) == pytest.approx(float(stats[i].ratio(1).median()), rel=1e-5)
    cal = plan.meta["calibration"]
    assert 1.25 < cal["measured_act"] < 1.75  # the median skips the 2nd expert for about half the tokens
    again = Plan.parse(json.loads(json.dumps(plan.to_dict())))
    act, per = routing.measure_act(mx, again, cb)
    assert act == pytest.approx(cal["measured_act"], abs=1e-9)
    assert getattr(mx, "_routing_patch", None) is None


@pytest.mark.parametrize("spec", ["topp", "ratio:0.3", "naee", "entropy", "topp:0.9..0.3"])
def test_calibration_hits_a_target_act(tiny_models, spec):
    mm = tiny_models("qwen3_moe")  # native top-4
    cb = _blocks(3, 48, seed=3)
    plan = routing.calibrate_plan(mm, spec, cb, target_act=2.5, tol=0.01)
    cal = plan.meta["calibration"]
    assert abs(cal["measured_act"] - 2.5) <= 0.03, cal
    act, per = routing.measure_act(mm, plan, cb)
    assert act == pytest.approx(cal["measured_act"], abs=1e-9)
    kind = spec.split(":")[0]
    assert all(r.startswith(kind) for r in plan.layers.values())
    if spec == "entropy":  # per-layer thresholds: every layer near the target
        assert all(abs(a - 2.5) < 0.15 for a in per.values()), per
    if ".." in spec:  # the depth schedule keeps its slope
        taus = [float(plan.layers[str(i)].split(":")[1]) for i in range(4)]
        assert taus == sorted(taus, reverse=True) and taus[0] > taus[-1]


def test_calibration_errors(mx):
    cb = _blocks(2, 16)
    with pytest.raises(PlanError, match="no dynamic rule"):
        routing.calibrate_plan(mx, "topk:1", cb)
    with pytest.raises(PlanError, match="out of reach"):
        routing.calibrate_plan(mx, "topp", cb, target_act=2.5)
    with pytest.raises(PlanError, match="one kind"):
        routing.calibrate_plan(mx, {"base": "naee", "layers": {"3": "topp:0.5"}}, cb, target_act=1.5)
    # static layers count towards the target: top-2 in layer 0 leaves (1.25*4-2)/3 = 1.0 for the rest
    plan = routing.calibrate_plan(mx, {"base": "ratio:0.5", "layers": {"0": "topk:2"}}, cb, target_act=1.25)
    assert plan.layers["0"] == "topk:2" and abs(plan.meta["calibration"]["measured_act"] - 1.25) < 0.02


def test_entropy_thresholds_fill_highest_entropy_first():
    h = torch.arange(100, dtype=torch.float32) / 10
    ts = routing.entropy_thresholds(h, 2.3, cap=4, num_experts=16)
    k = 1 + (h.unsqueeze(-1) > torch.tensor(ts)).sum(-1)
    assert float(k.float().mean()) == pytest.approx(2.3, abs=0.02)
    assert int(k[-1]) == 3 and int(k[0]) == 2  # everyone gets a 2nd expert, the top 30% a 3rd


# ---- sweep ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2", "gpt_oss"])
def test_layer_cached_sweep_equals_plain_path(tiny_models, arch, tmp_path):
    mm = tiny_models(arch)
    b = _blocks(3, 32)
    cached = se.sweep(mm, se.Scorer(mm, "ppl", blocks=b, batch_size=2), group=1, progress=False)
    plain = se.sweep(mm, se.Scorer(mm, "ppl", blocks=b, batch_size=2), group=1, cache=False, progress=False)
    assert cached["layer_cache"] and not plain["layer_cache"]
    n_groups = len(mm.moe_layer_indices)  # deepseek_v2's dense layer 0 forms no group
    assert len(cached["rows"]) == len(plain["rows"]) == n_groups * (n_groups + 1) // 2
    for a, p in zip(cached["rows"], plain["rows"]):
        assert (a["l"], a["r"]) == (p["l"], p["r"])
        assert a["score"] == pytest.approx(p["score"], rel=1e-5)
        assert a["act_per_layer"] == pytest.approx(p["act_per_layer"])
    k = mm.native_top_k
    row = next(r for r in cached["rows"] if r["l"] == mm.moe_layer_indices[0] and r["r"] == 3)
    assert row["act"] == pytest.approx(k - 1)  # every MoE layer reduced
    if arch == "mixtral":
        paths = se.write_sweep(cached, tmp_path)
        assert paths["png"].stat().st_size > 1000
        lines = paths["csv"].read_text().splitlines()
        assert lines[0].startswith("l,r,") and len(lines) == 11


def test_run_partial_resumes_from_cached_layer_inputs(mx):
    ids = _blocks(2, 24)
    with torch.no_grad():
        full = mx.model(input_ids=ids).logits
        h1 = routing.run_partial(mx, ids, stop=1)
        h3 = routing.run_partial(mx, ids, start=1, hidden=h1, stop=3)
        out = routing.run_partial(mx, ids, start=3, hidden=h3)
    assert torch.allclose(out, full, atol=1e-5)
    assert "forward" not in mx.decoder_layers[0].__dict__  # skipped layers are restored


# ---- search --------------------------------------------------------------------------------------


class FakeScorer(se.Scorer):
    """A perplexity-like score from the resolved plan: reducing layer i costs W[i]; a Hook at the
    current layer (set by the fake trainer) wins back 0.1 - 0.04·|layer - 2|."""

    W = {0: 0.5, 1: 0.3, 2: 0.02, 3: 0.03}

    def __init__(self, mm):
        super().__init__(mm, "ppl", blocks=torch.zeros(1, 2, dtype=torch.long))
        self.hook_layer = None

    def fresh(self, plan, *, progress=False):
        self.evals += 1
        rules = Plan.parse(plan).resolve(self.mm)
        score = 10.0 + sum(self.W[i] * (2 - r.k) for i, r in rules.items() if isinstance(r, TopK))
        if self.hook_layer is not None:
            score -= 0.1 - 0.04 * abs(self.hook_layer - 2)
        return {"score": score, "act": sum(r.k if isinstance(r, TopK) else 2 for r in rules.values()) / 4}

    def key(self, plan):
        return super().key(plan) + f"|fake-hook={self.hook_layer}"


def test_search_follows_the_paper_procedure(mx, tmp_path, monkeypatch):
    sc = FakeScorer(mx)
    trained = []

    def train_fn(layer, plan):
        trained.append((layer, plan))
        sc.hook_layer = layer

    monkeypatch.setattr(se_paper, "_remove_hooks", lambda mm: setattr(sc, "hook_layer", None))
    res = se.search(mx, sc, tolerance=0.01, step=1, train_fn=train_fn, log_path=tmp_path / "log.jsonl")
    # k: topk:1 costs 8.5% -> keep k=2; l: 3 (+0.3%) ok, 2 (+0.5%) ok, 1 (+3.5%) over -> TLNLE(2, 2)
    assert (res["k"], res["l"], res["plan"]) == (2, 2, "tlnle:k=2,l=2")
    assert res["drop"] == pytest.approx(0.005) and res["act"] == 1.5
    phases = [(e["phase"], e["plan"], e["within"]) for e in res["log"] if "score" in e]
    assert phases[:5] == [("base", "native", True), ("k", "topk:1", False), ("l", "tlnle:k=2,l=3", True),
                          ("l", "tlnle:k=2,l=2", True), ("l", "tlnle:k=2,l=1", False)]
    # hook: binary search over 0..3 under top-1 finds layer 2 without training at every layer
    h = res["hook"]
    assert h["layer"] == 2 and h["plan"] == "topk:1" and len(trained) < 4
    assert all(p == "topk:1" for _, p in trained)
    assert h["score"] == pytest.approx(h["no_hook_score"] - 0.1)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == len(res["log"]) and json.loads(lines[1])["plan"] == "topk:1"
    plan = se.search_plan(res)
    assert plan.base == "tlnle:k=2,l=2" and plan.meta["hook"]["layer"] == 2
    # a budget stops the search with the best plan so far
    sc2 = FakeScorer(mx)
    res2 = se.search(mx, sc2, tolerance=0.01, step=1, max_evals=3, hook=False)
    assert res2["budget_exhausted"] and res2["evals"] == 3 and res2["plan"] == "tlnle:k=2,l=3"
    assert any("budget" in e.get("event", "") for e in res2["log"])
    with pytest.raises(SearchError):
        se.search(mx, sc2, tolerance=-0.1)


def test_tlnle_for_act(tiny_models, mx):
    assert se.tlnle_for_act(mx, 1.5) == "tlnle:k=2,l=2"
    assert se.tlnle_for_act(mx, 1.0) == "tlnle:k=2,l=0"
    q = tiny_models("qwen3_moe")
    assert se.tlnle_for_act(q, 1.5) == "tlnle:k=2,l=2"
    assert se.tlnle_for_act(q, 3.75) == "tlnle:k=4,l=3"


# ---- compare and the pipeline ----------------------------------------------------------------------


def test_compare_at_matched_act(mx, tmp_path):
    b = _blocks(3, 40, seed=5)
    sc = se.Scorer(mx, "ppl", blocks=b)
    res = se.compare(mx, sc, 1.5, methods=["native", "topk", "tlnle", "topp", "ratio", "naee", "entropy"],
                     calib_blocks=b)
    rows = {(r["method"], r["plan"]): r for r in res["rows"]}
    assert {m for m, _ in rows} == {"native", "topk", "tlnle", "topp", "ratio", "naee", "entropy"}
    assert rows[("topk", "topk:1")]["act"] == 1.0 and rows[("topk", "topk:2")]["act"] == 2.0
    assert rows[("tlnle", "tlnle:k=2,l=2")]["act"] == 1.5
    for r in res["rows"]:
        if r["method"] in ("topp", "ratio", "naee", "entropy"):
            assert abs(r["act"] - 1.5) <= 0.02, r  # calibrated on the scored blocks
            assert r["calibration"]["target_act"] == 1.5
    paths = se.write_compare(res, tmp_path)
    md = paths["md"].read_text()
    assert "| method | plan | perplexity | Act |" in md and "tlnle:k=2,l=2" in md
    assert paths["png"].stat().st_size > 1000
    with pytest.raises(SearchError):
        se.compare(mx, sc, 2.5)


def test_run_pipeline_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "tiny:mixtral", "--calib", "builtin", "--tolerance", "0.01", "--out", str(out),
            "--n-train", "4", "--n-val", "2", "--n-eval", "2", "--block-len", "32", "--search-hook-steps", "2",
            "--hook-steps", "3", "--hook-batch-size", "2", "--hook-candidates", "1-2", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, capsys.readouterr().err
    for f in ("report.md", "results.json", "plan.json", "hook_plan.json", "search.json", "search_log.jsonl",
              "sweep.json", "sweep.csv", "sweep.png", "quality_vs_act.png", "hook/hook.safetensors",
              "hook/hookmoe.json"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    for section in ("## Results (held-out)", "## Per-layer plan", "## Search", "## Sensitivity sweep",
                    "Gap recovered", "Wall time"):
        assert section in md
    res = json.loads((out / "results.json").read_text())
    assert res["hook"]["layer"] in (1, 2)
    assert res["allocation"]["allocator"] == "dp"  # the default: the Hook's plan comes from the dp allocator
    ev = res["evals"]
    assert ev["native"]["act"] == 2.0 and ev["reduced + hook"]["hook"]["layers"] == [res["hook"]["layer"]]
    assert ev["reduced (no hook)"]["hook"] is None
    assert ev["reduced + hook"]["params"]["active"] > ev["reduced (no hook)"]["params"]["active"]
    # the artifacts are usable: eval the hook plan with the hook, and compare with an existing hook
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", "tiny:mixtral", "--hook", str(out / "hook"), "--data", "builtin", "--n-blocks", "2",
              "--block-len", "32", "--device", "cpu", "--json", "-"])
    assert e.value.code == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["hook"]["layers"] == [res["hook"]["layer"]]
    assert r["plan"] == res["hook"]["plan"] == Plan.parse(str(out / "hook_plan.json")).base  # the Hook's own plan
    with pytest.raises(SystemExit) as e:
        main(["compare", "tiny:mixtral", "--data", "builtin", "--act", "1.0", "--methods", "topk,hook",
              "--hook", str(out / "hook"), "--n-blocks", "2", "--block-len", "32", "--device", "cpu",
              "--out", str(tmp_path / "cmp")])
    assert e.value.code == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["method"] for r in cmp["rows"]] == ["topk", "hook"]
    assert cmp["rows"][1]["hook_layers"] == [res["hook"]["layer"]]
    # re-running into the same directory is refused before any work
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_cli_bad_input_exits_2(capsys):
    for argv in (["search", "tiny:mixtral", "--data", "builtin", "--tolerance", "-1"],
                 ["compare", "tiny:mixtral", "--data", "builtin", "--act", "1.5", "--methods", "magic"],
                 ["compare", "tiny:mixtral", "--data", "builtin", "--act", "3", "--methods", "topk"],
                 ["sweep", "tiny:mixtral", "--data", "builtin", "--metric", "lm-eval"]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--device", "cpu"])
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err


# ---- options: one dataclass per command ----------------------------------------------------------


def _option_classes():
    from hookmoe.search.compare import CompareOptions
    from hookmoe.search.frontier import FrontierOptions
    from hookmoe.search.paper import SearchOptions
    from hookmoe.search.pipeline import RunOptions
    from hookmoe.search.sweep import SweepOptions

    return {"sweep": SweepOptions, "search": SearchOptions, "compare": CompareOptions, "run": RunOptions,
            "frontier": FrontierOptions}


@pytest.mark.parametrize("command", ["sweep", "search", "compare", "run", "frontier"])
def test_search_command_flags_come_from_their_options_dataclass(command, tmp_path, capsys):
    """Every flag of the command is a field of its dataclass, with the same default; every bound of a field is
    enforced on the command line as one ``error:`` line naming the flag, before any model is loaded."""
    import dataclasses

    from typer.main import get_command

    from hookmoe.cli import build_app
    from hookmoe.options import cli_fields, flag_name

    cls = _option_classes()[command]
    params = {p.name: p for p in get_command(build_app()).get_command(None, command).params}
    fields = cli_fields(cls)
    assert {f.name for f in fields} == set(params) - {"overwrite", "help"}
    for f in fields:
        has_default = f.default is not dataclasses.MISSING
        assert params[f.name].required is not has_default, f.name
        if has_default:
            assert params[f.name].default == f.default, f.name
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "--batch-size" in capsys.readouterr().out
    # the required options, valid; then each bounded field just out of its bounds
    valid = {"data": "builtin", "calib": "builtin", "act": "1.5", "acts": "1.5", "out": str(tmp_path / "o")}
    base = [command, "tiny:mixtral", "--device", "cpu"]
    for f in fields:
        if f.default is dataclasses.MISSING and not f.metadata.get("positional"):
            base += [flag_name(f), valid[f.name]]
    bounded = [f for f in fields if f.metadata.get("min") is not None or f.metadata.get("max") is not None]
    assert bounded
    for f in bounded:
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        bad = (lo if f.metadata.get("min_open") else lo - 1) if lo is not None else hi + 1
        with pytest.raises(SystemExit) as e:
            main(base + [flag_name(f), str(bad)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (f.name, err)
        assert flag_name(f) in err, (f.name, err)
    # the library function behind the command takes its settings (and their bounds) from the same class
    from hookmoe.errors import UserError
    from hookmoe.search.frontier import frontier
    from hookmoe.search.pipeline import run_pipeline

    library = {"sweep": lambda **kw: se.sweep(None, None, **kw), "search": lambda **kw: se.search(None, None, **kw),
               "compare": lambda **kw: se.compare(None, None, 1.5, **kw),
               "run": lambda **kw: run_pipeline(None, out=tmp_path / "r", calib="builtin", **kw),
               "frontier": lambda **kw: frontier(None, calib_blocks=None, eval_blocks=None, acts=[1.5], **kw)}
    settings = next(k for k in cls.__mro__[1:] if k.__name__.endswith("Settings"))
    f = next(f for f in dataclasses.fields(settings) if f.metadata.get("min") is not None)
    with pytest.raises(UserError, match=flag_name(f)):
        library[command](**{f.name: f.metadata["min"] - 1})
