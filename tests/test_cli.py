"""The `hookmoe` command: JSON output, generate, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from conftest import ARCHS, run_cli
from hookmoe.cli import main


run = run_cli  # conftest: hookmoe ARGV in-process -> (status, stdout, stderr)


@pytest.mark.parametrize("arch", ARCHS)
def test_info_json_for_every_arch(arch, capsys):
    code, out, err = run(["info", f"tiny:{arch}", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["arch"] == arch and d["experts"] >= 8 and d["native_top_k"] >= 2
    assert d["params_active"] < d["params_total"]


def test_generate_prints_text_and_act_table(capsys):
    code, out, err = run(["generate", "tiny:mixtral", "--prompt", "Hello", "--plan", "topk:1",
                          "--max-new-tokens", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "Act per layer" in out and "overall Act = 1.000" in out
    code, out, err = run(["generate", "tiny:qwen2_moe", "--prompt", "Hi", "--plan", "tlnle:k=4,l=2",
                          "--max-new-tokens", "2", "--json", "-"], capsys)
    d = json.loads(out)
    assert d["rules"] == {"0": "topk:4", "1": "topk:4", "2": "topk:3", "3": "topk:3"} or \
        d["rules"] == {0: "topk:4", 1: "topk:4", 2: "topk:3", 3: "topk:3"}
    assert d["act"] == pytest.approx(3.5)


@pytest.mark.parametrize("argv, fragment", [
    (["info", "tiny:phimoe"], "unsupported MoE architecture"),
    (["info", "tiny:nonsense"], "supported:"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--plan", "topk:0"], "topk K must be >= 1"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--plan", "topk:9"], "out of range"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--plan", "tlnle:k=2,l=4"], "out of range"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--plan", "topp:1.2"], "(0, 1]"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--plan", "ratio:0"], "(0, 1]"),
    (["generate", "tiny:mixtral", "--prompt", "x", "--plan", "topk"], "topk needs one number"),
    (["info", "tiny:mixtral", "--bogus"], "No such option"),
    (["info"], "Missing argument"),
])
def test_bad_input_is_one_line_exit_2(argv, fragment, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and fragment in lines[0]
    assert "Traceback" not in err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "hookmoe.cli", "info", "tiny:granitemoe", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "granitemoe"
    r = subprocess.run([sys.executable, "-m", "hookmoe.cli", "info", "tiny:llama4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_help_lists_exactly_the_command_table(capsys):
    from hookmoe.cli import COMMANDS, build_app

    registered = {c.name or c.callback.__name__ for c in build_app().registered_commands}
    assert registered == set(COMMANDS)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f" {name} " in out, name


def test_the_library_never_imports_the_cli():
    import subprocess
    import sys

    code = ("import sys, hookmoe, hookmoe.search, hookmoe.training, hookmoe.eval, hookmoe.speed, hookmoe.cmoe, "
            "hookmoe.demo; assert not [m for m in sys.modules if m.startswith('hookmoe.cli')], 'cli imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
