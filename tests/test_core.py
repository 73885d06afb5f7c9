"""profile(), seed_everything(), report() and doctor() (the exercises builder: tests/test_exercises_tool.py)."""
import json

import pytest
import torch

import ptcourse
from ptcourse import results as report_mod
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
    assert P.name == ("gpu" if P.device.type == "cuda" else "cpu")    # (PTCOURSE_DEVICE=cpu on a GPU: cpu)
    if P.device.type == "cuda":   # bf16 needs compute capability 8 (torch also says yes on a T4, emulated)
        assert P.precision == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16")
    else:
        assert P.precision == "fp32"


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


def test_accuracy_vs_labels_error_bars_are_the_sample_sd_the_tables_print():
    # the plot and the chapters' tables must agree on the spread: sample sd (ddof=1) over seeds
    import matplotlib
    matplotlib.use("Agg")
    import numpy as np
    from ptcourse import plots
    seeds = [[0.5, 0.6, 0.7], [0.8]]          # three seeds at one budget, one at the other
    fig = plots.accuracy_vs_labels([10, 100], {"m": seeds})
    bars = fig.axes[0].containers[0]          # the ErrorbarContainer of the one method
    segments = bars.lines[2][0].get_segments()
    half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    assert half[0] == pytest.approx(np.std(seeds[0], ddof=1))     # 0.1, not ddof=0's 0.0816
    assert half[1] == 0.0


def test_accuracy_vs_labels_draws_a_method_only_at_the_budgets_it_was_trained_at():
    # chapter 07's cpu profile trains its newer adapters at the largest budget only (None elsewhere)
    import matplotlib
    matplotlib.use("Agg")
    from ptcourse import plots
    fig = plots.accuracy_vs_labels([4, 128], {"both": [[0.5, 0.6], [0.7, 0.8]], "top only": [None, [0.72, 0.74]]})
    lines = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}      # each errorbar's data line
    assert list(lines["top only"].get_xdata()) == [128]
    assert lines["top only"].get_ydata()[0] == pytest.approx(0.73)
    assert list(lines["both"].get_xdata()) == [4, 128]
