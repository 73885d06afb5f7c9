"""Run profiles: one switch that sizes every notebook for the machine it runs on.

=========  ==========================  ==============================================
profile    chosen when                 what it means for the numbers
=========  ==========================  ==============================================
``smoke``  CI and ``pytest``           tiny real subsets: checks that the code runs;
                                       the numbers are not meaningful
``cpu``    no GPU found                larger subsets, fewer epochs (10-15 min/chapter)
``gpu``    CUDA found                  full data and full models (up to ~30 min/chapter)
=========  ==========================  ==============================================

``PTCOURSE_PROFILE`` overrides the automatic choice and ``PTCOURSE_DEVICE`` the device.

Example:
    >>> import ptcourse
    >>> P = ptcourse.profile()
    >>> epochs = P.pick(smoke=1, cpu=5, gpu=30)
"""
from __future__ import annotations

import functools
import os
import random
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")

_MEANING = {
    "smoke": "smoke: tiny subsets to check the code runs; the numbers are not meaningful",
    "cpu": "cpu: larger subsets and fewer epochs; numbers are indicative, below what a GPU run reaches",
    "gpu": "gpu: full datasets and full-size models; numbers comparable to published ones",
}


def best_device() -> torch.device:
    """The fastest device here: CUDA, then Apple MPS, then the CPU (``PTCOURSE_DEVICE`` overrides)."""
    forced = os.environ.get("PTCOURSE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cuda_compute_capability() -> int:
    """The major compute capability of the GPU this process uses (its ``cuda:0``, or the current
    device once CUDA is initialised).

    Before CUDA is initialised it is asked of ``nvidia-smi``, once per process, for the first GPU
    in ``CUDA_VISIBLE_DEVICES`` (an index or a UUID): asking torch would initialise CUDA, and a
    notebook kernel that has initialised CUDA cannot fork the processes of Accelerate's
    ``notebook_launcher``. (``nvidia-smi`` numbers GPUs in PCI bus order, CUDA by default fastest
    first: the two agree on a machine of identical GPUs or with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.)
    """
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_capability()[0]
    return _nvidia_smi_capability(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip())


@functools.lru_cache(maxsize=None)
def _nvidia_smi_capability(gpu: str) -> int:
    """``nvidia-smi``'s compute capability of ``gpu`` (index or UUID; "" for physical GPU 0), else torch's."""
    query = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", *([f"--id={gpu}"] if gpu else [])]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.split()
        return int(float(out[0]))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return torch.cuda.get_device_capability()[0]


def best_precision(device: torch.device) -> str:
    """``bf16`` on CUDA GPUs with native bf16 (compute capability 8+: A100, L4, H100, RTX 30xx+),
    ``fp16`` with a gradient scaler on older ones (T4, V100), else ``fp32``.

    (``torch.cuda.is_bf16_supported()`` also says yes on a T4, where bf16 is only emulated and slow.)
    """
    if device.type == "cuda":
        return "bf16" if _cuda_compute_capability() >= 8 else "fp16"
    return "fp32"


@dataclass(frozen=True)
class Profile:
    """Which profile, device and precision this run uses.

    Example:
        >>> P = Profile("smoke", torch.device("cpu"), "fp32")
        >>> P.pick(smoke=100, cpu=5_000, gpu=50_000)
        100
    """

    name: str
    device: torch.device
    precision: str

    def pick(self, *, smoke, cpu, gpu):
        """Return the value for this profile."""
        return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[self.name]

    @property
    def meaning(self) -> str:
        return _MEANING[self.name]

    def __str__(self) -> str:
        return (f"ptcourse profile={self.name} device={self.device} precision={self.precision}\n"
                f"  {self.meaning}")


def profile() -> Profile:
    """Detect the run profile (``PTCOURSE_PROFILE`` overrides) with its device and precision.

    Example:
        >>> P = profile()
        >>> P.name in ("smoke", "cpu", "gpu")
        True
    """
    device = best_device()
    name = os.environ.get("PTCOURSE_PROFILE", "").strip().lower()
    if name and name not in PROFILES:
        raise ValueError(f"PTCOURSE_PROFILE={name!r} is not a profile; use one of {', '.join(PROFILES)} "
                         "(or unset it to choose automatically).")
    if not name:
        name = "gpu" if device.type == "cuda" else "cpu"
    return Profile(name, device, best_precision(device))


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and PyTorch (all devices) so a run can be repeated.

    Example:
        >>> _ = seed_everything(0); a = torch.rand(1)
        >>> _ = seed_everything(0); bool(torch.rand(1) == a)
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


#: The environment that makes a CPU run's numbers the same bits on every x86-64 machine with AVX2.
#: Same seeds, same code and same machine already give the same bits; what changes them between
#: machines is that PyTorch's own kernels (``ATEN_CPU_CAPABILITY``), oneDNN's (convolutions,
#: ``ONEDNN_MAX_CPU_ISA``) and MKL's (matrix products, ``MKL_CBWR``) each pick the widest vector
#: instructions the processor has (AVX-512 on one server, AVX2 on the next), and a wider vector
#: sums in another order. Pinning all three to AVX2 removes that; the number of threads must match
#: too (it splits the sums), so a record stores it. ``python benchmarks/reproducibility.py``
#: measures each effect and the cost.
PINNED_CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def pinned_cpu_kernels() -> dict:
    """The environment for a reproducible recorded run on this machine (set before ``torch`` starts).

    :data:`PINNED_CPU_KERNELS` where the processor has AVX2 or wider; nothing elsewhere (an ARM
    Mac, an old processor), where the record's numbers are this machine's own.

    Example:
        >>> env = pinned_cpu_kernels()
        >>> env in ({}, PINNED_CPU_KERNELS)
        True
    """
    capability = torch.backends.cpu.get_cpu_capability()
    return dict(PINNED_CPU_KERNELS) if capability.startswith("AVX2") or capability.startswith("AVX512") else {}


def cpu_kernels() -> dict:
    """What decided this process's CPU kernels: the vector instructions in use, and the pins that were set.

    Example:
        >>> sorted(cpu_kernels())
        ['capability', 'pinned']
    """
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "pinned": {k: os.environ[k] for k in PINNED_CPU_KERNELS if k in os.environ}}
