"""Hook training: KD/LM/hidden objectives, frozen base, checkpoint/resume, NaN stop, CLI."""

import json
import math

import pytest
import torch

from hookmoe.data import make_blocks
from hookmoe.errors import ArtifactError, PlanError
from hookmoe.hook import SUBMODULE, attach_hooks
from hookmoe.hook import load
from hookmoe.errors import TrainingError
from hookmoe.training import (TrainConfig, hook_eval, kd_loss, kd_loss_topk, lm_loss, lr_at, read_log,
                           train_hook)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


@pytest.fixture(scope="module")
def blocks():
    tok = load("tiny:mixtral", device="cpu").tokenizer
    train = make_blocks(tok, "builtin", 32, 64, seed=0, split="train", cache_dir=False)
    val = make_blocks(tok, "builtin", 8, 64, seed=0, split="heldout", cache_dir=False)
    return train, val


def fresh(arch="mixtral"):
    return load(f"tiny:{arch}", device="cpu")


def hook_state(hs):
    return {k: v.clone() for k, v in hs.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Losses and schedule
# --------------------------------------------------------------------------------------------------


def test_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert kd_loss(t, t).abs() < 1e-6 and kd_loss(s, t) > 0
    p, q = t.log_softmax(-1), s.log_softmax(-1)
    torch.testing.assert_close(kd_loss(s, t), (p.exp() * (p - q)).sum(-1).mean())
    # top-K cache with K = vocab is the exact KL; smaller K gives a (coarsened, still >= 0) KL
    lp = t.log_softmax(-1)
    v, i = lp.topk(11, -1)
    torch.testing.assert_close(kd_loss_topk(s, v, i), kd_loss(s, t), atol=1e-5, rtol=1e-5)
    v3, i3 = lp.topk(3, -1)
    assert 0 <= kd_loss_topk(s, v3, i3) <= kd_loss(s, t) + 1e-6
    ids = torch.randint(0, 11, (2, 5), generator=g)
    torch.testing.assert_close(lm_loss(s, ids), torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11),
                                                                                    ids[:, 1:].reshape(-1)))


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(layers=[1], plan={}, lr=1.0, warmup=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    lin = TrainConfig(layers=[1], plan={}, lr=1.0, warmup=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(s, 5, lin) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])


# --------------------------------------------------------------------------------------------------
# Training recovers quality
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_kd_training_lowers_heldout_kd_below_no_hook(arch, blocks):
    train, val = blocks
    mm = fresh(arch)
    params = {n: p.clone() for n, p in mm.model.named_parameters()}
    layer = mm.moe_layer_indices[0]
    r = train_hook(mm, layers=layer, plan="topk:1", train_blocks=train, val_blocks=val, objective="kd", steps=24,
                   lr=1e-2, batch_size=4, progress=False, patience=None, eval_every=8)
    m = r.metrics
    assert m["val_kd"] < m["val_kd_nohook"] and m["kd_gap_closed"] > 0.01, m
    ev = hook_eval(mm, val, "topk:1", r.hookset, nohook=True)  # independent re-evaluation
    assert ev["kd"] == pytest.approx(m["val_kd"], rel=1e-4) and ev["kd"] < ev["kd_nohook"]
    # the base stayed frozen and untouched; only the Hook changed
    for n, p in mm.model.named_parameters():
        if SUBMODULE not in n:
            assert torch.equal(p, params[n]), n
            assert p.requires_grad  # requires_grad restored after training
    assert all(not p.requires_grad for p in r.hookset.parameters())
    assert getattr(mm, "_routing_patch", None) is None or not mm._routing_patch._active


def test_lm_and_hidden_objectives_train(blocks):
    train, val = blocks
    mm = fresh("qwen2_moe")
    r = train_hook(mm, layers=1, plan="topk:1", train_blocks=train, val_blocks=val, objective="hidden",
                   steps=16, lr=1e-2, progress=False, patience=None)
    assert r.metrics["val_hidden"] < r.metrics["val_hidden_nohook"]
    r2 = train_hook(mm, layers=1, plan="topk:1", train_blocks=train, val_blocks=val, objective="lm", steps=16,
                    lr=1e-2, progress=False, patience=None)
    assert r2.metrics["val_lm"] < r2.metrics["val_lm_nohook"]
    r3 = train_hook(mm, layers=2, plan="topk:1", train_blocks=train, val_blocks=val, objective="hidden",
                    hidden_layer=2, steps=4, progress=False)
    assert math.isfinite(r3.metrics["final_train_loss"])
    with pytest.raises(TrainingError, match="below the hooked layer"):
        train_hook(mm, layers=2, plan="topk:1", train_blocks=train, objective="hidden", hidden_layer=1, steps=1,
                   progress=False)


def test_kd_topk_cache_grad_accum_and_checkpointing_agree(blocks):
    train, val = blocks
    # 3 steps x 2 rows read all 6 blocks, so a teacher cache pays and is built when asked for
    kw = dict(layers=1, plan="topk:1", train_blocks=train[:6], objective="kd", steps=3, lr=1e-2, batch_size=2,
              progress=False, kd_topk=None)  # exact teacher, recomputed per batch
    calls = {}

    def counted(tag):
        mm = fresh()
        mm.layer(3).block.register_forward_pre_hook(lambda m, a: calls.__setitem__(tag, calls.get(tag, 0) + 1))
        return mm

    a = train_hook(counted("plain"), **kw)
    b = train_hook(counted("ckpt"), grad_checkpointing=True, **kw)
    assert calls == {"plain": 3 * 2, "ckpt": 3 * 3}  # teacher + student (+ recomputation in backward)
    assert a.metrics["kd_teacher"] == "recompute (exact)"
    for k, v in hook_state(a.hookset).items():
        torch.testing.assert_close(hook_state(b.hookset)[k], v, atol=1e-6, rtol=1e-5)
    c = train_hook(fresh(), **dict(kw, kd_topk=259))  # full-vocab cache = exact teacher
    for k, v in hook_state(a.hookset).items():
        torch.testing.assert_close(hook_state(c.hookset)[k], v, atol=1e-5, rtol=1e-4)
    d = train_hook(fresh(), **dict(kw, kd_topk=8))
    assert d.metrics["final_train_loss"] > 0 and d.metrics["kd_teacher"] == "top-8 cache"
    g = train_hook(fresh(), **dict(kw, kd_topk=8, train_blocks=train))  # reads 6 of 32 blocks: no cache
    assert g.metrics["kd_teacher"].startswith("recompute (the run reads 6 of 32 blocks")
    f = train_hook(fresh(), **dict(kw, kd_topk=32, kd_cache_max_gb=1e-6))  # too big for the budget: recompute
    assert f.metrics["kd_teacher"].startswith("recompute (top-32 cache")
    for k, v in hook_state(a.hookset).items():
        torch.testing.assert_close(hook_state(f.hookset)[k], v, atol=1e-6, rtol=1e-5)
    e = train_hook(fresh(), grad_accum=2, **kw)  # 2 x 2 rows per step
    assert e.metrics["tokens"] == 3 * 4 * train.shape[1]


def test_plan_is_applied_during_training_and_restored_after(blocks):
    train, _ = blocks
    mm = fresh()
    mm.active_plan = mm.routing("topk:2")
    seen = []
    h = mm.layer(0).router.register_forward_hook(lambda m, a, o: seen.append(m.top_k))
    train_hook(mm, layers=1, plan="topk:1", train_blocks=train, objective="lm", steps=2, progress=False)
    h.remove()
    assert set(seen) == {1}
    assert mm._routing_patch is not None and mm._routing_patch._active and mm._routing_patch.plan.base == "topk:2"
    with pytest.raises(PlanError):
        train_hook(mm, layers=1, plan="naee", train_blocks=train, steps=1, progress=False)  # uncalibrated
    assert mm._routing_patch._active and mm._routing_patch.plan.base == "topk:2"


# --------------------------------------------------------------------------------------------------
# Checkpoint / resume / artifacts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["interrupt", "crash"])
def test_resumed_run_ends_with_the_same_weights(blocks, tmp_path, how):
    train, val = blocks
    kw = dict(layers="1,2", plan="topk:1", train_blocks=train, val_blocks=val, objective="kd", steps=14, lr=1e-2,
              batch_size=4, grad_accum=2, eval_every=3, checkpoint_every=4, patience=2, progress=False)
    full = train_hook(fresh(), out_dir=tmp_path / "full", **kw)

    def stop(step, rec):
        if step == 7:
            raise KeyboardInterrupt if how == "interrupt" else RuntimeError("power cut")

    with pytest.raises(KeyboardInterrupt if how == "interrupt" else RuntimeError):
        train_hook(fresh(), out_dir=tmp_path / "part", on_step=stop, **kw)
    st = json.loads((tmp_path / "part" / "checkpoint" / "trainer_state.json").read_text())
    assert st["step"] == (7 if how == "interrupt" else 4)  # interrupt saves; a crash keeps the last periodic one
    with pytest.raises(TrainingError, match="already holds a training checkpoint"):
        train_hook(fresh(), out_dir=tmp_path / "part", **kw)
    res = train_hook(fresh(), out_dir=tmp_path / "part", resume=True, **kw)
    a, b = hook_state(full.hookset), hook_state(res.hookset)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert res.metrics["steps"] == full.metrics["steps"] and res.metrics["tokens"] == full.metrics["tokens"]
    assert res.metrics["best_step"] == full.metrics["best_step"]
    la, lb = read_log(tmp_path / "full" / "train_log.jsonl"), read_log(tmp_path / "part" / "train_log.jsonl")
    assert [(r["step"], r["kind"]) for r in la] == [(r["step"], r["kind"]) for r in lb]
    assert [r["loss"] for r in la if r["kind"] == "train"] == pytest.approx(
        [r["loss"] for r in lb if r["kind"] == "train"], abs=1e-6)
    # no pickle anywhere: the checkpoint is safetensors + JSON
    names = sorted(p.name for p in (tmp_path / "part" / "checkpoint").iterdir())
    assert names == ["hook.safetensors", "optimizer.safetensors", "trainer_state.json"]


def test_resume_refuses_other_settings_or_data(blocks, tmp_path):
    train, _ = blocks
    kw = dict(layers=1, plan="topk:1", train_blocks=train, objective="kd", steps=2, progress=False)
    train_hook(fresh(), out_dir=tmp_path, **kw)
    with pytest.raises(ArtifactError, match="objective"):
        train_hook(fresh(), out_dir=tmp_path, resume=True, **dict(kw, objective="lm"))
    with pytest.raises(ArtifactError, match="different calibration data"):
        train_hook(fresh(), out_dir=tmp_path, resume=True, **dict(kw, train_blocks=train.flip(0)))
    with pytest.raises(ArtifactError, match="nothing to resume"):
        train_hook(fresh(), out_dir=tmp_path / "empty", resume=True, **kw)
    # more steps or another lr would change the schedule: the result would differ from an uninterrupted run
    with pytest.raises(ArtifactError, match="--steps"):
        train_hook(fresh(), out_dir=tmp_path, resume=True, **dict(kw, steps=4))
    with pytest.raises(ArtifactError, match="--lr"):
        train_hook(fresh(), out_dir=tmp_path, resume=True, **dict(kw, lr=1e-3))


def test_artifact_of_a_training_run_round_trips(blocks, tmp_path):
    train, val = blocks
    mm = fresh()
    r = train_hook(mm, layers=2, plan="topk:1", train_blocks=train, val_blocks=val, steps=6, lr=1e-2,
                   out_dir=tmp_path, progress=False, patience=None)
    m = json.loads((tmp_path / "hookmoe.json").read_text())
    assert m["training"]["objective"] == "kd" and m["training"]["steps"] == 6 and m["training"]["lr"] == 1e-2
    assert m["metrics"]["val_kd"] == pytest.approx(r.metrics["val_kd"])
    assert m["plan"]["base"] == "topk:1" and m["hook"]["layers"] == [2]
    mm2 = fresh()
    attach_hooks(mm2, tmp_path)
    ev = hook_eval(mm2, val, "topk:1", mm2.hookset)
    assert ev["kd"] == pytest.approx(r.metrics["val_kd"], rel=1e-5)
    log = read_log(tmp_path / "train_log.jsonl")
    assert [x["step"] for x in log if x["kind"] == "train"] == list(range(1, 7))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(blocks, tmp_path):
    train, _ = blocks
    mm = fresh()
    with pytest.raises(TrainingError, match="became (nan|inf)") as e:
        train_hook(mm, layers=1, plan="topk:1", train_blocks=train, objective="lm", steps=20, lr=1e30,
                   warmup=0, max_grad_norm=None, out_dir=tmp_path, progress=False, init="paper")
    assert "\n" not in str(e.value) and "checkpoint" in str(e.value)
    st = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "checkpoint" / "hook.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())
    assert st["step"] >= 0 and all(math.isfinite(x["loss"]) for x in st["history"] if x["kind"] == "train")
    assert all(p.requires_grad for n, p in mm.model.named_parameters() if SUBMODULE not in n)


def test_bad_settings_are_user_errors(blocks):
    train, _ = blocks
    mm = fresh()
    for kw, frag in [(dict(objective="nope"), "--objective must be one of lm, kd, hidden, got 'nope'"),
                     (dict(init="x"), "--init must be one of zero, paper"),
                     (dict(lr=-1.0), "--lr must be > 0"), (dict(batch_size=64), "fewer than one batch"),
                     (dict(schedule="step"), "--schedule must be one of"), (dict(warmup=-1), "--warmup must be >= 0"),
                     (dict(kind="lora"), "unknown compensator kind"), (dict(budget="lots"), "bad --budget")]:
        args = dict(layers=1, plan="topk:1", train_blocks=train, steps=1, progress=False)
        args.update(kw)
        with pytest.raises(TrainingError, match=frag):
            train_hook(mm, **args)


def test_cli_train_writes_artifact_log_and_plot(tmp_path, capsys):
    from hookmoe.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "tiny:mixtral", "--plan", "topk:1", "--layer", "1", "--calib", "builtin", "--steps", "20",
              "--out", str(out), "--samples", "16", "--seq-len", "64", "--val-samples", "4", "--device", "cpu",
              "--no-progress", "--json", str(tmp_path / "m.json")])
    cap = capsys.readouterr()
    assert e.value.code == 0, cap.err
    for name in ("hook.safetensors", "hookmoe.json", "train_log.jsonl", "loss.png", "checkpoint/trainer_state.json"):
        assert (out / name).is_file(), name
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["steps"] == 20 and "val_kd" in m and "kd_gap_closed" in m
    assert "gap closed" in cap.out
    # the artifact drives generate; a bad layer and a bad objective are one-line errors
    with pytest.raises(SystemExit) as e:
        main(["generate", "tiny:mixtral", "--prompt", "Hi", "--hook", str(out), "--plan", "topk:1",
              "--max-new-tokens", "2", "--device", "cpu"])
    assert e.value.code == 0
    capsys.readouterr()
    for bad, frag in ((["--layer", "9"], "not an MoE layer"), (["--objective", "xx"], "--objective must be one of"),
                      (["--calib", str(tmp_path / "missing.txt")], "")):
        args = ["train", "tiny:mixtral", "--plan", "topk:1", "--layer", "1", "--steps", "1", "--samples", "4",
                "--seq-len", "32", "--val-samples", "0", "--out", str(tmp_path / "bad"), "--no-progress"]
        args = args + bad
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and frag in err and "Traceback" not in err
