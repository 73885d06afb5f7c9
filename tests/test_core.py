"""profile(), seed_everything(), report(), doctor() and the exercises builder."""
import json

import pytest
import torch

import ptcourse
from ptcourse import results as report_mod
from ptcourse.tools import exercises
from ptcourse.__main__ import main as cli


def test_profile_override_and_pick(monkeypatch):
    monkeypatch.setenv("PTCOURSE_PROFILE", "cpu")
    P = ptcourse.profile()
    assert P.name == "cpu" and P.pick(smoke=1, cpu=2, gpu=3) == 2
    assert "profile=cpu" in str(P)
    monkeypatch.setenv("PTCOURSE_PROFILE", "smoke")
    assert "not meaningful" in str(ptcourse.profile())
    monkeypatch.setenv("PTCOURSE_PROFILE", "fast")
    with pytest.raises(ValueError, match="not a profile; use one of smoke, cpu, gpu"):
        ptcourse.profile()


def test_automatic_profile_follows_the_hardware(monkeypatch):
    monkeypatch.delenv("PTCOURSE_PROFILE", raising=False)
    P = ptcourse.profile()
    assert P.name == ("gpu" if torch.cuda.is_available() else "cpu")
    assert P.precision == ("fp32" if P.device.type != "cuda" else P.precision)


def test_seed_everything_repeats_random_streams():
    ptcourse.seed_everything(5)
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    ptcourse.seed_everything(5)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_report_writes_json_and_results_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTCOURSE_RESULTS", str(tmp_path))
    path = ptcourse.report("01_test", {"acc": torch.tensor(0.5), "budgets": (1, 10), "n": 3})
    rec = json.loads(path.read_text())
    assert rec["metrics"] == {"acc": 0.5, "budgets": [1, 10], "n": 3}
    assert rec["profile"] == ptcourse.profile().name and torch.__version__.startswith(rec["versions"]["torch"])
    assert rec["wall_time_s"] >= 0
    capsys.readouterr()
    assert cli(["results", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| 01_test |" in out and "| acc | 0.5 |" in out


def test_doctor_reports_what_a_ta_needs(capsys):
    info = ptcourse.doctor()
    out = capsys.readouterr().out
    for key in ("torch", "profile", "data cache", "HF hub cache", "jupyterlab_widgets"):
        assert key in out
    assert torch.__version__.startswith(info["versions"]["torch"])


SOLUTION_CELL = """def f(x):
    ### BEGIN SOLUTION
    ### HINT: double it
    return 2 * x
    ### END SOLUTION

y = 1
### BEGIN SOLUTION
y = f(3)
### END SOLUTION"""


def test_stubs_replace_solution_regions_with_numbered_hints():
    out = exercises.stub_source(SOLUTION_CELL, [0])
    assert out == ('def f(x):\n    raise NotImplementedError("Exercise 1: double it")\n\ny = 1\n'
                   'raise NotImplementedError("Exercise 2: write your code here")')
    md = exercises.stub_source("Q1. Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", [0], markdown=True)
    assert md == "Q1. Why?\n\n*Your answer here.*"


def test_unbalanced_markers_are_errors():
    with pytest.raises(ValueError, match="without"):
        exercises.stub_source("### BEGIN SOLUTION\nx = 1", [0])
    with pytest.raises(ValueError, match="without"):
        exercises.stub_source("x = 1\n### END SOLUTION", [0])


def test_build_and_check_detect_stale_exercises(tmp_path):
    (tmp_path / "solutions").mkdir()
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": SOLUTION_CELL, "outputs": [1],
                     "execution_count": 3}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "solutions" / "01_x.ipynb").write_text(json.dumps(nb))
    assert [p.name for p in exercises.build(tmp_path, check=True)] == ["01_x.ipynb"]
    exercises.build(tmp_path)
    built = json.loads((tmp_path / "exercises" / "01_x.ipynb").read_text())
    assert built["cells"][0]["outputs"] == [] and built["cells"][0]["execution_count"] is None
    assert "NotImplementedError" in built["cells"][0]["source"]
    assert exercises.build(tmp_path, check=True) == []
    (tmp_path / "exercises" / "01_x.ipynb").write_text("{}")
    assert exercises.build(tmp_path, check=True)
