"""``python -m ptcourse selftest``: the table a TA reads before class, and its exit status."""
import os
import subprocess
import sys

import pytest
import torch

from ptcourse.tools import selftest


@pytest.mark.slow
def test_selftest_passes_on_this_machine_and_says_which_device():
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "ptcourse", "selftest"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    out = run.stdout
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert selftest.device_name(device) in out.splitlines()[0]
    for row in ("fp32", "bf16 autocast", "fp16 autocast + GradScaler", "checkpoint, kill", "DDP (torchrun)"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert " pass " in line, line
    assert "bit-identical" in out or device.type != "cpu"
    assert "2 processes (gloo" in out or torch.cuda.device_count() >= 2
    assert "checks passed" in out


def test_a_failing_check_fails_the_selftest(monkeypatch):
    """The exit status must follow the checks: one failure -> non-zero, shown as FAIL with its reason."""
    monkeypatch.setattr(selftest, "check_channels_last", lambda device: "fine")
    monkeypatch.setattr(selftest, "check_resume", lambda device, folder: "fine")

    def broken(precision, device):
        if precision == "fp16":
            raise AssertionError("scheduler stepped 24x, optimizer 20x")
        return "fine"
    monkeypatch.setattr(selftest, "check_precision", broken)
    lines = []
    assert selftest.selftest(ddp=False, out=lines.append) is False
    fp16 = next(line for line in lines if line.startswith("fp16"))
    assert "FAIL" in fp16 and "scheduler stepped 24x" in fp16
    assert "skipped (--no-ddp)" in "\n".join(lines) and "1 of 6 checks failed" in lines[-1]
    from ptcourse.__main__ import main
    assert main(["selftest", "--no-ddp"]) == 1


def test_a_failed_subprocess_check_reports_the_worker_error_not_the_launcher():
    # torchrun's stderr: the failing worker's traceback first, then the launcher's own long traceback
    # and its summary; the table's row once showed only the launcher's frames (a CI failure that
    # could not be diagnosed). The reason must carry the worker's error and the summary.
    import subprocess
    worker = 'Traceback (most recent call last):\n  File "selftest.py", line 9\nRuntimeError: Connection reset by peer\n'
    launcher = ('Traceback (most recent call last):\n' + '  File "torch/distributed/run.py", line 1\n' * 60
                + 'ChildFailedError:\nRoot Cause (first observed failure):\n  exitcode  : 1 (pid: 42)\n')
    run = subprocess.CompletedProcess(["torchrun"], 1, stdout="", stderr=worker + launcher)
    why = selftest._why_failed(run)
    assert "RuntimeError: Connection reset by peer" in why and "exitcode  : 1 (pid: 42)" in why
    assert why.startswith("exit status 1")


def test_the_whole_reason_of_a_failure_follows_the_table(monkeypatch):
    monkeypatch.setattr(selftest, "check_channels_last", lambda device: "fine")
    monkeypatch.setattr(selftest, "check_resume", lambda device, folder: "fine")
    monkeypatch.setattr(selftest, "check_precision", lambda precision, device: "fine")
    long_reason = "x" * 700 + " the cause at the end"

    def broken(device, folder):
        raise AssertionError(long_reason)
    monkeypatch.setattr(selftest, "check_ddp", broken)
    lines = []
    assert selftest.selftest(ddp=True, out=lines.append) is False
    row = next(line for line in lines if line.startswith("DDP"))
    assert "the cause at the end" not in row                       # the row is cut short ...
    assert "the cause at the end" in "\n".join(lines[lines.index(row) + 1:])   # ... the reason is not
