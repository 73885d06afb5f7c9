"""Files the library writes and reads: atomic writes, and torch files loaded safely.

A file is written to a temporary name in the same folder, flushed to disk and then renamed over
the old one (``os.replace`` is atomic on POSIX and Windows): a crash while saving never destroys
the previous file, and a reader sees the old file or the new one, never half of one. The dataset
cache (``data``), the results records (``results``) and the checkpoints (``checkpoint``) are all
written so.

A torch file is loaded with ``weights_only=True`` (tensors, numbers, strings and containers of
them: loading cannot run code), and a damaged file, or one holding a type outside that allowlist,
gets a message that says which and what to do.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "last.pt"
    >>> save_atomic({"w": torch.ones(2)}, path)
    >>> load(path)["w"].tolist()
    [1.0, 1.0]
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is damaged, holds a type the safe loader refuses, or does not fit the model."""


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
        # mkstemp makes the file private (0600); give it the permissions of any new file here, so
        # a dataset cache a TA fills on a shared drive stays readable for the students
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path) -> None:
    """``torch.save(obj, path)`` so that ``path`` always holds either the old or the new file."""
    atomic_write(path, lambda f: torch.save(obj, f))


# a dotted Python name (module.Class): what a well-formed pickle's GLOBAL opcode names
_DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")


def _unsupported_types(path) -> list[str]:
    """The types outside the ``weights_only`` allowlist that a well-formed torch file names, or []
    (also when the file is too damaged to tell, or this torch cannot tell)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # (not in older torch)
    if find is None:
        return []
    try:
        names = find(path)
    except Exception:  # noqa: BLE001 - a file this damaged is reported as damaged
        return []
    # a damaged pickle can also "name" a global: a flipped byte read as the GLOBAL opcode names
    # garbage, never a dotted identifier
    return list(names) if names and all(_DOTTED.fullmatch(n) for n in names) else []


def load(path, map_location="cpu"):
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only).

    A truncated or damaged file raises :class:`CheckpointError` naming the file and what to do; so
    does a sound file that holds a type the safe loader refuses (the message names the type and
    how to allow it).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError,
            KeyError, IndexError) as err:
        # not chained: torch's own text advises an unsafe load (weights_only=False), never do that
        kinds = _unsupported_types(path) if isinstance(err, pickle.UnpicklingError) else []
        if kinds:
            module, name = kinds[0].rsplit(".", 1)
            raise CheckpointError(
                f"The file {path} is not damaged, but it holds objects of type {', '.join(kinds)}, which the "
                "safe loader refuses: it loads tensors, numbers, strings and lists, tuples and dicts of "
                "them. Save plain values instead (model.state_dict(), float(x) for a numpy number, str(p) "
                "for a path). If you trust the file, allow the type before loading it: "
                f"`from {module} import {name}; torch.serialization.add_safe_globals([{name}])`.") from None
        raise CheckpointError(
            f"The checkpoint {path} is damaged or incomplete ({type(err).__name__}), e.g. half-copied "
            "from Google Drive or written to a full disk. Delete it to start the training afresh, or "
            "replace it with a complete copy (the previous checkpoint, if you kept one). Do not load "
            "it by other means: a damaged file cannot be repaired.") from None
