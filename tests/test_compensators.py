"""Compensators (hook, router, output, hook+router): no-op when detached, change outputs only from their layer on,
train only their own parameters, round-trip through the artifact / export / hookmoe.load, respect budgets."""

import json

import pytest
import torch

from hookmoe.data import make_blocks
from hookmoe.errors import ArtifactError, TrainingError
from hookmoe.hook import (attach_hooks, export_model, insert_compensators, load, load_export, read_manifest,
                          remove_hooks)
from hookmoe.hook.compensators import parse_budget, size_for_budget
from hookmoe.training import train_hook

KINDS = ["hook", "router", "output", "hook+router"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def blocks():
    tok = load("tiny:mixtral", device="cpu").tokenizer
    return make_blocks(tok, "builtin", 8, 32, seed=0, split="train", cache_dir=False)


def fresh(arch="mixtral"):
    return load(f"tiny:{arch}", device="cpu")


def base_state(mm):
    return {k: v.detach().clone() for k, v in mm.model.state_dict().items()}


def randomize(hs, scale=0.5):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5 if p.dim() else
                    torch.tensor(0.7))


def hidden_states(mm, ids, plan="topk:1"):
    with torch.no_grad(), mm.routing(plan):
        out = mm.model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states, out.logits


@pytest.mark.parametrize("kind", KINDS)
def test_changes_outputs_only_where_attached_and_detaches_cleanly(kind, blocks):
    mm = fresh()
    ids = blocks[:2]
    before = base_state(mm)
    ref_h, ref = hidden_states(mm, ids)
    hs = insert_compensators(mm, kind, "2", rank=4, inner_size=8)
    assert hs.kind == kind and hs.layers == [2]
    _, same = hidden_states(mm, ids)
    assert torch.equal(same, ref)  # every kind starts as the identity (zero init)
    randomize(hs)
    h, out = hidden_states(mm, ids)
    # hidden_states[j] is the input of decoder layer j: layers 0..2 see the same input, layer 2's output differs
    for j in range(3):
        assert torch.equal(h[j], ref_h[j]), f"hidden state {j} changed below the attached layer"
    assert not torch.allclose(h[3], ref_h[3], atol=1e-4)
    assert not torch.allclose(out, ref, atol=1e-4)
    with hs.disabled():
        _, off = hidden_states(mm, ids)
    assert torch.equal(off, ref)
    remove_hooks(mm)
    _, back = hidden_states(mm, ids)
    assert torch.equal(back, ref)
    after = mm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind,arch", [("hook", "mixtral"), ("router", "mixtral"), ("router", "gpt_oss"),
                                       ("output", "qwen2_moe"), ("hook+router", "deepseek_v3")])
def test_training_updates_only_the_compensator(kind, arch, blocks):
    mm = fresh(arch)
    ids = blocks[:2]
    plan = f"topk:{mm.native_top_k - 1}"
    _, ref = hidden_states(mm, ids, plan)
    before = base_state(mm)
    layers = mm.moe_layer_indices[-2:]
    res = train_hook(mm, layers=layers, plan=plan, train_blocks=blocks, kind=kind, steps=3, lr=1e-2, batch_size=4,
                     progress=False, inner_size=8, rank=4)
    hs = res.hookset
    assert hs.kind == kind and res.config.kind == kind
    # top-1 (mixtral, gpt_oss): the router's weights carry no gradient; the straight-through estimator must
    for name, p in hs.named_parameters():
        assert float(p.detach().abs().sum()) > 0, f"{name} never trained"
    _, out = hidden_states(mm, ids, plan)
    assert not torch.allclose(out, ref, atol=1e-5)
    remove_hooks(mm)
    after = mm.model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"base parameters changed: {changed[:3]}"
    _, back = hidden_states(mm, ids, plan)
    assert torch.equal(back, ref)


@pytest.mark.parametrize("kind", ["router", "output", "hook+router"])
def test_artifact_round_trip_gives_identical_logits(kind, blocks, tmp_path):
    mm = fresh()
    ids = blocks[:2]
    train_hook(mm, layers="1,3", plan="topk:1", train_blocks=blocks, kind=kind, steps=2, lr=1e-2, progress=False,
               out_dir=tmp_path / "a", inner_size=8, rank=4)
    _, trained = hidden_states(mm, ids)
    m = read_manifest(tmp_path / "a")
    assert m["kind"] == kind and m["_kind"] == kind
    mm2 = load("tiny:mixtral", device="cpu", hook=tmp_path / "a")
    assert mm2.hookset.kind == kind and mm2.hookset.plan.describe() == mm.hookset.plan.describe()
    _, again = hidden_states(mm2, ids)
    assert torch.equal(again, trained)
    # export: the base model is saved without the compensator; load restores plan + compensator
    export_model(mm2, tmp_path / "exp")
    mm3 = load_export(tmp_path / "exp")
    assert mm3.hookset.kind == kind
    with torch.no_grad():
        assert torch.equal(mm3.model(input_ids=ids).logits, trained)


def test_old_hook_artifacts_without_kind_still_load(blocks, tmp_path):
    mm = fresh()
    train_hook(mm, layers="1", plan="topk:1", train_blocks=blocks, steps=1, progress=False, out_dir=tmp_path / "h",
               inner_size=8)
    cfg = tmp_path / "h" / "hookmoe.json"
    m = json.loads(cfg.read_text())
    del m["kind"], m["hook"]["kind"], m["hook"]["parts"]
    cfg.write_text(json.dumps(m))
    hs = attach_hooks(fresh(), tmp_path / "h")
    assert hs.kind == "hook" and hs.layers == [1] and hs.inner_size == 8


def test_budget_sizes_and_limits(blocks):
    mm = fresh()
    base = sum(p.numel() for p in mm.model.parameters())
    assert parse_budget("0.5%") == ("fraction", 0.005) and parse_budget("1200") == ("params", 1200.0)
    with pytest.raises(TrainingError, match="--budget"):
        parse_budget("half")
    for kind in KINDS:
        res = train_hook(mm, layers="all", plan="topk:1", train_blocks=blocks, kind=kind, budget="1%", steps=1,
                         progress=False)
        n = res.hookset.num_params()
        assert 0 < n <= 0.01 * base, (kind, n, base)
        remove_hooks(mm)
    sized = size_for_budget(mm, "hook+output", {"hook": [0, 1], "output": [0, 1]}, "2%")
    assert sized["inner_size"] >= 1 and sized["rank"] >= 1 and sized["params"] <= sized["budget_params"]
    with pytest.raises(TrainingError, match="--budget"):
        train_hook(mm, layers="all", plan="topk:1", train_blocks=blocks, kind="router", budget="10", steps=1,
                   progress=False)
    with pytest.raises(TrainingError, match="--kind"):  # a setting of the run: refused before anything is built
        train_hook(mm, layers="all", plan="topk:1", train_blocks=blocks, kind="lora", steps=1, progress=False)


def test_auto_layers_follow_the_sensitivity_profile(blocks, tmp_path):
    mm = fresh()
    res = train_hook(mm, layers="auto", plan="topk:1", train_blocks=blocks, kind="hook+router", budget="2%", steps=1,
                     progress=False, out_dir=tmp_path / "auto")
    sel = read_manifest(tmp_path / "auto")["training"]["data"]["layer_selection"]
    sens = {int(i): v for i, v in sel["sensitivity"].items()}
    assert set(sens) == set(mm.moe_layer_indices) and all(v >= 0 for v in sens.values())
    parts = res.hookset.part_layers()
    assert parts["router"] == mm.moe_layer_indices
    chosen = parts["hook"]
    assert chosen and max(sens, key=sens.get) in chosen
    # every chosen layer is at least as sensitive as every layer left out
    left = [i for i in sens if i not in chosen]
    assert all(sens[c] >= sens[o] for c in chosen for o in left)
    assert res.hookset.num_params() <= 0.02 * sum(p.numel() for p in mm.model.parameters())


def test_cli_train_kind_budget_auto(tmp_path, capsys):
    from hookmoe.cli import main

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        main(["train", "tiny:mixtral", "--plan", "topk:1", "--kind", "router", "--budget", "1%", "--steps", "2",
              "--samples", "4", "--seq-len", "32", "--val-samples", "0", "--out", str(out), "--no-progress",
              "--device", "cpu"])
    cap = capsys.readouterr()
    assert e.value.code == 0, cap.err
    m = read_manifest(out)
    assert m["kind"] == "router" and m["hook"]["parts"]["router"]["layers"] == m["base_model"]["moe_layers"]
    with pytest.raises(SystemExit) as e:
        main(["generate", "tiny:mixtral", "--prompt", "Hi", "--hook", str(out), "--max-new-tokens", "2",
              "--device", "cpu"])
    assert e.value.code == 0
    capsys.readouterr()
    for bad, frag in ((["--kind", "lora"], "--kind"), (["--budget", "half"], "--budget"),
                      (["--kind", "router", "--budget", "10"], "--budget")):
        with pytest.raises(SystemExit) as e:
            main(["train", "tiny:mixtral", "--plan", "topk:1", "--layer", "all", "--steps", "1", "--samples", "4",
                  "--seq-len", "32", "--val-samples", "0", "--out", str(tmp_path / "x"), "--no-progress"] + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and frag in err and "Traceback" not in err


def test_resume_continues_a_compensator_run_and_refuses_another_kind(blocks, tmp_path):
    kw = dict(layers="1,2", plan="topk:1", train_blocks=blocks, steps=3, lr=1e-2, progress=False, rank=4,
              checkpoint_every=1)
    full = train_hook(fresh(), kind="output", out_dir=tmp_path / "full", **kw).hookset.state_dict()

    def stop(step, rec):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_hook(fresh(), kind="output", out_dir=tmp_path / "o", on_step=stop, **kw)
    with pytest.raises(ArtifactError, match="kind"):
        train_hook(fresh(), kind="router", out_dir=tmp_path / "o", resume=True, **kw)
    res = train_hook(fresh(), kind="output", out_dir=tmp_path / "o", resume=True, **kw)
    again = res.hookset
    assert again.kind == "output" and set(again.state_dict()) == set(full) and res.metrics["steps"] == 3
    assert read_manifest(tmp_path / "o")["kind"] == "output"
