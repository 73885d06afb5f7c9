"""``fit``: one explicit, readable training loop for every chapter.

The heart of it is the loop you would write by hand::

    for batch in train_loader:
        loss = loss_fn(model(x), y)        # or step_fn(model, batch)
        loss.backward()
        optimizer.step(); optimizer.zero_grad()

plus what real training needs: the device, mixed precision on CUDA, gradient accumulation and
clipping, a per-step LR schedule, validation metrics, a progress bar, atomic checkpoints that
resume after a crash or a Colab disconnect, a clear stop on a NaN loss, and several processes
(DDP) when started by ``torchrun`` / ``accelerate launch`` / ``notebook_launcher``.

Example:
    >>> history = fit(model, train_loader, epochs=3, lr=1e-3, val_loader=val_loader,
    ...               metrics={"acc": accuracy}, checkpoint_dir="checkpoints/cnn")
    >>> history.best("val_acc")["epoch"]
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from . import checkpoint as ckpt
from .history import History
from .runtime import best_device, best_precision


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class OutOfMemoryAdvice(RuntimeError):
    """The device ran out of memory; the message says what to change."""


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the target.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item()
        0.5
    """
    return (logits.argmax(dim=-1) == targets).float().mean()


# ----------------------------------------------------------------------------- helpers
def to_device(batch, device):
    """Move every tensor in a (nested) tuple / list / dict to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _world(device=None):
    """(rank, local_rank, world_size) from the launcher's environment, starting the process group.

    The backend follows the device: NCCL for CUDA tensors, gloo for the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if on_cuda and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if on_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size()
    return 0, 0, 1


def _resolve_device(device, local_rank, world):
    if device is None:
        device = best_device()
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
    return torch.device(device)


def _autocast(device, precision):
    """The autocast context and whether a gradient scaler is needed."""
    if precision == "auto":
        precision = best_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'.")
    if precision == "fp32":
        return contextlib.nullcontext, False, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision == "fp16", precision


def _check_labels(logits, targets):
    """A clear error for class labels the model cannot output (instead of a C++ assert)."""
    if (torch.is_tensor(logits) and logits.ndim == 2 and torch.is_tensor(targets)
            and targets.ndim == 1 and not targets.is_floating_point() and len(targets)):
        lo, hi = (int(v) for v in torch.aminmax(targets))
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(
                f"Labels must lie in 0..{logits.shape[1] - 1} for a model with {logits.shape[1]} "
                f"outputs, but this batch has labels from {lo} to {hi}. Check the number of "
                "classes in the model's last layer and how the labels were encoded.")


def forward(model, batch, loss_fn=None):
    """Run a batch through the model: returns ``(logits, targets, loss or None)``.

    A batch is either ``(inputs, targets)`` or a Hugging Face dict with ``labels``.
    """
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        targets = batch.get("labels")
        out = model(**batch)
        logits = getattr(out, "logits", out)
        _check_labels(logits, targets)
        if loss_fn is not None:
            return logits, targets, loss_fn(logits, targets)
        return logits, targets, getattr(out, "loss", None)
    x, targets = batch[0], batch[1]
    logits = model(x)
    _check_labels(logits, targets)
    loss = (loss_fn or F.cross_entropy)(logits, targets)
    return logits, targets, loss


def _distributed_loader(loader, rank, world, shuffle):
    if loader.batch_size is None:
        raise ValueError("fit() on several processes needs a DataLoader built with batch_size=; "
                         "a custom batch_sampler has no distributed version here.")
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def _shard(loader, rank, world):
    """Every ``world``-th example for this rank: an exact split, no padding duplicates."""
    if world == 1:
        return loader
    part = Subset(loader.dataset, range(rank, len(loader.dataset), world))
    return DataLoader(part, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def _rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model, loader, metrics=None, *, loss_fn=None, step_fn=None, device=None,
             precision="auto") -> dict:
    """Average loss and metrics of ``model`` over ``loader`` (sample-weighted; reduced over processes).

    With ``step_fn`` the loss is ``step_fn(model, batch)``, the objective ``fit`` trained with
    (e.g. a reconstruction or contrastive loss); metrics then still see ``model(inputs)``.

    Example:
        >>> evaluate(model, test_loader, {"acc": accuracy})
        {'loss': 0.31, 'acc': 0.91}
    """
    rank, local_rank, world = _world(device)
    device = _resolve_device(device, local_rank, world)
    autocast, _, _ = _autocast(device, precision)
    metrics = _as_metric_dict(metrics)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(metrics) + 2, dtype=torch.float64)  # [n, loss, *metrics]
    for batch in _shard(loader, rank, world):
        batch = to_device(batch, device)
        with autocast():
            if step_fn is None:
                logits, targets, loss = forward(model, batch, loss_fn)
            else:
                loss = step_fn(model, batch)
                logits, targets, _ = forward(model, batch, _no_loss) if metrics else (None, None, None)
        n = _batch_size(batch)
        sums[0] += n
        sums[1] += float(loss) * n if loss is not None else math.nan
        for j, fn in enumerate(metrics.values()):
            sums[2 + j] += float(fn(logits.float(), targets)) * n
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    result = {} if math.isnan(sums[1]) else {"loss": float(sums[1] / sums[0])}
    result.update({name: float(sums[2 + j] / sums[0]) for j, name in enumerate(metrics)})
    return result


@torch.no_grad()
def predict(model, loader, *, device=None, precision="auto"):
    """All logits (float32, on the CPU) and targets for ``loader``, in order.

    Example:
        >>> logits, y = predict(model, test_loader)
        >>> (logits.argmax(1) == y).float().mean()
    """
    device = torch.device(device) if device is not None else best_device()
    autocast, _, _ = _autocast(device, precision)
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    for batch in loader:
        with autocast():
            logits, targets, _ = forward(model, to_device(batch, device))
        all_logits.append(logits.float().cpu())
        if targets is not None:
            all_targets.append(targets.cpu())
    model.train(was_training)
    return torch.cat(all_logits), (torch.cat(all_targets) if all_targets else None)


def _no_loss(logits, targets):
    return None


def _batch_size(batch) -> int:
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        first = batch.get("labels") if batch.get("labels") is not None else next(iter(batch.values()))
        return len(first)
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


def _as_metric_dict(metrics):
    if metrics is None:
        return {}
    if isinstance(metrics, dict):
        return dict(metrics)
    return {fn.__name__: fn for fn in metrics}


# ----------------------------------------------------------------------------- fit
def fit(model, train_loader, *, epochs, loss_fn=None, step_fn=None, optimizer=None, lr=1e-3,
        scheduler=None, val_loader=None, metrics=None, grad_accum=1, max_grad_norm=None,
        precision="auto", checkpoint_dir=None, progress=True, device=None, live_plot=False) -> History:
    """Train ``model`` and return its :class:`History`.

    Args:
        epochs: passes over ``train_loader``.
        loss_fn: ``loss_fn(logits, targets)`` for ``(inputs, targets)`` batches
            (default cross-entropy; Hugging Face dict batches use the model's own loss).
        step_fn: ``step_fn(model, batch) -> loss`` for anything else (SimCLR view pairs,
            a teacher in distillation, ...). The batch arrives on the device already.
        optimizer: default ``AdamW(lr=lr)`` over the parameters that require gradients.
        scheduler: an LR scheduler stepped after every optimizer step, or a function
            ``optimizer -> scheduler``.
        val_loader, metrics: evaluated after every epoch; ``metrics`` maps names to
            ``fn(logits, targets)`` (e.g. ``{"acc": accuracy}``).
        grad_accum: micro-batches per optimizer step (batch ``b`` behaves like ``k*b``).
        max_grad_norm: clip the gradient norm to this value.
        precision: ``auto`` (bf16/fp16 on CUDA, fp32 elsewhere), ``fp32``, ``bf16``, ``fp16``.
        checkpoint_dir: save ``last.pt`` there atomically after every epoch; a later call with
            the same folder resumes from it (after a crash or a Colab disconnect).
        progress: show a tqdm progress bar. live_plot: redraw the History plot each epoch.

    Example:
        >>> history = fit(model, loader, epochs=2, val_loader=val, metrics={"acc": accuracy})
    """
    if (loss_fn is not None) and (step_fn is not None):
        raise ValueError("give loss_fn= or step_fn=, not both.")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, not {grad_accum}.")
    rank, local_rank, world = _world(device)
    main = rank == 0
    device = _resolve_device(device, local_rank, world)
    autocast, needs_scaler, precision = _autocast(device, precision)
    model.to(device)
    raw_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        train_loader = _distributed_loader(train_loader, rank, world,
                                           isinstance(train_loader.sampler, RandomSampler))
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in raw_model.parameters() if p.requires_grad], lr=lr)
    if scheduler is not None and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None

    history, start = History(), 0
    path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if path is not None and path.exists():
        start, history = _resume(path, raw_model, optimizer, scheduler, scaler, device, main)
        if start >= epochs and main:
            print(f"Already trained for {start} epochs (checkpoint {path}); "
                  "delete that folder, or ask for more epochs, to train again.")

    n_batches = len(train_loader)
    bar = None
    if progress and main and start < epochs:
        from tqdm.auto import tqdm
        bar = tqdm(total=(epochs - start) * n_batches, desc=f"epoch {start + 1}/{epochs}", unit="batch")
    live = _LivePlot() if (live_plot and main) else None

    for epoch in range(start, epochs):
        if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        t0, pending, epoch_losses = time.perf_counter(), [], []
        for i, batch in enumerate(train_loader):
            group = min(grad_accum, n_batches - (i // grad_accum) * grad_accum)
            last_micro = (i + 1) % grad_accum == 0 or i + 1 == n_batches
            sync = contextlib.nullcontext() if (world == 1 or last_micro) else model.no_sync()
            batch = to_device(batch, device)
            with sync, _explain_oom(device, train_loader, grad_accum, precision):
                with autocast():
                    loss = step_fn(model, batch) if step_fn else forward(model, batch, loss_fn)[2]
                if loss is None:
                    raise ValueError("the model returned no loss: pass loss_fn= or step_fn=, "
                                     "or put 'labels' in the batch of a Hugging Face model.")
                scaled = loss if group == 1 else loss / group
                (scaler.scale(scaled) if scaler else scaled).backward()
            if last_micro:
                if max_grad_norm is not None:
                    if scaler:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
            pending.append(loss.detach().float())
            # check for NaN every few steps (each check waits for the GPU) and at the epoch's end
            if len(pending) == 10 or i + 1 == n_batches:
                values = torch.stack(pending).cpu().tolist()
                _check_finite(values, epoch, i + 1 - len(values), lambda: history.steps + epoch_losses,
                              optimizer)
                epoch_losses += values
                pending = []
                if bar is not None:
                    bar.update(len(values))
                    bar.set_postfix(loss=f"{np.mean(epoch_losses[-50:]):.4f}")
        history.steps += epoch_losses
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(epoch_losses)),
               "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None:
            val = evaluate(raw_model, val_loader, metrics, loss_fn=loss_fn, step_fn=step_fn,
                           device=device, precision=precision)
            row.update({f"val_{k}": v for k, v in val.items()})
        if world > 1:  # the mean train loss over all processes
            t = torch.tensor([row["train_loss"]], dtype=torch.float64)
            dist.all_reduce(t)
            row["train_loss"] = float(t / world)
        row["time_s"] = time.perf_counter() - t0
        history.log(row)
        if bar is not None:
            bar.set_description(f"epoch {min(epoch + 2, epochs)}/{epochs}")
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith(("train", "val"))})
        if path is not None:
            if main:
                ckpt.save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict() if scheduler is not None else None,
                                  "scaler": scaler.state_dict() if scaler else None,
                                  "epoch": epoch + 1, "history": history.to_dict(),
                                  "rng": _rng_state()}, path)
            if world > 1:
                dist.barrier()
        if live is not None:
            live.update(history)
    if bar is not None:
        bar.close()
    return history


@contextlib.contextmanager
def _explain_oom(device, loader, grad_accum, precision):
    """Turn an out-of-memory error into advice with this run's numbers."""
    try:
        yield
    except _OOM as err:
        b = getattr(loader, "batch_size", None)
        raise OutOfMemoryAdvice(
            f"{device} ran out of memory at batch size {b} (precision {precision}). Try: a smaller "
            f"batch_size with grad_accum={2 * grad_accum} to keep the effective batch, mixed precision "
            "(precision='auto' on CUDA), a smaller profile/model, or restart the kernel to free memory "
            "held by earlier cells (torch.cuda.empty_cache() does not free tensors still referenced).") from err


def _check_finite(values, epoch, first_step, previous, optimizer):
    for j, v in enumerate(values):
        if not math.isfinite(v):
            finite = [p for p in previous() + values[:j] if math.isfinite(p)]
            last = f"{finite[-1]:.4g}" if finite else "none yet"
            raise NonFiniteLossError(
                f"The loss became {v} at epoch {epoch + 1}, step {first_step + j + 1} of that epoch "
                f"(last finite loss: {last}). Training stopped; the last checkpoint, if any, is intact.\n"
                f"Things to try: a lower learning rate (now {optimizer.param_groups[0]['lr']:.3g}), "
                "gradient clipping (max_grad_norm=1.0), checking the inputs for NaN/inf, "
                "precision='bf16' or 'fp32' instead of fp16, and a loss computed from logits "
                "(F.cross_entropy) rather than log(softmax(...)).")


def _resume(path, model, optimizer, scheduler, scaler, device, main):
    state = ckpt.load(path, map_location=device)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise RuntimeError(f"The checkpoint {path} does not fit this model/optimizer ({err}). "
                           "Use a new checkpoint_dir, or delete this one to start afresh.") from err
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    if main:
        print(f"Resumed from {path} after epoch {state['epoch']}.")
    return state["epoch"], History.from_dict(state["history"])


class _LivePlot:
    """Redraws the History figure in place in Jupyter (does nothing elsewhere)."""

    def __init__(self):
        self.handle = None

    def update(self, history):
        try:
            from IPython.display import display
        except ImportError:
            return
        import matplotlib.pyplot as plt
        fig = history.plot()
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)
