"""`hookmoe bench`: interleaved TTFT/ITL, limits and efficiency, JSON + plot, random-weight presets, errors."""

import json

import pytest

from conftest import run_cli
import torch

import hookmoe.speed as B
from hookmoe.speed import runtime as R


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core machine OpenMP barriers stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


run = run_cli  # conftest: hookmoe ARGV in-process -> (status, stdout, stderr)


FAST = ["--lengths", "16,32", "--new-tokens", "4", "--itl-prompt", "8", "--repeats", "2", "--no-progress"]


def test_bench_cli_native_vs_top1_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out.json"
    code, stdout, err = run(["bench", "tiny:mixtral", "--plan", "native", "--plan", "topk:1", "--json", str(out)]
                            + FAST, capsys)
    assert code == 0, err
    assert "speed-up" in stdout and "identical" in stdout
    res = json.loads(out.read_text())
    assert res["format"] == "hookmoe-bench/1"
    cmd = res["command"]  # as typed (options in the command's order)
    assert cmd.startswith("hookmoe bench tiny:mixtral --plan native --plan topk:1 ") and f"--json {out}" in cmd
    assert "--lengths 16,32 --new-tokens 4 --itl-prompt 8 --repeats 2" in cmd and "--scale" not in cmd
    for key in ("torch", "transformers", "cpu", "cpu_count"):
        assert key in res["machine"]
    base, top1 = res["variants"]
    assert (base["label"], top1["label"]) == ("native", "topk:1")
    assert base["act"] == pytest.approx(2.0) and top1["act"] == pytest.approx(1.0)
    assert set(top1["metrics"]) == {"ttft@16", "ttft@32", "itl"}
    for m, st in top1["metrics"].items():
        assert st["n"] == 2 and len(st["samples_ms"]) == 2 and st["median_ms"] > 0
        assert st["ratio_min"] <= st["ratio"] <= st["ratio_max"]
        assert 1.0 < st["limit"] < 2.0  # half the routed experts, attention/head/embeddings unchanged
        assert st["efficiency"] == pytest.approx((st["ratio"] - 1) / (st["limit"] - 1))
    assert "ratio" not in base["metrics"]["itl"]
    assert res["checks"]["greedy_tokens_identical_to_reference"] == {"native": True, "topk:1": True}
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hook_overhead_and_dynamic_vs_static_sections(tmp_path, capsys):
    out = tmp_path / "b.json"
    code, stdout, err = run(["bench", "tiny:mixtral", "--plan", "native", "--plan", "topk:1",
                             "--plan", "topk:1@random", "--plan", "tlnle:k=2,l=2", "--plan", "ratio:0.5",
                             "--act", "1.5", "--json", str(out), "--no-check", "--clock", "cpu", "--threads", "1"]
                            + FAST, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    labels = [v["label"] for v in res["variants"]]
    assert labels[:4] == ["native", "topk:1", "topk:1 + hook(random)", "tlnle:k=2,l=2"]
    assert labels[4].startswith("ratio:0.5 (calibrated to Act 1.5")
    dyn = res["variants"][4]
    assert abs(dyn["act"] - 1.5) < 0.1 and isinstance(dyn["plan"], dict)  # a concrete per-layer plan
    hooked = res["variants"][2]
    assert hooked["hook_params"] == 2 * 64 * 64 + 1  # linear1 + linear2 at the paper's width (= expert size) + r
    lim = hooked["metrics"]["itl"]["limit"]  # vs native: top-1 plus the hook's weights
    assert lim < res["variants"][1]["metrics"]["itl"]["limit"]
    (o,) = res["hook_overhead"]
    assert o["without_hook"] == "topk:1" and set(o) >= {"ttft@16", "ttft@32", "itl"}
    (d,) = res["dynamic_vs_static"]
    assert d["static"] == "tlnle:k=2,l=2" and d["act_static"] == pytest.approx(1.5)
    assert res["settings"]["clock"] == "cpu" and res["checks"] == {}
    assert res["settings"]["decode_tokens"] == "random"  # random-weight model: decode fed random tokens
    assert abs(dyn["act_decode"] - 1.5) < 0.25  # so the calibrated rule keeps its Act while decoding
    assert "Hook overhead" in stdout and "Dynamic rule vs static plan" in stdout


def test_trained_hook_directory_is_benchmarked(tmp_path, capsys):
    from hookmoe.hook import insert_hooks, remove_hooks
    from hookmoe.hook import load

    mm = load("tiny:mixtral", device="cpu")
    hs = insert_hooks(mm, [1], init="paper")
    hs.save_pretrained(tmp_path / "hook")
    remove_hooks(mm)
    out = tmp_path / "h.json"
    code, stdout, err = run(["bench", "tiny:mixtral", "--plan", "native", "--plan", "topk:1",
                             "--hook", str(tmp_path / "hook"), "--json", str(out)] + FAST, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    labels = [v["label"] for v in res["variants"]]
    assert labels == ["native", "topk:1", f"topk:1 + hook({tmp_path / 'hook'})"]
    assert res["variants"][2]["hook_params"] == hs.num_params()
    assert res["hook_overhead"][0]["without_hook"] == "topk:1"
    assert all(res["checks"]["greedy_tokens_identical_to_reference"].values())


def test_variants_are_interleaved_abba(monkeypatch):
    mm = B.random_model("tiny:mixtral", device="cpu")
    seen = []
    orig = R.Runtime.generate

    def spy(self, ids, n, **kw):
        if n == 1 and ids.shape[1] == 20:  # the timed TTFT prompt
            seen.append(mm.layers[0].router.top_k)
        return orig(self, ids, n, **kw)

    monkeypatch.setattr(R.Runtime, "generate", spy)
    variants = B.parse_variants(["native", "topk:1"])
    cfg = B.BenchConfig(lengths=(20,), new_tokens=0, repeats=4, warmup=0, check_outputs=False)
    res = B.bench(mm, variants, cfg, progress=False)
    assert seen == [2, 1, 1, 2, 2, 1, 1, 2]
    assert set(res["variants"][1]["metrics"]) == {"ttft@20"}  # --new-tokens 0: TTFT only
    assert mm.experts_implementation == "grouped_mm" and mm.layers[0].router.top_k == 2  # restored


def test_limits_follow_accounting():
    mm = B.random_model("tiny:mixtral", device="cpu")
    n2 = B.cost_model(mm, {i: 2 for i in mm.moe_layer_indices})
    n1 = B.cost_model(mm, {i: 1 for i in mm.moe_layer_indices})
    per_expert = 3 * 64 * 64
    layers = len(mm.layers)
    assert n2["flops_per_token"] - n1["flops_per_token"] == pytest.approx(2 * per_expert * layers)
    assert n2["decode_weight_bytes"] - n1["decode_weight_bytes"] == pytest.approx(4 * per_expert * layers)
    heads, dqk, dv = 4, 16, 16
    assert B.attention_score_flops(mm, 8) == pytest.approx(layers * 2 * heads * (dqk + dv) * 8 * 9 / 2)
    # batch 4: the expected number of distinct experts read per step under uniform routing
    b4 = B.cost_model(mm, {i: 1 for i in mm.moe_layer_indices}, batch_size=4)
    distinct = 8 * (1 - (1 - 1 / 8) ** 4)
    extra = b4["decode_weight_bytes"] - n1["decode_weight_bytes"]
    assert extra == pytest.approx(4 * per_expert * layers * (distinct - 1))


def test_presets_scale_and_keep_the_real_limits():
    cfg = B.scale_config(B.PRESETS["mixtral-8x7b"], scale=8, layers=4)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["head_dim"]) == \
        (512, 1792, 4, 128)
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["num_key_value_heads"]) == (8, 2, 1)
    assert cfg["vocab_size"] == pytest.approx(32000 / 8 * 4 / 32, abs=8)  # head keeps its share of the work
    q = B.scale_config(B.PRESETS["qwen1.5-moe-a2.7b"], scale=8)
    assert (q["moe_intermediate_size"], q["shared_expert_intermediate_size"], q["num_experts"]) == (176, 704, 60)
    mm = B.random_model("mixtral-8x7b", scale=16, layers=2, device="cpu")
    assert (mm.num_experts, mm.native_top_k, mm.num_layers, int(mm.config.hidden_size)) == (8, 2, 2, 256)
    assert mm.source.startswith("mixtral-8x7b (random weights, scale 1/16, 2 layers")
    lim = B.cost_model(mm, {0: 2, 1: 2})["decode_weight_bytes"] / B.cost_model(mm, {0: 1, 1: 1})["decode_weight_bytes"]
    assert 1.7 < lim < 1.85  # the real Mixtral-8x7B: 1.78
    w = mm.layers[0].router.weight
    assert w.std() > 0.01  # random routers: tokens spread over experts


def test_local_config_with_random_weights(tmp_path):
    from hookmoe.models import tiny_config

    tiny_config("olmoe").save_pretrained(tmp_path)  # a config.json only, no weights
    mm = B.random_model(str(tmp_path), layers=2, device="cpu")
    assert mm.arch == "olmoe" and mm.num_layers == 2


@pytest.mark.parametrize("argv,needle", [
    (["bench", "tiny:mixtral", "--plan", "topk:99"], "out of range"),
    (["bench", "tiny:mixtral", "--plan", "bogus"], "unknown plan"),
    (["bench", "mixtral-8x7b"], "--random-weights"),
    (["bench", "tiny:mixtral", "--scale", "4"], "need --random-weights"),
    (["bench", "preset:nope", "--random-weights"], "unknown preset"),
    (["bench", "tiny:mixtral", "--clock", "cpu", "--threads", "2"], "--threads 1"),
    (["bench", "tiny:mixtral", "--lengths", "1024,a"], "whole numbers"),
    (["bench", "tiny:mixtral", "--lengths", "600", "--new-tokens", "0"], "max_position_embeddings"),
    (["bench", "tiny:mixtral", "--new-tokens", "1"], "new-tokens"),
    (["bench", "tiny:mixtral", "--hook", "/no/such/dir", "--lengths", "8", "--new-tokens", "0"], "not found"),
    (["bench", "tiny:mixtral", "--runtime", "turbo"], "--runtime"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code, _, err = run(argv + ["--repeats", "1", "--no-progress"], capsys)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], err
