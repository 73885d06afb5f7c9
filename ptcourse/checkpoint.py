"""Checkpoints: the training state ``fit`` saves and resumes exactly.

``Checkpointer`` is what ``fit`` uses: ``last.pt`` holds the model, optimizer, scheduler, gradient
scaler, History, the position in the epoch, and every random state that decides what comes next
(the global generators, the loader's generator and sampler state at the epoch's start). A run
killed at any optimizer step therefore resumes to the same weights as a run never interrupted,
bit for bit on the CPU. With loader worker processes the batches are the same, but random draws
inside the workers (augmentation in the dataset) are made afresh after a mid-epoch resume, and
after any resume with ``persistent_workers=True`` (a warning says so). The file is written
atomically and loaded safely (``files.save_atomic``, ``files.load``).

Example:
    >>> ck = Checkpointer("ckpt", save_every=500, model=model, optimizer=optimizer, loader=loader)
    >>> start, history = ck.resume(epochs=10)    # (0, History()) without a checkpoint
"""
from __future__ import annotations

import random
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from . import distributed
from .files import CheckpointError, load, save_atomic
from .history import History


# ----------------------------------------------------------------------------- random states
def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def rng_state() -> dict:
    """The global random states (torch CPU, every CUDA GPU, Apple MPS, numpy, Python), as CPU data."""
    kind, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "mps": torch.mps.get_rng_state() if _mps_available() else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), *rest],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; works whatever device the tensors were loaded to.

    On a machine with another number of GPUs than the one that saved it (a lab node's checkpoint
    resumed on Colab), the GPUs both have are restored and a warning says that random draws on
    the GPUs (dropout) will not continue exactly as they would have.
    """
    torch.set_rng_state(state["torch"].cpu())  # set_rng_state takes only a CPU byte tensor
    saved = state["cuda"]
    if saved and torch.cuda.is_available():
        have = torch.cuda.device_count()
        for i, s in enumerate(saved[:have]):
            torch.cuda.set_rng_state(s.cpu(), i)
        if len(saved) != have:
            both = min(len(saved), have)
            restored = "GPU 0's" if both == 1 else f"those of GPUs 0 to {both - 1}"
            warnings.warn(
                f"The checkpoint holds the random states of {len(saved)} GPU{'s' * (len(saved) > 1)} and this "
                f"machine has {have}: restored {restored}. Random draws on the GPUs (dropout, augmentations on "
                "the GPU) will differ from the run that saved it: training continues, but not exactly as it "
                "would have.", stacklevel=2)
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(state["mps"].cpu())
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _loader_parts(loader):
    """The generators and stateful samplers that decide a loader's order (each once)."""
    parts = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
             getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    generators, stateful = [], []
    for p in parts:
        g = getattr(p, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in generators):
            generators.append(g)
        if p is not loader and hasattr(p, "state_dict") and hasattr(p, "load_state_dict") \
                and all(p is not q for q in stateful):
            stateful.append(p)
    return generators, stateful


def loader_state(loader) -> dict:
    """Global random states plus the loader's generators and sampler states (e.g. an epoch counter)."""
    generators, stateful = _loader_parts(loader)
    return {"rng": rng_state(), "generators": [g.get_state() for g in generators],
            "samplers": [s.state_dict() for s in stateful]}


def set_loader_state(loader, state: dict) -> None:
    set_rng_state(state["rng"])
    generators, stateful = _loader_parts(loader)
    for g, s in zip(generators, state["generators"]):
        g.set_state(s.cpu())
    for s, d in zip(stateful, state["samplers"]):
        s.load_state_dict(d)


class _SkipBatches:
    """The loader's batch sampler without its first ``k`` batches; ``then()`` runs after skipping."""

    def __init__(self, batch_sampler, k, then):
        self.inner, self.k, self.then = batch_sampler, k, then

    def __len__(self):
        return len(self.inner) - self.k

    def __iter__(self):
        it = iter(self.inner)
        for _ in range(self.k):
            next(it)
        self.then()
        yield from it


def skip_batches(loader, k: int, then):
    """Iterate ``loader`` from its ``k``-th batch. The indices of the skipped batches are drawn (so
    the order is the one of an uninterrupted epoch) but their data is not loaded, except for an
    iterable dataset or a loader with persistent workers, which load them and throw them away (their
    workers serve the whole run: a copy of the loader would start others)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None or _persistent(loader):
        it = iter(loader)
        for _ in range(k):
            next(it)
        then()
        return it
    keep = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
            "generator", "prefetch_factor", "persistent_workers", "pin_memory_device")
    kwargs = {a: getattr(loader, a) for a in keep if hasattr(loader, a)}
    return iter(DataLoader(loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, k, then), **kwargs))


def _persistent(loader) -> bool:
    return getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0


def _draw_worker_seed(loader) -> None:
    """The draw with which a ``DataLoader`` seeds its workers when they start (one int64 from its
    generator, or from the global one)."""
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)


# ----------------------------------------------------------------------------- fit's checkpoints
def parse_every(save_every) -> tuple[int | None, float | None]:
    """``500`` -> every 500 optimizer steps; ``"10min"`` / ``"90s"`` -> by the clock; None -> epoch ends."""
    if save_every is None:
        return None, None
    if isinstance(save_every, int) and save_every > 0:
        return save_every, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(min|s)\s*", str(save_every))
    if not m:
        raise ValueError(f"save_every={save_every!r}: use a number of steps (e.g. 500), a time "
                         "('10min', '90s') or None (only at the end of each epoch).")
    return None, float(m.group(1)) * (60 if m.group(2) == "min" else 1)


class Checkpointer:
    """``last.pt`` in ``folder``: saved at each epoch's end and every ``save_every``; resumed exactly.

    Args:
        folder: where ``last.pt`` goes; None: no checkpoints (``save`` and ``resume`` do nothing).
        save_every: optimizer steps (``500``), a time (``"10min"``) or None (epoch ends only).
        model, optimizer, scheduler, scaler: what is saved and restored (scheduler and scaler may be None).
        loader: the training loader, whose generators and sampler state decide the data order.
        rank, world: this process and the number of processes (each saves its own random state;
            rank 0 writes the file).

    Between calls it remembers ``start``, the random states at the current epoch's start (a
    mid-epoch checkpoint holds them, so that a resumed epoch draws the same order again),
    ``pending``, what :meth:`resume` read for the next :meth:`batches`, and ``saved_at``, the time
    of the last save (for ``save_every`` by time).

    Example (what ``fit`` does)::

        ck = Checkpointer("ckpt", "10min", model=model, optimizer=optimizer, scheduler=scheduler,
                          scaler=scaler, loader=loader, rank=rank, world=world)
        start, history = ck.resume(epochs)           # (0, History()) without a checkpoint
        batches, partial = ck.batches(start)         # skips what a resumed epoch had done
        for i, batch in batches:
            ...; ck.save(start, i + 1, history, partial_record)   # mid-epoch
        ck.save(start + 1, 0, history)                # at the epoch's end
    """

    def __init__(self, folder, save_every="10min", *, model, optimizer, loader, scheduler=None, scaler=None,
                 rank=0, world=1):
        self.path = Path(folder) / "last.pt" if folder else None
        self.every_steps, self.every_s = parse_every(save_every)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.loader, self.rank, self.world = loader, rank, world
        self.start = None     # loader_state() at the current epoch's start
        self.pending = None   # what resume() read, consumed by the next batches()
        self.saved_at = time.monotonic()
        if self.path is not None and _persistent(loader):
            warnings.warn(
                "Checkpoints with persistent_workers=True resume the data order and the model's random "
                "draws exactly, but not the random draws inside the worker processes (random "
                "augmentation in the dataset): those run on from epoch to epoch in the workers, where "
                "a checkpoint cannot see them, so after a resume they differ from an uninterrupted "
                "run. For an exact resume use persistent_workers=False (the workers restart each epoch "
                "from a seed the checkpoint holds).", stacklevel=3)

    def resume(self, epochs) -> tuple[int, History]:
        """Load ``last.pt`` if there is one: returns (finished epochs, History)."""
        if self.path is None or not self.path.exists():
            return 0, History()
        state = load(self.path)  # on the CPU: RNG states must stay there; load_state_dict moves the rest
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"The checkpoint {self.path} does not fit this model/optimizer ({err}). "
                                  "Use a new checkpoint_dir, or delete this one to start afresh.") from err
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if isinstance(rng, dict):  # the epoch-end-only format: one random state, taken at an epoch's end
            rng = [{"start": {"rng": rng, "generators": [], "samplers": []}, "now": rng}]
        if len(rng) != self.world:
            warnings.warn(
                f"The checkpoint {self.path} was written by {len(rng)} process{'es' * (len(rng) > 1)} and this "
                f"run has {self.world}: the model, optimizer, schedule and History resume, but each "
                "process's share of the data and its random state were those of the other run, so "
                "training continues, but not exactly as it would have.", stacklevel=3)
        mine = rng[self.rank] if len(rng) == self.world else rng[0]
        epoch, batch = state["epoch"], state.get("batch", 0)
        self.pending = {"partial": None, **mine, "batch": batch}
        if self.rank == 0:
            where = f"after epoch {epoch}" if batch == 0 else f"in epoch {epoch + 1} after batch {batch}"
            print(f"Resumed from {self.path} {where}." if epoch < epochs else
                  f"Already trained for {epoch} epochs (checkpoint {self.path}); delete that folder, "
                  "or ask for more epochs, to train again.")
        return epoch, History.from_dict(state["history"])

    def batches(self, epoch):
        """``enumerate`` over this epoch's batches, from where a resumed run stopped; remembers the
        epoch's starting random state for :meth:`save`. Returns (iterator, partial epoch record)."""
        resume, self.pending = self.pending, None
        persistent = resume is not None and _persistent(self.loader)
        if persistent:
            # Persistent workers draw their seed when they start, in the uninterrupted run at the
            # start of epoch 0 only. Start them now, before the random states are restored, and
            # make that draw again below only if this is epoch 0: the epoch then draws its order
            # from the states the uninterrupted run had.
            iter(self.loader)
        if resume is not None:
            set_loader_state(self.loader, resume["start"])
        self.start = loader_state(self.loader) if self.path is not None else None
        if persistent and epoch == 0:
            _draw_worker_seed(self.loader)
        if resume is None or resume["batch"] == 0:
            return enumerate(self.loader), None
        it = skip_batches(self.loader, resume["batch"], lambda: set_rng_state(resume["now"]))
        return enumerate(it, resume["batch"]), resume["partial"]

    def due(self, step: int) -> bool:
        """Whether to save after optimizer step ``step`` (by steps here; by time see :meth:`due_by_time`)."""
        return self.path is not None and self.every_steps is not None and step % self.every_steps == 0

    def due_by_time(self) -> bool:
        return self.path is not None and self.every_s is not None \
            and time.monotonic() - self.saved_at >= self.every_s

    def save(self, epoch, batch, history, partial=None) -> None:
        """Save after ``batch`` batches of epoch ``epoch + 1`` (``batch=0``: at the end of epoch ``epoch``)."""
        if self.path is None:
            return
        now = rng_state()
        mine = {"start": loader_state(self.loader) if batch == 0 else self.start, "now": now, "partial": partial}
        states = distributed.gather(mine, self.world)  # every process's own random state and epoch losses
        if self.rank == 0:
            save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                         "epoch": epoch, "batch": batch, "history": history.to_dict(),
                         "rng": states}, self.path)
        distributed.barrier(self.world)
        self.saved_at = time.monotonic()
