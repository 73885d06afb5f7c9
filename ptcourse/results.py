"""Record each chapter's measured results (``results/<chapter>.json``) and read them back.

Example:
    >>> report("01_autoencoders", {"labels_per_class": [1, 10], "acc_scratch": [0.41, 0.77]})
    >>> # later, in a terminal:  python -m ptcourse results
"""
from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .runtime import profile

_START = time.time()
KEY_PACKAGES = ("torch", "torchvision", "transformers", "datasets", "accelerate", "numpy", "scikit-learn")


def versions(packages=KEY_PACKAGES) -> dict:
    """Installed versions of ``packages`` (``None`` when not installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def results_dir() -> Path:
    """Where results go: ``PTCOURSE_RESULTS`` when set, else ``./results``."""
    return Path(os.environ.get("PTCOURSE_RESULTS", "results"))


def _plain(value):
    """Tensors, numpy scalars/arrays and tuples as plain JSON values."""
    if torch.is_tensor(value):
        value = value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def report(chapter: str, metrics: dict, *, quiet: bool = False) -> Path:
    """Write ``results/<chapter>.json``: the metrics plus profile, device, versions and wall time.

    The wall time is the time since ``ptcourse`` was imported (for a notebook: the whole run).
    """
    P = profile()
    record = {"chapter": chapter, "metrics": _plain(metrics), "profile": P.name, "device": str(P.device),
              "precision": P.precision, "wall_time_s": round(time.time() - _START, 1),
              "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "versions": versions(),
              "threads": torch.get_num_threads()}
    path = results_dir() / f"{chapter}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode("utf-8")))
    if not quiet:
        print(f"Recorded {chapter} ({P.name} profile, {record['wall_time_s']:.0f} s) in {path}:")
        for k, v in record["metrics"].items():
            print(f"  {k:28s} {_fmt(v)}")
    return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def load_results(folder=None) -> list[dict]:
    """All recorded results in ``folder`` (default :func:`results_dir`), sorted by chapter."""
    folder = Path(folder) if folder else results_dir()
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def results_table(folder=None, markdown: bool = False) -> str:
    """One row per recorded metric: chapter, profile, metric, value."""
    rows = [(r["chapter"], r["profile"], k, _fmt(v), f"{r['wall_time_s']:.0f}")
            for r in load_results(folder) for k, v in r["metrics"].items()]
    head = ("chapter", "profile", "metric", "value", "wall s")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows]) if rows else "no results recorded yet"
