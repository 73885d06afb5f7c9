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

from . import LOAD_AT_START, STARTED
from .files import atomic_write
from .runtime import cpu_kernels, profile

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


def report(chapter: str, metrics: dict, *, searches=None, verdicts=None, quiet: bool = False) -> Path:
    """Write ``results/<chapter>.json``: the metrics plus profile, device, versions and wall time.

    The wall time is the time since ``ptcourse`` was imported (for a notebook: the whole run).
    ``searches``: the chapter's choices on validation (:func:`ptcourse.compare.search` results, a
    list or a dict by name); ``verdicts``: its :class:`ptcourse.compare.Verdict` list. Both go into
    the record as they are, so that the generated "What we measured" cell and the tests can read
    every grid, every choice at an edge and every comparison in words.
    """
    P = profile()
    if isinstance(searches, dict):
        searches = [s for s in searches.values()]
    record = {"chapter": chapter, "metrics": _plain(metrics), "profile": P.name, "device": str(P.device),
              "precision": P.precision, "wall_time_s": round(time.time() - STARTED, 1),
              "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "versions": versions(),
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu_kernels": cpu_kernels(),
              # the 1-minute load average when ptcourse was imported and now: a wall time measured
              # while other programs ran (load above cpu_count) is not the chapter's own time
              "load_avg": [LOAD_AT_START, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]}
    if searches:
        record["searches"] = {s.name: _plain(s.to_dict()) for s in searches}
    if verdicts:
        record["verdicts"] = [_plain(v.to_dict()) for v in verdicts]
    path = results_dir() / f"{chapter}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode("utf-8")))
    if not quiet:
        print(f"Recorded {chapter} ({P.name} profile, {record['wall_time_s']:.0f} s) in {path}:")
        for k, v in record["metrics"].items():
            print(f"  {k:28s} {fmt(v)}")
    return path


def fmt(v, max_items: int | None = None) -> str:
    """A metric as short text: floats to 4 significant digits, lists in brackets (``max_items`` shown).

    Example:
        >>> fmt([0.81234, 0.7], max_items=1)
        '[0.8123, …]'
    """
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        shown = v if max_items is None else v[:max_items]
        return "[" + ", ".join(fmt(x) for x in shown) + (", …" if len(shown) < len(v) else "") + "]"
    return str(v)


def load_results(folder=None) -> list[dict]:
    """All recorded results in ``folder`` (default :func:`results_dir`), sorted by chapter."""
    folder = Path(folder) if folder else results_dir()
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def results_table(folder=None, markdown: bool = False) -> str:
    """One row per recorded metric: chapter, profile, metric, value."""
    rows = [(r["chapter"], r["profile"], k, fmt(v), f"{r['wall_time_s']:.0f}")
            for r in load_results(folder) for k, v in r["metrics"].items()]
    head = ("chapter", "profile", "metric", "value", "wall s")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    row = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([row.format(*head)] + [row.format(*r) for r in rows]) if rows else "no results recorded yet"


class Difference:
    """The mean difference ``method - baseline`` over seeds with a confidence interval.

    The rule the chapters use to call a gain real: the 95 % confidence interval of the mean
    difference (Student's t over the seeds, paired by seed when both runs share a seed's data and
    initialisation) must exclude zero. With ``n`` seeds the interval is
    ``mean ± t(0.975, n-1) * sd / sqrt(n)``; a single seed gives no interval and no verdict.

    Example:
        >>> d = Difference([0.93, 0.94, 0.94], [0.89, 0.89, 0.89])
        >>> round(d.mean, 3), d.verdict("distilled", "scratch").startswith("distilled is better")
        (0.047, True)
    """

    def __init__(self, method, baseline, *, paired: bool = True, confidence: float = 0.95):
        from scipy import stats
        a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
        if paired and a.shape != b.shape:
            raise ValueError(f"paired differences need one baseline per seed: {a.shape} vs {b.shape}")
        self.n, self.confidence, self.paired = len(a), confidence, paired
        if paired:
            diff = a - b
            self.mean = float(diff.mean())
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
            dof = len(diff) - 1
        else:  # Welch's t interval for two independent samples
            self.mean = float(a.mean() - b.mean())
            va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
            se = np.sqrt(va + vb)
            dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else 1
        half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se) if np.isfinite(se) else np.nan
        self.low, self.high = self.mean - half, self.mean + half

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (False when it cannot be computed)."""
        return bool(np.isfinite(self.low) and (self.low > 0 or self.high < 0))

    def verdict(self, method: str = "method", baseline: str = "baseline", unit: float = 100, suffix=" points") -> str:
        """One sentence: the difference, its interval and what it lets us say.

        The numbers are ``method - baseline``, except when the baseline is clearly better: then the
        sentence is turned round ("scratch is better than fine-tuned: +4.8 points ...") so that its
        numbers read as the winner's lead.
        """
        flip = self.significant and self.mean < 0
        sign = -1 if flip else 1
        low, high = sorted((sign * self.low, sign * self.high))
        span = (f"{sign * self.mean * unit:+.1f}{suffix}, {self.confidence:.0%} CI "
                f"[{low * unit:+.1f}, {high * unit:+.1f}] over {self.n} "
                f"{'paired ' if self.paired else ''}seeds")
        if not np.isfinite(self.low):
            return f"{method} vs {baseline}: {span}: too few seeds for a verdict."
        if self.significant:
            better, worse = (baseline, method) if flip else (method, baseline)
            return f"{better} is better than {worse}: {span}."
        return f"no clear difference between {method} and {baseline}: {span} (the interval includes 0)."

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "paired": self.paired}

    def __repr__(self) -> str:
        return f"Difference(mean={self.mean:.4g}, low={self.low:.4g}, high={self.high:.4g}, n={self.n})"
