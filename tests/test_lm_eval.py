"""The `hookmoe` lm-eval model: `python -m hookmoe.lm_eval`, `simple_evaluate(model="hookmoe")` and `hookmoe eval
--metric lm-eval` agree, and Act counts real tokens only (lm-eval pads its batches)."""

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASK = "hookmoe_lm_eval_mc"
PLAN = "topp:0.25,max=2"  # dynamic (Act depends on every counted token) and with a comma lm-eval splits at
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    rnd = random.Random(0)
    words = "the cat dog sat on a mat and ran far to quick brown fox over lazy river tree house".split()
    with open(d / "data.jsonl", "w") as f:
        for i in range(8):  # contexts and choices of very different lengths: batches are padded
            q = " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 14)))
            choices = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 6))) for _ in range(3)]
            f.write(json.dumps({"question": q, "choices": choices, "label": i % 3}) + "\n")
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return d


_TMS = {}


def _task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    if task_dir not in _TMS:
        _TMS[task_dir] = TaskManager(include_path=str(task_dir), include_defaults=False)
    return _TMS[task_dir]


def _evaluate(task_dir, batch_size, model="hookmoe", **model_args):
    import lm_eval

    import hookmoe.eval.lm_eval_model  # noqa: F401  (registers --model hookmoe)

    args = {"pretrained": "tiny:mixtral", "plan": PLAN, "device": "cpu", **model_args}
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=[TASK], batch_size=batch_size,
                                   task_manager=_task_manager(task_dir), bootstrap_iters=0)


def test_cli_entry_and_hookmoe_eval_agree(task_dir, tmp_path, capsys):
    out_dir = tmp_path / "lm_eval_out"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "hookmoe.lm_eval", "--model", "hookmoe", "--model_args",
                        f"pretrained=tiny:mixtral,plan={PLAN}", "--tasks", TASK, "--include_path", str(task_dir),
                        "--device", "cpu", "--batch_size", "4", "--output_path", str(out_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "hookmoe: plan topp:0.25,max=2, Act" in p.stdout
    res = json.loads(Path(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)[0]).read_text())
    cfg = res["config"]
    assert cfg["hookmoe"]["plan"] == PLAN and 1.0 < cfg["act"] < 2.0

    from hookmoe.cli import main

    ev_json = tmp_path / "ev.json"
    with pytest.raises(SystemExit) as e:
        main(["eval", "tiny:mixtral", "--plan", PLAN, "--tasks", TASK, "--include-path", str(task_dir),
              "--batch-size", "4", "--device", "cpu", "--json", str(ev_json)])
    assert e.value.code == 0, capsys.readouterr().err
    ours = json.loads(ev_json.read_text())["results"][0]
    metrics = ours["tasks"][TASK]["metrics"]
    assert metrics["acc,none"] == res["results"][TASK]["acc,none"]
    assert metrics["acc_norm,none"] == res["results"][TASK]["acc_norm,none"]
    assert ours["act"] == pytest.approx(cfg["act"], abs=1e-9)
    assert ours["act_per_layer"] == pytest.approx(cfg["act_per_layer"], abs=1e-9)


def test_act_counts_real_tokens_only(task_dir):
    padded = _evaluate(task_dir, batch_size=4)["config"]
    unpadded = _evaluate(task_dir, batch_size=1)["config"]  # one sequence per call: nothing to pad
    assert padded["hookmoe"]["tokens"] == unpadded["hookmoe"]["tokens"] > 0
    assert padded["act"] == pytest.approx(unpadded["act"], abs=1e-6)
    assert padded["act_per_layer"] == pytest.approx(unpadded["act_per_layer"], abs=1e-6)

    # lm-eval's plain HF model (no mask with its right-padded batches) counts the padding too
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    import hookmoe

    mm = hookmoe.load("tiny:mixtral", device="cpu")
    with mm.routing(PLAN) as patch:
        lm_eval.simple_evaluate(model=HFLM(pretrained=mm.model, tokenizer=mm.tokenizer, batch_size=4, device="cpu"),
                                tasks=[TASK], task_manager=_task_manager(task_dir), bootstrap_iters=0)
        assert patch.stats.tokens > unpadded["hookmoe"]["tokens"]


def test_model_arg_errors(tmp_path):
    from hookmoe.errors import ModelError, UserError
    from hookmoe.eval.lm_eval_model import HookMoELM, _rejoin_plan

    with pytest.raises(ModelError, match="not found"):
        HookMoELM(pretrained=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelError, match="tiny architecture"):
        HookMoELM(pretrained="tiny:nope", device="cpu")

    kw = {"l": 16, "batch_size": 2}  # lm-eval splits plan=tlnle:k=2,l=16 at the comma
    assert _rejoin_plan("tlnle:k=2", kw) == "tlnle:k=2,l=16" and kw == {"batch_size": 2}
    kw = {"r": 20, "l": 16}
    assert _rejoin_plan("tlnle:k=2", kw) == "tlnle:k=2,r=20,l=16" and kw == {}
    with pytest.raises(UserError, match="plan="):
        _rejoin_plan(None, {"l": 16})


def test_import_hookmoe_does_not_import_lm_eval():
    env = dict(os.environ, PYTHONPATH=SRC)
    code = "import sys, hookmoe, hookmoe.eval; assert 'lm_eval' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_hook_and_its_plan_are_applied(tmp_path):
    import torch

    import hookmoe
    from hookmoe.hook import insert_hooks
    from hookmoe.eval.lm_eval_model import HookMoELM

    mm = hookmoe.load("tiny:mixtral", device="cpu")
    hs = insert_hooks(mm, [2], 32)
    with torch.no_grad():
        for p in hs.parameters():
            p.normal_(0, 0.05)
    hs.save_pretrained(tmp_path / "hook", plan="topk:1")
    lm = HookMoELM(pretrained="tiny:mixtral", hook=str(tmp_path / "hook"), device="cpu")
    assert lm.mm.hookset is not None and lm.mm.hookset.layers == [2]
    assert lm.mm.active_plan.plan.describe() == "topk:1"
    ids = torch.randint(2, 259, (1, 12))
    with torch.no_grad():  # the same logits as the model loaded with the hook by hookmoe itself
        ref = hookmoe.load("tiny:mixtral", device="cpu", hook=tmp_path / "hook", plan="topk:1").model(ids).logits
        assert torch.allclose(lm.model(ids).logits, ref, atol=1e-5)
