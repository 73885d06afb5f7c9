"""Atomic checkpoints: a crash while saving never destroys the previous checkpoint.

The file is written to a temporary name in the same folder, flushed to disk and then
renamed over the old one (``os.replace`` is atomic on POSIX and Windows).

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "last.pt"
    >>> save_atomic({"w": torch.ones(2)}, path)
    >>> load(path)["w"].tolist()
    [1.0, 1.0]
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, flush it to disk, then
    rename it over ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path) -> None:
    """``torch.save(obj, path)`` so that ``path`` always holds either the old or the new file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path, map_location="cpu"):
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)
