"""``hookmoe frontier``: every allocator x compensator and the dynamic rules at each Act, table + plot."""

import json

import pytest

from hookmoe.search import frontier as fr
from hookmoe.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module


def test_pareto_keeps_only_undominated_points():
    pts = [{"act": 3.0, "score": 10.0}, {"act": 3.0, "score": 9.0}, {"act": 3.5, "score": 9.5},
           {"act": 3.5, "score": 8.0}, {"act": 4.0, "score": 8.0}, {"act": 2.5, "score": 12.0}]
    front = fr.pareto(pts)
    assert [(p["act"], p["score"]) for p in front] == [(2.5, 12.0), (3.0, 9.0), (3.5, 8.0)]


def test_frontier_cli_on_tiny_qwen2_moe(tmp_path, capsys):
    out = tmp_path / "fr"
    with pytest.raises(SystemExit) as e:
        main(["frontier", "tiny:qwen2_moe", "--calib", "builtin", "--data", "builtin", "--acts", "3.0,3.5",
              "--out", str(out), "--steps", "4", "--n-calib", "4", "--n-train", "8", "--n-eval", "4",
              "--block-len", "32", "--batch-size", "4", "--dynamic", "topp,entropy"])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    for f in ("frontier.json", "frontier.md", "frontier.png"):
        assert (out / f).stat().st_size > 0
    res = json.loads((out / "frontier.json").read_text())
    rows = res["rows"]
    native = rows[0]
    assert native["method"] == "native" and native["act"] == 4.0
    for act in (3.0, 3.5):
        at = [r for r in rows if r["target_act"] == act]
        for a in ("tlnle", "greedy", "dp", "weights"):
            plain = next(r for r in at if r["method"] == a)
            hooked = next(r for r in at if r["method"] == f"{a} + hook")
            assert plain["act"] == pytest.approx(act, abs=1e-12) and hooked["act"] == pytest.approx(act, abs=1e-12)
            assert plain["plan"] == hooked["plan"] and plain["exact"] is True
            assert hooked["comp_params"] > 0 and hooked["comp_steps"] == 4
            assert hooked["ppl"] != plain["ppl"]  # the trained Hooks change the model's output
            assert plain["wall_s"] > 0
        for d in ("topp", "entropy"):
            r = next(r for r in at if r["method"] == d)
            assert abs(r["act"] - act) < 0.15, r  # calibrated on 128 tokens, measured on held-out ones
        assert any(r["method"] == "uniform top-3" for r in at)
    # the frontier's points are undominated rows of the table
    assert res["frontier"] and res["sensitivity"]["format"] == "hookmoe-sensitivity/1"
    md = (out / "frontier.md").read_text()
    assert "Pareto frontier" in md and "dp + hook" in md
    # reuse the measured sensitivity: no re-measurement
    with pytest.raises(SystemExit) as e:
        main(["frontier", "tiny:qwen2_moe", "--calib", "builtin", "--data", "builtin", "--acts", "3.5",
              "--out", str(tmp_path / "fr2"), "--allocators", "dp", "--compensators", "none", "--dynamic", "",
              "--sensitivity", str(out / "frontier.json"), "--n-calib", "4", "--n-eval", "4", "--block-len", "32"])
    assert e.value.code == 0, capsys.readouterr().err
    res2 = json.loads((tmp_path / "fr2" / "frontier.json").read_text())
    assert res2["sensitivity_time_s"] == 0.0
    dp1 = next(r for r in rows if r["method"] == "dp" and r["target_act"] == 3.5)
    dp2 = next(r for r in res2["rows"] if r["method"] == "dp")
    assert dp2["plan"] == dp1["plan"] and dp2["ppl"] == pytest.approx(dp1["ppl"], rel=1e-6)


@pytest.mark.parametrize("argv, fragment", [
    (["--acts", "5"], "--acts"),
    (["--acts", "x"], "--acts"),
    (["--acts", "3", "--allocators", "magic"], "--allocators"),
    (["--acts", "3", "--compensators", "lora9"], "--compensators"),
])
def test_bad_frontier_input_is_one_line(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        main(["frontier", "tiny:qwen2_moe", "--calib", "builtin", "--data", "builtin", "--out", str(tmp_path)] + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and fragment in err and len(err.splitlines()) == 1


def test_frontier_scores_every_compensator_kind(tmp_path, capsys):
    out = tmp_path / "fr"
    with pytest.raises(SystemExit) as e:
        main(["frontier", "tiny:qwen2_moe", "--calib", "builtin", "--data", "builtin", "--acts", "3.5",
              "--out", str(out), "--allocators", "dp", "--compensators", "none,router,output,hook+router",
              "--dynamic", "", "--steps", "3", "--n-calib", "4", "--n-train", "8", "--n-eval", "4",
              "--block-len", "32", "--batch-size", "4"])
    assert e.value.code == 0, capsys.readouterr().err
    rows = json.loads((out / "frontier.json").read_text())["rows"]
    plain = next(r for r in rows if r["method"] == "dp")
    for kind in ("router", "output", "hook+router"):
        r = next(r for r in rows if r["method"] == f"dp + {kind}")
        assert r["plan"] == plain["plan"] and r["act"] == pytest.approx(3.5, abs=1e-12)
        assert r["comp_params"] > 0 and r["comp_steps"] == 3
        assert r["ppl"] != plain["ppl"]  # the trained compensator changes the model's output
