"""ptcourse: the helper library of the pretraining and fine-tuning course.

    import ptcourse
    P = ptcourse.profile()                       # smoke / cpu / gpu, device, precision
    train = ptcourse.data.load("mnist", "train", per_class=10)
    history = ptcourse.fit(model, loader, epochs=3, val_loader=val, metrics={"acc": ptcourse.accuracy})
    ptcourse.report("00_getting_started", {"val_acc": history.last["val_acc"]})

The layers, each in one place:

* **core** (every chapter): ``runtime`` (profile, device, precision, seeding), ``files`` (atomic
  writes, safe loading), ``data`` (datasets), ``loop`` (``fit``, ``evaluate``, ``predict``),
  ``metrics`` (``accuracy``, ``count_parameters``), ``distributed`` (several processes),
  ``checkpoint`` (training state, exact resume), ``history``, ``losses``, ``probes`` (frozen
  features, kNN, linear probes), ``plots``, ``results`` (``report``), ``compare`` (the search
  protocol on validation, verdicts over paired seeds);
* **chapter helpers**: ``ptcourse.chapters.<chapter>`` and the exercise checks
  ``ptcourse.checks.<chapter>``, named like the notebooks;
* **tooling** for TAs and maintainers: ``ptcourse.tools`` (``doctor``, ``download``, ``run``,
  the exercise generator, README sync), run as ``python -m ptcourse <command>``.

Submodules load on first use, so ``import ptcourse`` costs little more than ``import torch``.
"""
from __future__ import annotations

import importlib
import os
import time

__version__ = "0.2.0"
# when the course started in this process (a notebook: its first cell) and the machine's load then;
# ptcourse.report records the wall time and load average from here
STARTED = time.time()
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

# public name -> module that defines it
_API = {
    "profile": "runtime", "Profile": "runtime", "seed_everything": "runtime",
    "fit": "loop", "evaluate": "loop", "predict": "loop", "accuracy": "metrics", "count_parameters": "metrics",
    "NonFiniteLossError": "loop", "OutOfMemoryAdvice": "loop", "CheckpointError": "files",
    "History": "history", "report": "results", "doctor": "tools.doctor",
}
_MODULES = ("runtime", "files", "data", "loop", "metrics", "distributed", "checkpoint", "history", "losses",
            "probes", "compare", "plots", "results", "chapters", "checks", "tools")
__all__ = [*_API, *_MODULES]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ptcourse' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
