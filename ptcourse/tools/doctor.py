"""``doctor()``: everything a TA asks first when a notebook misbehaves, in one printout.

Run it as ``python -m ptcourse doctor`` or ``ptcourse.doctor()`` in a notebook.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

from .. import data
from ..distributed import resolve_device
from ..runtime import profile
from ..results import versions
from .lab import hf_offline

# lowest versions whose APIs the course uses
MINIMUM = {"torch": "2.3", "torchvision": "0.18", "transformers": "4.48", "datasets": "3.0",
           "accelerate": "1.0", "ipywidgets": "8.0", "jupyterlab": "4.0"}
SHOWN = ("torch", "torchvision", "transformers", "datasets", "accelerate", "numpy", "scikit-learn",
         "matplotlib", "tqdm", "ipywidgets", "jupyterlab", "jupyterlab_widgets", "nbval")


def _older(have: str, need: str) -> bool:
    def parts(v):
        out = []
        for p in v.split("+")[0].split(".")[:3]:
            digits = "".join(ch for ch in p if ch.isdigit())
            out.append(int(digits) if digits else 0)
        return out
    return parts(have) < parts(need)


def facts() -> dict:
    """The facts and warnings that :func:`doctor` prints, as a dict."""
    P = profile()
    vers = versions(SHOWN)
    try:
        ddp = resolve_device(None, 0, world=2).type  # where each of several processes (torchrun) trains
        ddp = f"{ddp} ({'nccl' if ddp == 'cuda' else 'gloo'})"
    except ValueError as err:  # PTCOURSE_DEVICE names a device several processes cannot use
        ddp = f"not possible: {err}"
    info = {"python": platform.python_version(), "platform": platform.platform(), "versions": vers,
            "profile": P.name, "device": str(P.device), "precision": P.precision,
            "ddp": ddp,
            "cpu_threads": torch.get_num_threads(), "data_dir": str(data.data_dir()),
            "datasets": {name: data.cached(name) for name in data.DATASETS},
            "hf_offline": hf_offline(),
            "hf_cache": os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface/hub",
            "torch_home": os.environ.get("TORCH_HOME") or "~/.cache/torch"}
    warnings = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)"
    in_colab = "google.colab" in sys.modules
    if in_colab and not torch.cuda.is_available():
        warnings.append("Colab is on a CPU runtime: Runtime > Change runtime type > T4 GPU, then rerun "
                        "(or keep going: the cpu profile works, just slower).")
    if P.device.type == "mps":
        warnings.append("Apple MPS: mixed precision is off (fp32). If an op is reported as unsupported on "
                        "MPS, PYTORCH_ENABLE_MPS_FALLBACK=1 runs it on the CPU instead (for one process; "
                        "several processes (DDP) train on the CPU: gloo has no MPS support).")
    if torch.version.cuda and not torch.cuda.is_available() and not in_colab:
        info["note"] = "this torch is a CUDA build but no GPU is visible, so the course runs on the CPU"
    for name, need in MINIMUM.items():
        have = vers.get(name)
        if have is None:
            warnings.append(f"{name} is not installed (pip install -e . installs it).")
        elif _older(have, need):
            warnings.append(f"{name} {have} is older than {need}, which the course needs: pip install -U {name}")
    if vers.get("ipywidgets") and vers.get("jupyterlab") and not vers.get("jupyterlab_widgets"):
        warnings.append("ipywidgets is installed but its JupyterLab front-end (jupyterlab_widgets) is not: "
                        "sliders will show as text. pip install jupyterlab_widgets")
    elif vers.get("ipywidgets") and vers.get("jupyterlab_widgets") and \
            vers["ipywidgets"].split(".")[0] == "8" and vers["jupyterlab_widgets"].split(".")[0] != "3":
        warnings.append(f"ipywidgets {vers['ipywidgets']} needs jupyterlab_widgets 3.x, not "
                        f"{vers['jupyterlab_widgets']}: pip install -U jupyterlab_widgets")
    if not any(all(s.values()) for s in info["datasets"].values()) and info["hf_offline"]:
        warnings.append(f"HF_HUB_OFFLINE is set and no dataset is cached in {info['data_dir']}: "
                        "set PTCOURSE_DATA to your lab's shared cache or run `python -m ptcourse download`.")
    info["warnings"] = warnings
    return info


def doctor() -> dict:
    """Print versions, device, precision, profile, caches and warnings; return them as a dict.

    Example:
        >>> info = doctor()          # doctest: +SKIP
        >>> info["profile"]
        'cpu'
    """
    info = facts()
    print(f"python        {info['python']}  ({info['platform']})")
    for name, v in info["versions"].items():
        print(f"{name:13s} {v or 'not installed'}")
    print(f"profile       {info['profile']}   device {info['device']}   precision {info['precision']}"
          f"   cpu threads {info['cpu_threads']}")
    print(f"DDP           each process on: {info['ddp']}")
    if "gpu" in info:
        print(f"gpu           {info['gpu']}")
    print(f"data cache    {info['data_dir']}")
    for name, splits in info["datasets"].items():
        have = [s for s, ok in splits.items() if ok]
        print(f"  {name:15s} {', '.join(have) if have else 'not downloaded'}")
    print(f"HF hub cache  {info['hf_cache']}  (offline: {info['hf_offline']})")
    print(f"torch home    {info['torch_home']}")
    if "note" in info:
        print(f"note          {info['note']}")
    for w in info["warnings"]:
        print(f"WARNING: {w}")
    if not info["warnings"]:
        print("No problems found.")
    return info
