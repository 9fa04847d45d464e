"""Scale-out (issue 16 items 1 and 3): models dispatched across devices / CPU / disk with accelerate, and
data-parallel Hook training under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hookmoe
from hookmoe.errors import ModelError
from hookmoe.hook import insert_hooks

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _budget(mm, n_layers: int) -> int:
    """Bytes of the embedding + the first ``n_layers`` decoder layers + one more (accelerate keeps room for the
    largest layer on each device) + slack smaller than a layer."""
    emb = sum(p.numel() * p.element_size() for p in mm.model.get_input_embeddings().parameters())
    layers = [sum(p.numel() * p.element_size() for p in mm.decoder_layers[i].parameters()) for i in range(n_layers)]
    return emb + sum(layers) + layers[0] + layers[0] // 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hookmoe.load("tiny:mixtral")
    assert ref.num_layers == 4
    off = tmp_path_factory.mktemp("offload")
    mm = hookmoe.load("tiny:mixtral", max_memory={"cpu": _budget(ref, 2)}, offload_folder=off)
    return ref, mm, off


def test_dispatch_places_half_the_layers_on_disk(pair):
    ref, mm, off = pair
    dm = mm.model.hf_device_map
    assert dm["model.layers.0"] == "cpu" and dm["model.layers.1"] == "cpu"
    assert dm["model.layers.2"] == "disk" and dm["model.layers.3"] == "disk"
    # offloaded weights are not in memory: they sit on the meta device until their layer runs
    assert mm.layer(3).experts.gate_up_proj.device.type == "meta"
    assert any(Path(off).iterdir())
    assert mm.device == torch.device("cpu")


@pytest.mark.parametrize("plan", ["native", "tlnle:k=2,l=2", "ratio:0.1"])
def test_dispatched_logits_and_act_identical(pair, plan):
    ref, mm, _ = pair
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with ref.routing(plan) as p1:
            a = ref.model(input_ids=ids).logits
        with mm.routing(plan) as p2:
            b = mm.model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert p1.stats.act() == p2.stats.act()
    assert p1.stats.act_per_layer() == p2.stats.act_per_layer()
    if plan != "native":
        assert 1.0 <= p2.stats.act() < 2.0  # the plan really dropped experts


def test_dispatched_hook_on_offloaded_block(pair):
    ref, mm, _ = pair
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(2))
    hs_ref = insert_hooks(ref, [1, 3], init="paper", seed=5)
    hs = insert_hooks(mm, [1, 3], init="paper", seed=5)
    try:
        for h in hs.hooks.values():  # each Hook on its block's execution device, never on meta
            assert next(h.parameters()).device == torch.device("cpu")
        with torch.no_grad():
            with ref.routing("topk:1"):
                a = ref.model(input_ids=ids).logits
            with mm.routing("topk:1"):
                b = mm.model(input_ids=ids).logits
            with ref.routing("topk:1"), hs_ref.disabled():
                c = ref.model(input_ids=ids).logits
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # the Hooks changed the output
    finally:
        hs.remove()
        hs_ref.remove()


def test_hook_training_on_dispatched_model(pair):
    from hookmoe.training import train_hook

    ref, mm, _ = pair
    blocks = torch.randint(0, 250, (8, 16), generator=torch.Generator().manual_seed(3))
    kw = dict(layers=[3], plan="topk:1", train_blocks=blocks, steps=3, lr=1e-3, batch_size=4, progress=False)
    r_ref = train_hook(ref, **kw)
    r = train_hook(mm, **kw)
    for k, v in r_ref.hookset.state_dict().items():
        assert torch.allclose(v, r.hookset.state_dict()[k], atol=1e-6, rtol=0)
    assert float(r.hookset.state_dict()["layers.3.linear2.weight"].abs().max()) > 0  # it trained
    r.hookset.remove()
    r_ref.hookset.remove()


def test_too_little_memory_is_refused_before_loading(tmp_path):
    with pytest.raises(ModelError, match=r"0 of 4 decoder layers fit.*--offload-folder"):
        hookmoe.load("tiny:mixtral", max_memory="cpu=300KB")
    with pytest.raises(ModelError, match="--max-memory"):
        hookmoe.load("tiny:mixtral", max_memory="cpu=lots")
    with pytest.raises(ModelError, match="--device-map"):
        hookmoe.load("tiny:mixtral", device_map="everywhere")


def test_device_map_file(tmp_path):
    f = tmp_path / "map.json"
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
             "model.norm", "model.rotary_emb", "lm_head"]
    f.write_text(json.dumps({n: ("disk" if n in ("model.layers.1", "lm_head") else "cpu") for n in names}))
    ref = hookmoe.load("tiny:mixtral")
    mm = hookmoe.load("tiny:mixtral", device_map=str(f), offload_folder=tmp_path / "off")
    assert mm.model.hf_device_map["model.layers.1"] == "disk"
    ids = torch.randint(0, 250, (1, 10))
    with torch.no_grad():
        assert torch.equal(ref.model(input_ids=ids).logits, mm.model(input_ids=ids).logits)


# ---- data-parallel Hook training ------------------------------------------------------------------------------------

TRAIN = ["train", "tiny:mixtral", "--plan", "topk:1", "--layer", "1", "--steps", "6", "--samples", "8",
         "--seq-len", "32", "--val-samples", "0", "--lr", "1e-3", "--checkpoint-every", "2", "--no-progress"]


def _torchrun(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             HOOKMOE_DIST_BACKEND="gloo", **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hookmoe.cli", *args], env=e, capture_output=True, text=True, timeout=400)


def _in_process(args: list[str]) -> int:
    """Run the CLI in this process (saves a Python start-up); returns its exit status."""
    from hookmoe.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "hook.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "one"
    assert _in_process(TRAIN + ["--batch-size", "4", "--out", str(out)]) == 0
    return out


def test_torchrun_two_ranks_equal_one_process(single, tmp_path):
    out = tmp_path / "two"
    p = _torchrun(TRAIN + ["--batch-size", "2", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _weights(single), _weights(out)
    assert float(a["layers.1.linear2.weight"].abs().max()) > 1e-4  # the Hook moved
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    # one artifact, one log: rank 0 alone wrote
    assert sorted(x.name for x in out.iterdir()) == sorted(x.name for x in single.iterdir())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["tokens"] == 6 * 4 * 32  # global tokens
    m = json.loads((out / "hookmoe.json").read_text())
    assert m["training"]["batch_size"] == 4 and m["metrics"]["ranks"] == 2
    assert p.stdout.count("artifact:") == 1  # one rank reports


def test_killed_rank_stops_the_launch_and_resume_in_one_process(single, tmp_path, capsys):
    out = tmp_path / "killed"
    # the two ranks also run with half of each model copy offloaded to disk (a per-rank offload folder)
    placed = ["--max-memory", "cpu=1401344", "--offload-folder", str(tmp_path / "off")]
    p = _torchrun(TRAIN + ["--batch-size", "2", "--out", str(out)] + placed, env={"HOOKMOE_TEST_KILL": "1:4"})
    assert p.returncode != 0
    assert "another rank failed" in p.stdout + p.stderr
    assert not (out / "hook.safetensors").exists()
    st = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert 2 <= st["step"] < 6
    # resume the 2-rank checkpoint in one process (same global batch: 4) -> the uninterrupted result
    assert sorted(x.name for x in (tmp_path / "off").iterdir()) == ["rank0", "rank1"]
    assert _in_process(TRAIN + ["--batch-size", "4", "--out", str(out), "--resume"]) == 0
    a, b = _weights(single), _weights(out)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    # a different global batch is refused with the reason
    capsys.readouterr()
    assert _in_process(TRAIN + ["--batch-size", "2", "--out", str(out), "--resume"]) == 2
    assert "batch size per rank x ranks" in capsys.readouterr().err


def test_lm_eval_on_offloaded_model(tmp_path):
    """``hookmoe eval --tasks`` (lm-evaluation-harness) on a half-disk-offloaded model: same scores and Act."""
    pytest.importorskip("lm_eval")
    task = "hookmoe_scale_mc"
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": ["a red fox", "the river", "quick brown dog ran"], "label": i % 3}) + "\n"
        for i, q in enumerate(["the cat sat on a mat", "a dog ran far", "over the lazy tree house", "to the river"])))
    (tmp_path / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc_norm\n")
    results = []
    for extra in ([], ["--max-memory", "cpu=1401344", "--offload-folder", str(tmp_path / "off")]):
        js = tmp_path / f"ev{len(extra)}.json"
        assert _in_process(["eval", "tiny:mixtral", "--plan", "tlnle:k=2,l=2", "--tasks", task, "--include-path",
                            str(tmp_path), "--batch-size", "4", "--json", str(js)] + extra) == 0
        results.append(json.loads(js.read_text())["results"][0])
    a, b = results
    assert any((tmp_path / "off").iterdir())
    assert "acc_norm,none" in a["tasks"][task]["metrics"]
    assert a["tasks"][task]["metrics"] == b["tasks"][task]["metrics"]
    assert a["act"] == b["act"] and 1.0 < a["act"] < 2.0


def test_local_directory_through_from_pretrained(pair, tmp_path):
    """A saved model goes through transformers' from_pretrained(device_map=, max_memory=, offload_folder=)."""
    ref, _, _ = pair
    d = tmp_path / "model"
    ref.model.save_pretrained(d)
    with pytest.raises(ModelError, match=r"decoder layers fit.*--offload-folder"):
        hookmoe.load(str(d), max_memory={"cpu": _budget(ref, 2)}, tokenizer=ref.tokenizer)
    mm = hookmoe.load(str(d), max_memory={"cpu": _budget(ref, 2)}, offload_folder=tmp_path / "off",
                      tokenizer=ref.tokenizer)
    assert "disk" in set(mm.model.hf_device_map.values())
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ref.routing("topk:1"), mm.routing("topk:1"):
        assert torch.equal(ref.model(input_ids=ids).logits, mm.model(input_ids=ids).logits)


def test_every_model_loading_command_takes_the_placement_options():
    from typer.main import get_command

    from hookmoe.cli import build_app

    group = get_command(build_app())
    for name in ("info", "generate", "eval", "sweep", "search", "compare", "run", "train", "export", "bench",
                 "convert"):
        opts = {o for p in group.get_command(None, name).params for o in p.opts}
        assert {"--device-map", "--max-memory", "--offload-folder"} <= opts, name
