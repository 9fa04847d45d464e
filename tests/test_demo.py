"""``hookmoe demo`` end to end on a tiny random dense llama saved as a local directory (minutes-long
budgets cut to seconds): every stage runs, the report, JSON, hook artifact and the saved MoE exist and
are consistent. The real-weight run is a script (`make demo`), never a timed test."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hookmoe
from hookmoe.demo import DemoConfig, locate_model, run_demo
from hookmoe.errors import ModelError
from hookmoe.models import tiny_tokenizer


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=259, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=1, pad_token_id=0)
    d = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_demo_runs_every_stage_on_a_local_dense_model(dense_dir, tmp_path):
    out = tmp_path / "report"
    cfg = DemoConfig(model=str(dense_dir), out=str(out), experts=6, shared=2, top_k=4, reduced_k=3, seq_len=32,
                     convert_blocks=4, router_steps=2, router_blocks=4, finetune_steps=3, finetune_blocks=8,
                     finetune_seq_len=32, finetune_batch=2, eval_blocks=2, hook_blocks=8, hook_seq_len=32,
                     hook_steps=3, val_blocks=2, threads=1, progress=False)
    result = run_demo(cfg)
    names = [r["name"] for r in result["rows"]]
    assert names[:4] == ["dense", "MoE native k, training-free", "MoE native k, routers calibrated (2 steps)",
                         "MoE native k"]
    assert result["native_ppl_training_free"] == result["rows"][1]["ppl"]
    assert result["native_ppl_routers_calibrated"] == result["rows"][2]["ppl"]
    by = {r["name"]: r for r in result["rows"]}
    assert by["MoE native k"]["act"] == pytest.approx(4.0) and by["MoE native k"]["ffn_active_pct"] == 75.0
    assert by["MoE reduced k (uniform)"]["act"] == pytest.approx(3.0)
    assert 3.0 < by["MoE reduced k (TLNLE)"]["act"] < 4.0
    assert all(r["ppl"] > 1.0 for r in result["rows"])
    assert set(result["checks"]) == {"native_within_10pct_of_dense", "native_ffn_active_le_75pct",
                                     "reduced_ge_15pct_worse_than_native", "hook_recovers_ge_30pct_of_gap",
                                     "best_at_act_3_within_15pct_of_native"}
    assert result["conversion"]["finetune"]["steps"] == 3
    assert result["conversion"]["finetune"]["train"] == DemoConfig.finetune_train
    assert result["conversion"]["router_calibration"]["steps"] == 2
    for f in ("report.md", "demo.json", "frontier.png", "hook/hookmoe.json", "hook/hook.safetensors",
              "moe/config.json", "moe/cmoe.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "demo.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    # default budget: the dp allocator at Act = reduced k (exactly), and at the TLNLE row's Act
    dp3 = by["MoE dp allocation (Act 3)"]
    assert dp3["act"] == pytest.approx(3.0) and dp3["plan"].startswith("layers:")
    assert sum(int(k) for k in dp3["plan"].split(":")[1].split(",")) == 3 * 4
    tl_act = by["MoE reduced k (TLNLE)"]["act"]
    assert by[f"MoE dp allocation (Act {tl_act:g})"]["act"] == pytest.approx(tl_act)
    assert result["sensitivity"]["ks"] == [2, 3] and set(result["sensitivity"]["delta"]) == {"0", "1", "2", "3"}
    # default: one Hook per MoE layer, trained under the dp plan, sized to 1 % of the model
    assert result["hook"]["layers"] == [0, 1, 2, 3] and result["hook"]["label"] == "Hooks@all 4 layers"
    w = result["hook"]["inner_size"]
    assert json.loads((out / "hook" / "hookmoe.json").read_text())["hook"]["inner_size"] == w
    assert result["hook"]["params"] == 4 * (2 * 64 * w + 1) and result["hook"]["params_pct"] <= 1.0
    hooked = by["MoE dp (Act 3) + Hooks@all 4 layers"]
    assert hooked["plan"] == dp3["plan"] and hooked["act"] == pytest.approx(3.0)
    assert result["method"] == "dp + hook" and "of the perplexity gap" in (out / "report.md").read_text()
    # the saved MoE loads as an MoE and is the fine-tuned one (its cmoe.json carries the fine-tune record)
    mm = hookmoe.load(str(out / "moe"), dtype="float32", device="cpu")
    assert mm.native_top_k == 4 and len(mm.layers) == 4
    assert json.loads((out / "moe" / "cmoe.json").read_text())["finetune"]["steps"] == 3


def test_demo_rejects_unknown_models_and_bad_k(tmp_path):
    with pytest.raises(ModelError, match="demo model must be one of"):
        locate_model(str(tmp_path / "missing.bin"))
    from hookmoe.errors import UserError
    with pytest.raises(UserError, match="reduced-k"):
        run_demo(DemoConfig(model="smollm2", out=str(tmp_path / "o"), top_k=4, reduced_k=4))
    with pytest.raises(UserError, match="hook-inner-size"):  # refused before any loading
        run_demo(DemoConfig(model="smollm2", out=str(tmp_path / "o"), hook_inner_size=-1))
    with pytest.raises(UserError, match="finetune-train must be one of moe, experts, routers"):
        run_demo(DemoConfig(model="smollm2", out=str(tmp_path / "o"), finetune_train="attention"))
    with pytest.raises(UserError, match="--hook-steps must be >= 1, got 0"):
        run_demo(DemoConfig(model="smollm2", out=str(tmp_path / "o"), hook_steps=0))
    with pytest.raises(UserError, match="--eval-blocks must be >= 1, got 0"):
        run_demo(DemoConfig(model="gemma3-270m", out=str(tmp_path / "o"), eval_blocks=0))
    with pytest.raises(UserError, match="unknown --compensator 'lora'"):
        DemoConfig(compensator="lora")
    with pytest.raises(UserError, match="bad --hook-budget 'lots'"):
        DemoConfig(hook_budget="lots")
    with pytest.raises(UserError, match="--allocator must be one of"):
        DemoConfig(allocator="best")
    with pytest.raises(UserError, match="--act 3.5 needs another --allocator"):
        DemoConfig(allocator="uniform", act=3.5)


def test_demo_budgets_default_per_model_and_explicit_values_win():
    from hookmoe.demo import MODEL_BUDGETS, resolve_budgets

    smol = resolve_budgets(DemoConfig(model="smollm2"))
    gemma = resolve_budgets(DemoConfig(model="gemma3-270m"))
    assert (smol.finetune_steps, smol.hook_steps, smol.eval_blocks) == (45, 90, 16)
    assert (gemma.finetune_steps, gemma.hook_steps, gemma.eval_blocks) == (0, 40, 4)
    other = resolve_budgets(DemoConfig(model="/some/dense.gguf"))
    assert {k: getattr(other, k) for k in MODEL_BUDGETS["smollm2"]} == MODEL_BUDGETS["smollm2"]
    mine = resolve_budgets(DemoConfig(model="gemma3-270m", finetune_steps=20, hook_steps=10))
    assert (mine.finetune_steps, mine.hook_steps, mine.eval_blocks) == (20, 10, 4)


def test_demo_refuses_a_bad_hook_layer_before_converting(dense_dir, tmp_path):
    from hookmoe.errors import UserError

    with pytest.raises(UserError, match=r"out of range: the model has 4 layers"):
        run_demo(DemoConfig(model=str(dense_dir), out=str(tmp_path / "r"), hook_layers="7", threads=1, progress=False))
    assert not (tmp_path / "r" / "moe").exists()


def test_demo_single_hook_layer(dense_dir, tmp_path):
    cfg = DemoConfig(model=str(dense_dir), out=str(tmp_path / "r"), seq_len=32, convert_blocks=4, finetune_steps=0,
                     eval_blocks=2, hook_blocks=8, hook_seq_len=32, hook_steps=2, val_blocks=2, hook_layers="2",
                     hook_inner_size=0, save_moe=False, threads=1, progress=False, sens_blocks=2)
    result = run_demo(cfg)
    assert result["hook"]["layers"] == [2] and result["hook"]["label"] == "Hook@2"
    # 0 = the paper's width: twice the expert size (16) for a fine-grained MoE
    assert result["hook"]["inner_size"] == 32
    tl_act = next(r["act"] for r in result["rows"] if r["name"] == "MoE reduced k (TLNLE)")
    assert [r["name"] for r in result["rows"]][-2:] == ["MoE dp (Act 3) + Hook@2", f"MoE dp (Act {tl_act:g}) + Hook@2"]
    assert "dp + hook" in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / "moe").exists()


def test_demo_uniform_allocator_is_the_papers_flow(dense_dir, tmp_path):
    """--allocator uniform: no sensitivity, the Hook trained under top-(k-1) everywhere."""
    cfg = DemoConfig(model=str(dense_dir), out=str(tmp_path / "u"), seq_len=32, convert_blocks=4, router_steps=0,
                     finetune_steps=0, eval_blocks=2, hook_blocks=8, hook_seq_len=32, hook_steps=2, val_blocks=2,
                     allocator="uniform", save_moe=False, threads=1, progress=False)
    result = run_demo(cfg)
    assert result["sensitivity"] is None and result["allocation"] == {}
    last = result["rows"][-1]
    assert last["name"] == "MoE uniform (Act 3) + Hooks@all 4 layers" and last["plan"] == "topk:3"
    assert result["method"] == "uniform + hook"
    assert "sensitivity + allocation" not in result["stage_times_s"] and "hook training" in result["stage_times_s"]


def test_convert_command_end_to_end(dense_dir, tmp_path, capsys):
    """`hookmoe convert` with a KD fine-tune (layer-wise term on): a loadable MoE directory whose record says so;
    bad shapes are one-line errors."""
    from hookmoe.cli import main

    out = tmp_path / "moe"
    argv = ["convert", str(dense_dir), "--experts", "6", "--shared", "2", "--top-k", "4", "--out", str(out),
            "--calib-blocks", "4", "--seq-len", "32", "--finetune-steps", "2", "--finetune-blocks", "4",
            "--finetune-hidden-weight", "0.5", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, capsys.readouterr().err
    assert "6 routed + 2 shared experts per FFN, top-4" in capsys.readouterr().out
    record = json.loads((out / "cmoe.json").read_text())
    assert record["finetune"]["steps"] == 2 and record["finetune"]["hidden_weight"] == 0.5
    assert record["finetune"]["train"] == "experts"  # the default: routers frozen (measured best)
    mm = hookmoe.load(str(out), dtype="float32", device="cpu")
    assert mm.native_top_k == 4 and len(mm.layers) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv[:3] + ["5"] + argv[4:])  # 5 + 2 experts do not divide the 128-neuron FFN
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # refused before loading anything
        main(argv + ["--calibrate-steps", "1", "--calibrate-target", "size"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--calibrate-target must be auto, gain or norm" in err
