"""--config FILE.yaml, the resolved config written beside outputs, and the recipes/ folder."""

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from hookmoe.cli import build_app, main
from hookmoe.cli.config import RESOLVED_NAME, load_config
from hookmoe.errors import UserError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _command(name):
    from typer.main import get_command

    return get_command(build_app()).get_command(None, name)


def test_there_are_recipes_for_the_paper_models_and_the_demo():
    names = {p.stem for p in RECIPES}
    assert {"mixtral-8x7b", "mixtral-8x22b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "demo-smollm2"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_for_its_commands(path):
    sections = yaml.safe_load(path.read_text())["commands"]
    for name in sections:
        values = load_config(str(path), _command(name))
        assert values, name
        if name == "train":
            assert values["lr"] > 0 and int(values["layer"]) >= 0 and values["inner_size"] > 0


def test_unknown_keys_are_refused_with_their_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("commands:\n  train:\n    lr: 1e-3\n    learning_rate: 1e-3\n")
    with pytest.raises(UserError, match="learning_rate"):
        load_config(str(bad), _command("train"))


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    return out


def test_train_from_a_config_writes_a_resolved_config_that_repeats_the_run(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("commands:\n  train:\n    model: tiny:mixtral\n    plan: topk:1\n    layer: '1'\n"
                   "    calib: builtin\n    samples: 8\n    seq-len: 32\n    steps: 3\n    lr: 3.0e-3\n")
    first = tmp_path / "a"
    _run(["train", "--config", str(cfg), "--out", str(first), "--no-progress", "--batch-size", "4"], capsys)
    resolved = yaml.safe_load((first / RESOLVED_NAME).read_text())
    assert resolved["lr"] == 3.0e-3 and resolved["steps"] == 3 and resolved["batch_size"] == 4  # file + flag
    second = tmp_path / "b"
    _run(["train", "--config", str(first / RESOLVED_NAME), "--out", str(second), "--no-progress"], capsys)
    wa, wb = load_file(first / "hook.safetensors"), load_file(second / "hook.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
