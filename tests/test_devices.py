"""What the library asks of the machine's devices: the doctor's advice on a Mac, and the GPU's
compute capability (which decides bf16 or fp16) asked once per process of the GPU this process uses."""
import os
import stat

import pytest
import torch

from ptcourse import runtime
from ptcourse.tools import doctor


def test_doctor_on_a_mac_says_several_processes_use_the_cpu(monkeypatch):
    """Stands in for a Mac (MPS available, no CUDA). gloo has no MPS support, so DDP trains on the
    CPU there, and the MPS fallback switch must be advised for one process only."""
    monkeypatch.delenv("PTCOURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    info = doctor.facts()
    assert info["device"] == "mps" and info["ddp"] == "cpu (gloo)"
    fallback = [w for w in info["warnings"] if "PYTORCH_ENABLE_MPS_FALLBACK" in w]
    assert fallback and all("one process" in w and "DDP" in w and "CPU" in w for w in fallback)


@pytest.fixture
def nvidia_smi(tmp_path, monkeypatch):
    """A fake ``nvidia-smi`` on PATH that logs each call: physical GPU 0 is an A100 (8.0), GPU 2
    and the GPU with UUID GPU-5e1b... are T4s (7.5). CUDA is not initialised, and torch must not be
    asked (asking it would initialise CUDA). Returns the call log."""
    log = tmp_path / "calls.log"
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n"
                      f'echo "$*" >> "{log}"\n'
                      'case "$*" in\n'
                      '  *--id=2*|*--id=GPU-5e1b*) echo 7.5 ;;\n'
                      '  *) printf "8.0\\n7.5\\n7.5\\n" ;;\n'
                      'esac\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: pytest.fail("torch was asked"))
    cached = getattr(runtime, "_nvidia_smi_capability", None)  # (each test starts a fresh "process")
    if cached is not None:
        cached.cache_clear()
    yield lambda: log.read_text().splitlines() if log.exists() else []
    if cached is not None:
        cached.cache_clear()


def test_gpu_capability_is_asked_of_nvidia_smi_once_per_process(nvidia_smi):
    """fit, evaluate, predict, profile and report each ask for the precision: one subprocess each
    time would cost a fraction of a second per call in a notebook loop of evaluate calls."""
    cuda = torch.device("cuda")
    assert [runtime.best_precision(cuda) for _ in range(3)] == ["bf16"] * 3
    assert len(nvidia_smi()) == 1


@pytest.mark.parametrize("visible", ["2", "2,0", "GPU-5e1b2c3d-0000-1111-2222-333344445555"])
def test_gpu_capability_is_the_visible_gpus_not_physical_gpu_0(nvidia_smi, monkeypatch, visible):
    """With CUDA_VISIBLE_DEVICES=2 (or a UUID) this process's cuda:0 is physical GPU 2, a T4 here:
    fp16 with a gradient scaler, not the bf16 of physical GPU 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert runtime.best_precision(torch.device("cuda")) == "fp16"
    assert len(nvidia_smi()) == 1 and f"--id={visible.split(',')[0]}" in nvidia_smi()[0]


def test_gpu_capability_comes_from_torch_once_cuda_is_initialised(nvidia_smi, monkeypatch):
    """Once CUDA is initialised (fit moved a model there) there is no fork to protect: torch knows
    the current device, and no subprocess is started."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert runtime.best_precision(torch.device("cuda")) == "fp16"
    assert nvidia_smi() == []
