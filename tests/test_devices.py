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
