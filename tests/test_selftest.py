"""``python -m ptcourse selftest``: the table a TA reads before class, and its exit status."""
import os
import re
import subprocess
import sys

import pytest
import torch

from ptcourse.tools import selftest


@pytest.mark.slow
def test_selftest_passes_on_this_machine_and_says_which_device(device):
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "ptcourse", "selftest"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    out = run.stdout
    assert selftest.device_name(device) in out.splitlines()[0] and f"device {device}" in out.splitlines()[0]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    rows = ["fp32 +", "fp16 autocast + GradScaler", "fp16 overflow", "channels-last", "checkpoint, kill",
            "resume a 2-process checkpoint", "DDP (torchrun), NCCL" if gpus >= 2 else "DDP (torchrun), gloo"]
    for row in rows + ["bf16 autocast"] * (device.type == "cpu"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert " pass " in line, line
    assert "bit-identical" in out or device.type != "cpu"
    assert "2 processes (gloo" in out or gpus >= 2
    assert "checks passed" in out and "total time" in out.splitlines()[-1]


def test_a_failing_check_fails_the_selftest(monkeypatch):
    """The exit status must follow the checks: one failure -> non-zero, shown as FAIL with its reason."""
    monkeypatch.setattr(selftest, "check_channels_last", lambda device: "fine")
    monkeypatch.setattr(selftest, "check_resume", lambda device, folder: "fine")
    monkeypatch.setattr(selftest, "check_skipped_step", lambda device: "fine")

    def broken(precision, device):
        if precision == "fp16":
            raise AssertionError("scheduler stepped 24x, optimizer 20x")
        return "fine"
    monkeypatch.setattr(selftest, "check_precision", broken)
    lines = []
    assert selftest.selftest(ddp=False, out=lines.append, device="cpu") is False
    fp16 = next(line for line in lines if line.startswith("fp16 autocast"))
    assert "FAIL" in fp16 and "scheduler stepped 24x" in fp16
    assert "skipped (--no-ddp)" in "\n".join(lines) and "1 of 9 checks failed" in lines[-2]
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
    monkeypatch.setattr(selftest, "check_skipped_step", lambda device: "fine")
    monkeypatch.setattr(selftest, "check_resume_other_world", lambda device, folder: "fine")
    long_reason = "x" * 700 + " the cause at the end"

    def broken(device, folder, backend):
        raise AssertionError(long_reason)
    monkeypatch.setattr(selftest, "check_ddp", broken)
    lines = []
    assert selftest.selftest(ddp=True, out=lines.append, device="cpu") is False
    row = next(line for line in lines if line.startswith("DDP"))
    assert "the cause at the end" not in row                       # the row is cut short ...
    assert "the cause at the end" in "\n".join(lines[lines.index(row) + 1:])   # ... the reason is not


def test_the_total_time_is_printed_and_a_gpu_run_says_what_a_t4_takes(monkeypatch):
    """Stands in for a GPU (no CUDA call is made: the rows and the device's name are replaced). Until a
    T4 run is measured the line says so rather than give a number."""
    monkeypatch.setattr(selftest, "plan", lambda device, tmp, ddp=True: [("a", "a row", lambda: "fine")])
    monkeypatch.setattr(selftest, "device_name", lambda device: "a GPU")
    for device, t4_seconds, expected in (("cpu", None, ""),
                                         ("cuda", None, "; on a T4-class GPU: not yet measured on a T4"),
                                         ("cuda", 95.0, "; on a T4-class GPU: about 95 s")):
        monkeypatch.setattr(selftest, "T4_SECONDS", t4_seconds)
        lines = []
        assert selftest.selftest(out=lines.append, device=device)
        assert re.fullmatch(r"total time \d+ s" + re.escape(expected), lines[-1]), lines[-1]
