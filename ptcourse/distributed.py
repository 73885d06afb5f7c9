"""Several processes (DDP): what ``fit`` and ``evaluate`` do when a launcher started them.

``torchrun``, ``accelerate launch`` and Accelerate's ``notebook_launcher`` set ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`setup` joins the process group (NCCL for CUDA, gloo for the
CPU; several processes on a Mac train on the CPU, as gloo has no MPS support). Each process trains
a DDP copy of the model on its own share of the data (:func:`shard_train`), evaluates an exact
share of the validation set (:func:`shard_eval`), and sums numbers across processes
(:func:`all_sum`, :func:`any_true`) with tensors on the training device: NCCL reduces only CUDA
tensors. A process group that :func:`setup` joined is left again when Python exits (:func:`leave`),
once gloo's worker threads have let go of every tensor handed to them: a late release during
interpreter shutdown aborts the process ("terminate called without an active exception").

Example:
    >>> rank, local_rank, world = setup()
    >>> device = resolve_device(None, local_rank, world)
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import pickle
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler, Subset

from .runtime import best_device


def setup(device=None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment, joining the process group:
    NCCL when this process trains on a GPU (made the current CUDA device, where NCCL works),
    gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        target = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")), world)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
        atexit.register(leave)  # runs before interpreter shutdown, while Python can still serve gloo's threads
    if dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size()
    return 0, 0, 1


def leave(timeout: float = 10.0) -> None:
    """Destroy the process group, if one is still there, once no gloo worker thread holds a tensor
    of ours (``setup`` calls this at exit for the group it joined; a group you created yourself is
    yours to destroy).

    Why the wait: gloo runs each collective on a worker thread, which lets go of the collective's
    tensors a moment *after* the caller saw it finish. When Python drops a tensor first, the thread's
    late release has to take the GIL to free the Python object; if that happens while the
    interpreter shuts down, the process aborts with "terminate called without an active exception"
    (SIGABRT) after training finished. ``destroy_process_group`` does not prevent it: once
    ``DistributedDataParallel`` has been built (it imports ``torch._dynamo``), the gloo group
    survives its destruction with its threads running (``python benchmarks/ddp_exit.py`` shows
    both). So every tensor this module hands to a collective is kept (:func:`_hold`) until the
    worker thread has let go of it (its use count falls back to 1), and only then released, while
    Python is still fully alive.
    """
    deadline = time.monotonic() + timeout
    while _HELD and time.monotonic() < deadline:
        _HELD[:] = [t for t in _HELD if t._use_count() > 1]
        if _HELD:
            time.sleep(0.005)  # (releases the GIL, so the worker thread can finish)
    _HELD.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


# tensors given to collectives, kept until leave() sees that no gloo thread still holds them; the few
# newest only (each step's vote and each epoch's sums are tiny, and older ones were released long ago)
_HELD: list = []


def _hold(t: torch.Tensor) -> torch.Tensor:
    _HELD.append(t)
    del _HELD[:-16]
    return t


def held() -> int:
    """How many tensors handed to a collective a worker thread still holds (0 once all let go)."""
    return sum(t._use_count() > 1 for t in _HELD)


def resolve_device(device, local_rank=0, world=1) -> torch.device:
    """``device`` if given, else the best one for this process.

    One process: the fastest device (CUDA, Apple MPS, CPU; ``PTCOURSE_DEVICE`` overrides). Several
    processes: GPU ``local_rank`` when this process sees all the machine's GPUs, GPU 0 when it sees
    fewer (a launcher that gives each process its own GPU through ``CUDA_VISIBLE_DEVICES``); without
    CUDA, the CPU: the processes' collectives run over NCCL (CUDA) or gloo, and gloo, the only
    backend on a Mac, has no MPS support.
    """
    if device is None:
        device = best_device()
        if world > 1 and device.type == "mps" and not os.environ.get("PTCOURSE_DEVICE"):
            device = torch.device("cpu")
    device = torch.device(device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)
    if world > 1 and device.type == "mps":
        raise ValueError(f"{world} processes cannot train on MPS: gloo, the backend that connects "
                         "processes without CUDA, has no MPS support. Use device='cpu' (what fit "
                         "chooses by itself on a Mac with several processes), or one process on MPS.")
    return device


def wrap(model, device, world):
    """The model itself in one process, a DistributedDataParallel copy in several."""
    if world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def no_sync(model, skip: bool):
    """Skip DDP's gradient all-reduce on the micro-batches inside an accumulation window."""
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


def _loader_options(loader) -> dict:
    keep = ("num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
            "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers", "pin_memory_device")
    return {a: getattr(loader, a) for a in keep if hasattr(loader, a)}


class ShardOf(Sampler):
    """Rank ``rank``'s share of what another sampler (or batch sampler) picks each epoch: items
    ``rank``, ``rank + world``, ... of its sequence.

    Every rank must draw the same sequence, so the draw runs with torch's global CPU generator set
    to ``seed + epoch`` (then put back): a sampler that draws from it (``SubsetRandomSampler``,
    ``WeightedRandomSampler`` and ``RandomSampler`` without a generator) agrees on all ranks and
    changes each epoch, and one with its own generator agrees when every rank built it alike.
    ``pad``: repeat items from the start so that every rank gets the same number (training: DDP
    steps all ranks together); without it the shares are an exact split (evaluation).
    """

    def __init__(self, sampler, rank: int, world: int, seed: int = 0, pad: bool = True):
        self.sampler, self.rank, self.world, self.seed, self.pad, self.epoch = sampler, rank, world, seed, pad, 0
        self.generator = getattr(sampler, "generator", None)  # saved in checkpoints with the loader's

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return math.ceil(n / self.world) if self.pad else len(range(self.rank, n, self.world))

    def __iter__(self):
        with torch.random.fork_rng(devices=[]):  # (the CPU generator, which samplers draw from)
            torch.default_generator.manual_seed(self.seed + self.epoch)
            items = list(self.sampler)
        if self.pad and items:
            total = len(self) * self.world
            items += (items * math.ceil(total / len(items)))[:total - len(items)]
        return iter(items[self.rank::self.world])


def shard_train(loader, rank, world):
    """This process's share of a training loader, keeping every other option (generator,
    worker_init_fn, persistent workers, ...). The stock samplers become a ``DistributedSampler``
    (shuffled if the original was); any other sampler (``SubsetRandomSampler``,
    ``WeightedRandomSampler``, your own) keeps its choice, each rank taking its share
    (:class:`ShardOf`)."""
    if world == 1:
        return loader
    if loader.batch_size is None:
        raise ValueError("fit() on several processes needs a DataLoader built with batch_size=; "
                         "a custom batch_sampler has no distributed version here.")
    seed = loader.generator.initial_seed() % 2**31 if loader.generator is not None else 0  # same on all ranks
    sampler = loader.sampler
    if type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                              and sampler.num_samples == len(loader.dataset)):
        shard = DistributedSampler(loader.dataset, num_replicas=world, rank=rank,
                                   shuffle=type(sampler) is RandomSampler, seed=seed)
    else:
        shard = ShardOf(sampler, rank, world, seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=shard, **_loader_options(loader))


def shard_eval(loader, rank, world):
    """This rank's exact share of an evaluation loader, no padding duplicates: every ``world``-th
    example in the loader's batch size, or, for a loader built with a ``batch_sampler``, every
    ``world``-th of its batches as it makes them."""
    if world == 1:
        return loader
    options = {k: v for k, v in _loader_options(loader).items() if k != "drop_last"}
    if loader.batch_size is None and loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=ShardOf(loader.batch_sampler, rank, world, pad=False),
                          **options)
    return DataLoader(Subset(loader.dataset, range(rank, len(loader.dataset), world)),
                      batch_size=loader.batch_size, **options)


def set_epoch(loader, epoch) -> None:
    """Tell this epoch's number to a sampler that shuffles by epoch (``DistributedSampler``, :class:`ShardOf`)."""
    if isinstance(getattr(loader, "sampler", None), (DistributedSampler, ShardOf)):
        loader.sampler.set_epoch(epoch)


def all_sum(t: torch.Tensor, world) -> torch.Tensor:
    """Sum ``t`` over all processes, in place. ``t`` must be on the training device (NCCL needs CUDA)."""
    if world > 1:
        dist.all_reduce(_hold(t))
    return t


def any_true(flags: torch.Tensor, world) -> torch.Tensor:
    """Flags (0/1, on the training device) set to 1 where any process has 1, so that all processes
    stop, or save, together."""
    if world > 1:
        dist.all_reduce(_hold(flags), op=dist.ReduceOp.MAX)
    return flags


def gather(obj, world) -> list:
    """Every process's ``obj`` (a list in rank order; ``[obj]`` in one process)."""
    if world == 1:
        return [obj]
    # all_gather_object would hand gloo tensors it drops at once (see leave); these are held
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(on)
    sizes = [_hold(torch.zeros(1, dtype=torch.int64, device=on)) for _ in range(world)]
    dist.all_gather(sizes, _hold(torch.tensor([len(data)], device=on)))
    longest = int(max(s.item() for s in sizes))
    chunks = [_hold(torch.zeros(longest, dtype=torch.uint8, device=on)) for _ in range(world)]
    dist.all_gather(chunks, _hold(torch.cat([data, torch.zeros(longest - len(data), dtype=torch.uint8, device=on)])))
    return [pickle.loads(c[:int(n.item())].cpu().numpy().tobytes()) for c, n in zip(chunks, sizes)]


def barrier(world) -> None:
    if world > 1:
        dist.barrier()
