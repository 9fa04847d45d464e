"""`hookmoe convert` on a dense model dispatched with accelerate (issue 16): half its layers offloaded to disk, the
conversion, router calibration and KD fine-tune give exactly the MoE of the undispatched model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hookmoe.cmoe import calibrate_routers, convert_dense, distill_moe
from hookmoe.models.loading import load_causal_lm
from hookmoe.models.tiny import tiny_tokenizer

VOCAB = 259


def _budget(model, n_layers: int) -> int:
    """Bytes of the embedding + ``n_layers`` decoder layers + one more (accelerate keeps room for the largest layer)
    + slack smaller than a layer: the other layers, the final norm and the head go to disk."""
    emb = sum(p.numel() * p.element_size() for p in model.get_input_embeddings().parameters())
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return emb + (n_layers + 1) * layer + layer // 4


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=1, pad_token_id=0, initializer_range=0.08)
    d = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pair(dense_dir, tmp_path_factory):
    ref, _ = load_causal_lm(str(dense_dir), device="cpu", dtype="float32")
    off = tmp_path_factory.mktemp("offload")
    disp, _ = load_causal_lm(str(dense_dir), dtype="float32", max_memory={"cpu": _budget(ref, 2)},
                             offload_folder=off)
    return ref, disp


def _ids(seed: int, n: int = 4, t: int = 24) -> torch.LongTensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_half_the_layers_are_on_disk(pair):
    _, disp = pair
    dm = disp.hf_device_map
    assert dm["model.layers.0"] == "cpu" and dm["model.layers.1"] == "cpu"
    assert dm["model.layers.2"] == "disk" and dm["model.layers.3"] == "disk"
    assert disp.model.layers[3].mlp.gate_proj.weight.device.type == "meta"  # not in memory outside its forward


def test_conversion_calibration_and_finetune_of_a_dispatched_model_equal_the_undispatched(pair):
    ref, disp = pair
    blocks, ids = _ids(1, 8, 32), _ids(2)
    kw = dict(num_experts=6, num_shared=2, top_k=2, seed=0, progress=False)
    a, b = convert_dense(ref, None, blocks, **kw), convert_dense(disp, None, blocks, **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert disp.model.layers[3].mlp.gate_proj.weight.device.type == "meta"  # put back where accelerate keeps it
    curves = []
    for moe, dense in ((a, ref), (b, disp)):
        cal = calibrate_routers(moe, dense, _ids(3, 4, 32), steps=2, progress=False)
        ft = distill_moe(moe, dense, _ids(4, 4, 32), steps=2, batch_size=2, hidden_weight=0.5, progress=False)
        curves.append((cal["loss_curve"], ft["loss_curve"]))
    la, lb = _logits(a, ids), _logits(b, ids)
    assert torch.equal(la, lb) and curves[0] == curves[1]
    assert not torch.equal(la, _logits(convert_dense(ref, None, blocks, **kw), ids))  # the training changed it


def test_convert_command_takes_the_placement_options(dense_dir, pair, tmp_path, capsys, monkeypatch):
    import hookmoe
    import hookmoe.cmoe.pipeline as pipeline
    from hookmoe.cli import main

    ref, _ = pair
    placed = []

    def spy(dense, *a, **k):
        placed.append(dict(getattr(dense, "hf_device_map", None) or {}))
        return convert_dense(dense, *a, **k)

    monkeypatch.setattr(pipeline, "convert_dense", spy)
    common = [str(dense_dir), "--experts", "6", "--shared", "2", "--top-k", "2", "--calib-blocks", "4",
              "--seq-len", "32", "--calibrate-steps", "1", "--finetune-steps", "1", "--finetune-blocks", "4",
              "--no-progress"]
    for name, extra in (("plain", []), ("offloaded", ["--max-memory", f"cpu={_budget(ref, 2)}",
                                                      "--offload-folder", str(tmp_path / "off")])):
        with pytest.raises(SystemExit) as e:
            main(["convert", *common, "--out", str(tmp_path / name), *extra])
        assert e.value.code == 0, capsys.readouterr().err
    assert placed[0] == {} and placed[1]["model.layers.3"] == "disk"  # the dense model really was offloaded
    ids = _ids(5)
    a = hookmoe.load(str(tmp_path / "plain"), device="cpu", dtype="float32")
    b = hookmoe.load(str(tmp_path / "offloaded"), device="cpu", dtype="float32")
    assert torch.equal(_logits(a.model, ids), _logits(b.model, ids))
