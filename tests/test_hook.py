"""The Hook module: placement inside the MoE block, zero init, submodule behaviour, artifacts, export."""

import json

import pytest
import torch

from conftest import ARCHS
from hookmoe.errors import ArtifactError, ModelError, PlanError
from hookmoe.hook import (SUBMODULE, Hook, attach_hooks, export_model, insert_hooks, parse_layers, read_manifest,
                          remove_hooks)
from hookmoe.hook import load
from hookmoe.models import build_tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run fastest single-threaded, especially when other work shares the cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fresh(arch="mixtral", **kw):
    return load(f"tiny:{arch}", device="cpu", **kw)


def logits(mm, ids):
    with torch.no_grad():
        return mm.model(input_ids=ids, use_cache=False).logits


def randomize(hs, seed=1):
    """Give the hooks clearly non-trivial weights (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (0.5 if p.dim() == 0 else 0.0))


# --------------------------------------------------------------------------------------------------
# The module and its placement
# --------------------------------------------------------------------------------------------------


def test_hook_formula_and_inits():
    x = torch.randn(5, 16)
    h = Hook(16, 8, init="paper", seed=3)
    assert h.linear1.bias is None and h.linear2.bias is None
    assert h.r.item() == 0.5
    want = x + 0.5 * (torch.relu(x @ h.linear1.weight.T) @ h.linear2.weight.T)
    torch.testing.assert_close(h(x), want)
    # nn.Linear's default range: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert h.linear1.weight.abs().max() <= 1 / 16 ** 0.5 and h.linear2.weight.abs().max() <= 1 / 8 ** 0.5
    assert torch.equal(Hook(16, 8, init="paper", seed=3).linear1.weight, h.linear1.weight)  # seeded
    z = Hook(16, 8, init="zero")
    assert torch.count_nonzero(z.linear2.weight) == 0 and torch.count_nonzero(z.linear1.weight) > 0
    assert torch.equal(z(x), x)
    with pytest.raises(ArtifactError):
        Hook(16, 8, init="nope")


def test_inserting_a_hook_leaves_the_global_rng_alone():
    mm = fresh()
    state = torch.random.get_rng_state()
    insert_hooks(mm, [1, 2], init="paper")
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_hook_leaves_logits_bit_identical(arch, ids):
    mm = fresh(arch)
    ref = logits(mm, ids)
    hs = insert_hooks(mm, mm.moe_layer_indices, init="zero")
    assert torch.equal(logits(mm, ids), ref)
    randomize(hs)
    assert not torch.allclose(logits(mm, ids), ref)
    hs.remove()
    assert torch.equal(logits(mm, ids), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_router_experts_and_shared_see_the_hook_but_the_residual_does_not(arch, ids):
    mm = fresh(arch)
    li = mm.moe_layer_indices[1]
    layer, dec = mm.layer(li), mm.decoder_layers[li]
    hs = insert_hooks(mm, li, init="paper")
    randomize(hs)
    hook = layer.block.hookmoe_hook
    seen = {}
    norm = dec.post_attention_layernorm
    handles = [
        norm.register_forward_hook(lambda m, a, o: seen.update(residual=a[0], normed=o)),
        layer.router.register_forward_pre_hook(lambda m, a: seen.update(router_in=a[0])),
        layer.block.register_forward_hook(lambda m, a, o: seen.update(block_out=o[0] if isinstance(o, tuple) else o)),
        dec.register_forward_hook(lambda m, a, o: seen.update(layer_out=o[0] if isinstance(o, tuple) else o)),
    ]
    if layer.shared is not None:
        handles.append(layer.shared.register_forward_pre_hook(lambda m, a: seen.update(shared_in=a[0])))
    logits(mm, ids)
    for h in handles:
        h.remove()
    with torch.no_grad():
        hooked = hook(seen["normed"])
    assert not torch.allclose(hooked, seen["normed"])
    # the router (and the experts, which get the same tensor) see the Hook's output ...
    torch.testing.assert_close(seen["router_in"].reshape(hooked.shape), hooked)
    if layer.shared is not None:
        torch.testing.assert_close(seen["shared_in"].reshape(hooked.shape), hooked)
    # ... while the decoder layer adds its residual from the un-hooked stream
    mult = getattr(dec, "residual_multiplier", 1.0)
    torch.testing.assert_close(seen["layer_out"], seen["residual"] + seen["block_out"] * mult)


def test_hook_is_a_real_submodule_and_removal_is_clean(ids):
    mm = fresh()
    keys_before = set(mm.model.state_dict())
    pre_before = [len(layer.block._forward_pre_hooks) for layer in mm.layers]
    hs = insert_hooks(mm, "1,2")
    assert hs.layers == [1, 2] and hs.inner_size == mm.hook_hidden_size
    new = set(mm.model.state_dict()) - keys_before
    assert new == {f"model.layers.{i}.mlp.{SUBMODULE}.{n}" for i in (1, 2) for n in ("linear1.weight",
                                                                                       "linear2.weight", "r")}
    assert sum(p.numel() for p in hs.parameters()) == 2 * (2 * 64 * mm.hook_hidden_size + 1)
    mm.model.requires_grad_(False)
    assert not any(p.requires_grad for p in hs.parameters())  # the model's own calls reach the hooks
    mm.model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in hs.parameters())
    mm.model.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in hs.parameters())
    remove_hooks(mm)
    assert set(mm.model.state_dict()) == keys_before
    assert [len(layer.block._forward_pre_hooks) for layer in mm.layers] == pre_before
    assert all(not hasattr(layer.block, SUBMODULE) for layer in mm.layers)


def test_disabled_context_and_replacing_hooks(ids):
    mm = fresh()
    ref = logits(mm, ids)
    hs = insert_hooks(mm, 1, init="paper")
    with hs.disabled():
        assert torch.equal(logits(mm, ids), ref)
    assert not torch.equal(logits(mm, ids), ref)
    insert_hooks(mm, 2, init="zero")  # replaces the old set
    assert not hasattr(mm.layer(1).block, SUBMODULE)
    assert torch.equal(logits(mm, ids), ref)


def test_layer_parsing_and_validation():
    mm = fresh("deepseek_v2")  # layer 0 is dense
    assert parse_layers("1,3", mm) == [1, 3] and parse_layers("1-3", mm) == [1, 2, 3] and parse_layers(2) == [2]
    with pytest.raises(ModelError, match="not an MoE layer"):
        insert_hooks(mm, 0)
    with pytest.raises(ModelError, match="not an MoE layer"):
        insert_hooks(mm, 7)
    with pytest.raises(ModelError, match="bad hook layer"):
        parse_layers("x")
    # "all" = every MoE layer (DeepSeek-V2's dense layer 0 is not one), and it needs the model to know them
    assert parse_layers("all", mm) == mm.moe_layer_indices and 0 not in parse_layers(" ALL ", mm)
    with pytest.raises(ModelError, match="need the model"):
        parse_layers("all")
    hs = insert_hooks(mm, 2, inner_size=5)
    assert hs.inner_size == 5
    assert mm.hook_hidden_size == 2 * mm.expert_intermediate_size  # fine-grained: 2x
    assert fresh("mixtral").hook_hidden_size == fresh("mixtral").expert_intermediate_size


# --------------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path, ids):
    mm = fresh()
    hs = insert_hooks(mm, [1, 2], init="paper")
    randomize(hs)
    with mm.routing("topk:1"):
        want = logits(mm, ids)
    d = hs.save_pretrained(tmp_path / "hook", plan="topk:1", training={"objective": "kd"}, metrics={"x": 1.0})
    return d, want


def test_artifact_round_trip(artifact, ids):
    d, want = artifact
    assert (d / "hook.safetensors").is_file() and (d / "hookmoe.json").is_file()
    m = json.loads((d / "hookmoe.json").read_text())
    assert m["format"] == "hookmoe-hook/1"
    assert m["base_model"]["fingerprint"] == fresh().fingerprint() and m["base_model"]["arch"] == "mixtral"
    assert m["hook"]["layers"] == [1, 2] and m["hook"]["inner_size"] == 64 and m["hook"]["init"] == "paper"
    assert m["plan"] == {"format": "hookmoe-plan/1", "base": "topk:1"}
    assert m["training"] == {"objective": "kd"} and m["metrics"] == {"x": 1.0}
    mm2 = load("tiny:mixtral", device="cpu", hook=d, plan="topk:1")
    assert torch.equal(logits(mm2, ids), want)
    mm3 = fresh()
    hs3 = attach_hooks(mm3, d)
    assert hs3.plan.base == "topk:1" and hs3.layers == [1, 2]


def test_artifact_for_another_model_is_refused(artifact):
    d, _ = artifact
    with pytest.raises(ArtifactError, match="trained for another model"):
        attach_hooks(fresh("qwen2_moe"), d)  # same hidden size, other architecture
    other = load(build_tiny("mixtral", hidden_size=32), tokenizer=None)
    with pytest.raises(ArtifactError, match="hidden size 64"):
        attach_hooks(other, d)
    deeper = load(build_tiny("mixtral", num_hidden_layers=6), tokenizer=None)  # different config
    with pytest.raises(ArtifactError, match="another model"):
        attach_hooks(deeper, d)
    hs = attach_hooks(deeper, d, strict=False)  # same shapes: allowed when asked for
    assert hs.layers == [1, 2]


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "corrupt or truncated"),
    ("flip", "corrupt or truncated"),
    ("json", "not valid JSON"),
    ("no_weights", "no weights file"),
    ("format", "expected 'hookmoe-hook/1'"),
])
def test_corrupt_artifact_is_refused(artifact, damage, fragment):
    d, _ = artifact
    w, c = d / "hook.safetensors", d / "hookmoe.json"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "flip":
        b = bytearray(w.read_bytes())
        b[-10] ^= 0xFF
        w.write_bytes(bytes(b))
    elif damage == "json":
        c.write_text(c.read_text()[:40])
    elif damage == "no_weights":
        w.unlink()
    elif damage == "format":
        m = json.loads(c.read_text())
        m["format"] = "something/9"
        c.write_text(json.dumps(m))
    mm = fresh()
    with pytest.raises(ArtifactError, match=fragment):
        attach_hooks(mm, d)
    assert not any(hasattr(layer.block, SUBMODULE) for layer in mm.layers)


def test_truncated_file_without_checksum_is_still_refused(artifact):
    d, _ = artifact
    m = json.loads((d / "hookmoe.json").read_text())
    del m["weights"]["sha256"]
    (d / "hookmoe.json").write_text(json.dumps(m))
    w = d / "hook.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        attach_hooks(fresh(), d)


def test_missing_artifact_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not a hook artifact"):
        read_manifest(tmp_path)


def test_cli_refuses_a_mismatched_or_corrupt_hook_in_one_line(artifact, capsys):
    from hookmoe.cli import main

    d, _ = artifact
    for model in ("tiny:qwen2_moe", "tiny:mixtral"):
        if model == "tiny:mixtral":
            (d / "hook.safetensors").write_bytes(b"garbage")
        with pytest.raises(SystemExit) as e:
            main(["generate", model, "--prompt", "hi", "--hook", str(d), "--max-new-tokens", "1", "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert err.strip().startswith("error:") and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 2  # one message (rich may wrap it)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_export_restores_model_hook_and_plan(tmp_path, arch, ids):
    mm = fresh(arch)
    li = mm.moe_layer_indices[1]
    hs = insert_hooks(mm, li, init="paper")
    randomize(hs)
    hs.save_pretrained(tmp_path / "hook", plan="topk:1")
    out = export_model(mm, tmp_path / "export", hook=tmp_path / "hook")
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "plan.json", "hookmoe_export.json",
                 "hook/hook.safetensors", "hook/hookmoe.json"):
        assert (out / name).is_file(), name
    import hookmoe

    mm2 = hookmoe.load(out, device="cpu")
    assert type(mm2.tokenizer).__name__ == "ByT5Tokenizer"
    assert mm2.hookset is not None and mm2.hookset.layers == [li]
    assert mm2.active_plan.plan.base == "topk:1"
    with mm.routing("topk:1"):
        want = logits(mm, ids)
        enc = mm.encode("The hook ")
        g_want = mm.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(logits(mm2, ids), want)
    enc2 = mm2.encode("The hook ")
    g = mm2.model.generate(**enc2, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(g, g_want)
    # the saved base model holds no hook tensors
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(SUBMODULE in k for k in f.keys())
    with pytest.raises(ArtifactError, match="not empty"):
        export_model(mm, out, hook=tmp_path / "hook")
    # another plan (a dynamic one) on export; the exporting model's own routing is left alone
    mm.active_plan = mm.routing("topk:2")
    out2 = export_model(mm, tmp_path / "export2", plan="topp:0.5")
    assert mm.active_plan._active and mm._routing_patch is mm.active_plan
    mm3 = load(out2, device="cpu")
    assert mm3.active_plan.plan.base == "topp:0.5" and mm3.hookset.layers == [li]
    with pytest.raises(PlanError, match="calibration"):
        export_model(mm, tmp_path / "export3", plan="naee")
    assert not (tmp_path / "export3").exists()


def test_cli_export_then_generate_matches(tmp_path, capsys):
    from hookmoe.cli import main

    mm = fresh()
    hs = insert_hooks(mm, 1, init="paper")
    randomize(hs)
    hs.save_pretrained(tmp_path / "hook", plan="topk:1")
    with pytest.raises(SystemExit) as e:
        main(["export", "tiny:mixtral", "--hook", str(tmp_path / "hook"), "--out", str(tmp_path / "ex")])
    assert e.value.code == 0, capsys.readouterr().err
    capsys.readouterr()
    args = ["--prompt", "Hello", "--plan", "topk:1", "--max-new-tokens", "6", "--device", "cpu", "--json", "-"]
    with pytest.raises(SystemExit):
        main(["generate", "tiny:mixtral", "--hook", str(tmp_path / "hook")] + args)
    a = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "ex")] + args)
    b = json.loads(capsys.readouterr().out)
    assert a["text"] == b["text"] and a["act"] == b["act"] == 1.0
