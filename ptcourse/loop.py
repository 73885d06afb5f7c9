"""``fit``: one explicit, readable training loop for every chapter.

The heart of it is the loop you would write by hand::

    for batch in train_loader:
        loss = loss_fn(model(x), y)        # or step_fn(model, batch)
        loss.backward()
        optimizer.step(); optimizer.zero_grad()

plus what real training needs: the device, mixed precision on CUDA, gradient accumulation and
clipping, a per-step LR schedule, validation metrics, a progress bar, a clear stop on a NaN loss.
What is not the loop lives beside it: several processes (DDP) in ``distributed.py``, checkpoints
that resume exactly after a crash or a Colab disconnect in ``checkpoint.py``, the live plot in
``history.py``.

Example:
    >>> history = fit(model, train_loader, epochs=3, lr=1e-3, val_loader=val_loader,
    ...               metrics={"acc": accuracy}, checkpoint_dir="checkpoints/cnn")
    >>> history.best("val_acc")["epoch"]
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from . import distributed
from .checkpoint import Checkpointer
from .history import History, LivePlot
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


# ----------------------------------------------------------------------------- batches
def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (a tensor shared by two layers counts once); ``trainable_only``: those
    that require gradients.

    Example:
        >>> count_parameters(torch.nn.Linear(512, 10))
        5130
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def to_device(batch, device):
    """Move every tensor in a (nested) tuple / list / dict to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _targets(batch):
    """The targets of a batch still on the CPU: ``labels`` of a dict, else the second item."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return batch.get("labels")
    return batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None


def _check_labels(logits, targets):
    """A clear error for class labels the model cannot output (instead of a C++ assert).

    Reads only CPU targets: reading GPU ones would make every step wait for the GPU, so ``fit``
    and ``evaluate`` pass the batch's targets from before it moved to the device.
    """
    if (torch.is_tensor(logits) and logits.ndim == 2 and torch.is_tensor(targets)
            and targets.device.type == "cpu" and targets.ndim == 1
            and not targets.is_floating_point() and len(targets)):
        lo, hi = (int(v) for v in torch.aminmax(targets))
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(
                f"Labels must lie in 0..{logits.shape[1] - 1} for a model with {logits.shape[1]} "
                f"outputs, but this batch has labels from {lo} to {hi}. Check the number of "
                "classes in the model's last layer and how the labels were encoded.")


def forward(model, batch, loss_fn=None, *, cpu_targets=None):
    """Run a batch through the model: returns ``(logits, targets, loss or None)``.

    A batch is either ``(inputs, targets)`` or a Hugging Face dict with ``labels``.
    ``cpu_targets``: the targets before the batch moved to the device, for the label check.
    """
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        targets = batch.get("labels")
        out = model(**batch)
        logits = getattr(out, "logits", out)
        _check_labels(logits, targets if cpu_targets is None else cpu_targets)
        if loss_fn is not None:
            return logits, targets, loss_fn(logits, targets)
        return logits, targets, getattr(out, "loss", None)
    x, targets = batch[0], batch[1]
    logits = model(x)
    _check_labels(logits, targets if cpu_targets is None else cpu_targets)
    return logits, targets, (loss_fn or F.cross_entropy)(logits, targets)


def _batch_size(batch) -> int:
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        first = batch.get("labels") if batch.get("labels") is not None else next(iter(batch.values()))
        return len(first)
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


def _autocast(device, precision):
    """The autocast context, a GradScaler (fp16) or None, and the precision chosen."""
    if precision == "auto":
        precision = best_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'.")
    if precision == "fp32":
        return contextlib.nullcontext, None, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, precision


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
    rank, local_rank, world = distributed.setup(device)
    device = distributed.resolve_device(device, local_rank, world)
    autocast, _, _ = _autocast(device, precision)
    metrics = _as_metric_dict(metrics)
    was_training, has_loss = model.training, True
    model.eval()
    # sums stay on the device: no wait for the GPU per batch, and NCCL can reduce them
    sums = torch.zeros(len(metrics) + 2, dtype=torch.float32 if device.type == "mps" else torch.float64,
                       device=device)  # [n, loss * n, metric * n, ...]
    for batch in distributed.shard_eval(loader, rank, world):
        cpu_targets = _targets(batch)
        batch = to_device(batch, device)
        with autocast():
            if step_fn is None:
                logits, targets, loss = forward(model, batch, loss_fn, cpu_targets=cpu_targets)
            else:
                loss = step_fn(model, batch)
                if metrics:
                    logits, targets, _ = forward(model, batch, _no_loss, cpu_targets=cpu_targets)
        n = _batch_size(batch)
        sums[0] += n
        has_loss = has_loss and loss is not None
        if has_loss:
            sums[1] += loss.detach().to(sums.dtype) * n
        for j, fn in enumerate(metrics.values()):
            sums[2 + j] += torch.as_tensor(fn(logits.float(), targets), dtype=sums.dtype, device=device) * n
    total = distributed.all_sum(sums, world).tolist()
    model.train(was_training)
    n = total[0] or math.nan  # (an empty loader gives NaN, not an error)
    result = {"loss": total[1] / n} if has_loss else {}
    result.update({name: total[2 + j] / n for j, name in enumerate(metrics)})
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
            logits, targets, _ = forward(model, to_device(batch, device), cpu_targets=_targets(batch))
        all_logits.append(logits.float().cpu())
        if targets is not None:
            all_targets.append(targets.cpu())
    model.train(was_training)
    return torch.cat(all_logits), (torch.cat(all_targets) if all_targets else None)


def _no_loss(logits, targets):
    return None


def _as_metric_dict(metrics):
    if metrics is None:
        return {}
    if isinstance(metrics, dict):
        return dict(metrics)
    return {fn.__name__: fn for fn in metrics}


# ----------------------------------------------------------------------------- fit
def fit(model, train_loader, *, epochs, loss_fn=None, step_fn=None, optimizer=None, lr=1e-3,
        scheduler=None, val_loader=None, metrics=None, grad_accum=1, max_grad_norm=None,
        precision="auto", checkpoint_dir=None, save_every="10min", progress=True, device=None,
        live_plot=False) -> History:
    """Train ``model`` and return its :class:`History`.

    ``loss_fn(logits, targets)`` serves ``(inputs, targets)`` batches (default cross-entropy; a
    Hugging Face dict batch uses the model's own loss); ``step_fn(model, batch) -> loss`` serves
    anything else (SimCLR view pairs, a teacher, ...). ``optimizer``: default ``AdamW(lr=lr)``.
    ``scheduler``: stepped after every optimizer step (or ``optimizer -> scheduler``). ``val_loader``
    and ``metrics`` (``{"acc": accuracy}``): evaluated after every epoch. ``grad_accum``: micro-batches
    per step. ``max_grad_norm``: clip to it. ``precision``: ``auto`` (bf16/fp16 on CUDA), ``fp32``,
    ``bf16``, ``fp16``. ``checkpoint_dir``: ``last.pt`` there, saved at each epoch's end and every
    ``save_every`` (optimizer steps such as ``500``, or ``"10min"``; None: epoch ends only); a later
    call with the same folder resumes exactly where it stopped. ``live_plot``: redraw each epoch.

    Example:
        >>> history = fit(model, loader, epochs=2, val_loader=val, metrics={"acc": accuracy})
    """
    _check_arguments(loss_fn, step_fn, grad_accum)
    rank, local_rank, world = distributed.setup(device)
    device = distributed.resolve_device(device, local_rank, world)
    autocast, scaler, precision = _autocast(device, precision)
    raw_model = model.to(device)
    model = distributed.wrap(raw_model, device, world)
    train_loader = distributed.shard_train(train_loader, rank, world)
    optimizer, scheduler = _optimizer_and_scheduler(raw_model, optimizer, lr, scheduler)
    ck = Checkpointer(checkpoint_dir, save_every, model=raw_model, optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler, loader=train_loader, rank=rank, world=world)
    start, history = ck.resume(epochs)
    n_batches, steps = len(train_loader), 0
    bar = _progress_bar(progress and rank == 0, start, epochs, n_batches)
    live = LivePlot() if live_plot and rank == 0 else None
    optimizer.zero_grad(set_to_none=True)  # a .backward() in an earlier cell must not leak into step 1
    for epoch in range(start, epochs):
        distributed.set_epoch(train_loader, epoch)
        model.train()
        batches, partial = ck.batches(epoch)
        t0, log = time.perf_counter(), _LossLog(history.steps, partial, bar)
        for i, batch in batches:
            last = (i + 1) % grad_accum == 0 or i + 1 == n_batches
            window = min(grad_accum, n_batches - i // grad_accum * grad_accum)  # the last may be partial
            cpu_targets, batch = _targets(batch), to_device(batch, device)
            with distributed.no_sync(model, skip=not last), _explain_oom(device, train_loader, grad_accum, precision):
                with autocast():
                    loss = (step_fn(model, batch) if step_fn else
                            forward(model, batch, loss_fn, cpu_targets=cpu_targets)[2])
                _require_loss(loss)
                (scaler.scale(loss / window) if scaler else loss / window).backward()
            if last:
                steps += 1
                _optimizer_step(optimizer, scheduler, scaler, raw_model, max_grad_norm)
            log.add(loss, _batch_size(batch))
            if (last and (len(log.pending) >= 10 or ck.due(steps))) or i + 1 == n_batches:
                save = log.flush(epoch, optimizer, device, world, ck.due_by_time()) or ck.due(steps)
                if save and i + 1 < n_batches:
                    ck.save(epoch, i + 1, history, log.partial())
        row = {"epoch": epoch + 1, "train_loss": log.mean(device, world), "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None:
            val = evaluate(raw_model, val_loader, metrics, loss_fn=loss_fn, step_fn=step_fn, device=device,
                           precision=precision)
            row.update({f"val_{k}": v for k, v in val.items()})
        history.steps += log.losses
        history.log({**row, "time_s": time.perf_counter() - t0})
        ck.save(epoch + 1, 0, history)
        _show(bar, live, history, epoch, epochs)
    if bar is not None:
        bar.close()
    return history


# ----------------------------------------------------------------------------- fit's helpers
def _check_arguments(loss_fn, step_fn, grad_accum):
    if (loss_fn is not None) and (step_fn is not None):
        raise ValueError("give loss_fn= or step_fn=, not both.")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, not {grad_accum}.")


def _optimizer_and_scheduler(model, optimizer, lr, scheduler):
    """Default ``AdamW(lr=lr)`` over the trainable parameters; ``scheduler`` may be ``optimizer -> scheduler``."""
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if scheduler is not None and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
    return optimizer, scheduler


def _require_loss(loss):
    if loss is None:
        raise ValueError("the model returned no loss: pass loss_fn= or step_fn=, "
                         "or put 'labels' in the batch of a Hugging Face model.")


def _optimizer_step(optimizer, scheduler, scaler, model, max_grad_norm):
    """Unscale and clip, step, zero the gradients; step the scheduler only when the optimizer
    really stepped (a GradScaler skips the steps whose gradients overflowed)."""
    if max_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    stepped = True
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()  # (reads the GPU; scaler.step does so anyway)
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scale shrinks exactly when the step was skipped
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None and stepped:
        scheduler.step()


class _LossLog:
    """An epoch's step losses, read from the device in groups (each read waits for the GPU), checked
    for NaN/inf by all processes together, and their sample-weighted mean."""

    def __init__(self, previous, partial=None, bar=None):
        partial = partial or {}
        self.losses = list(partial.get("losses", []))
        self.weighted, self.n = partial.get("weighted", 0.0), partial.get("n", 0)
        self.previous, self.bar, self.pending, self.sizes = previous, bar, [], []

    def add(self, loss, n):
        self.pending.append(loss.detach().float())
        self.sizes.append(n)

    def flush(self, epoch, optimizer, device, world, want_save=False) -> bool:
        """Read the pending losses; stop every process if any saw a NaN/inf. Returns whether any
        process asked to save (so that all save together)."""
        losses = torch.stack(self.pending)
        flags = torch.stack([(~torch.isfinite(losses)).any().float(), torch.tensor(float(want_save), device=device)])
        bad, save, *values = torch.cat([distributed.any_true(flags, world), losses]).tolist()  # one read
        if bad:
            raise _non_finite(values, len(self.losses), epoch, self.previous + self.losses, optimizer)
        self.losses += values
        self.weighted += sum(v * n for v, n in zip(values, self.sizes))
        self.n += sum(self.sizes)
        self.pending, self.sizes = [], []
        if self.bar is not None:
            self.bar.update(len(values))
            self.bar.set_postfix(loss=f"{sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}")
        return save

    def partial(self) -> dict:
        return {"losses": list(self.losses), "weighted": self.weighted, "n": self.n}

    def mean(self, device, world) -> float:
        """The epoch's training loss, weighted by batch size like the validation loss."""
        if world == 1:
            return self.weighted / self.n if self.n else math.nan
        t = distributed.all_sum(torch.tensor([self.weighted, self.n], dtype=torch.float64, device=device), world)
        return float(t[0] / t[1])


def _non_finite(values, first, epoch, previous, optimizer) -> NonFiniteLossError:
    bad = [j for j, v in enumerate(values) if not math.isfinite(v)]
    if not bad:
        return NonFiniteLossError(f"The loss became NaN or infinite in another process at epoch {epoch + 1}; "
                                  "all processes stopped. Its message says where and what to try.")
    j = bad[0]
    finite = [p for p in previous + values[:j] if math.isfinite(p)]
    last = f"{finite[-1]:.4g}" if finite else "none yet"
    return NonFiniteLossError(
        f"The loss became {values[j]} at epoch {epoch + 1}, step {first + j + 1} of that epoch "
        f"(last finite loss: {last}). Training stopped; the last checkpoint, if any, is intact.\n"
        f"Things to try: a lower learning rate (now {optimizer.param_groups[0]['lr']:.3g}), "
        "gradient clipping (max_grad_norm=1.0), checking the inputs for NaN/inf, "
        "precision='bf16' or 'fp32' instead of fp16, and a loss computed from logits "
        "(F.cross_entropy) rather than log(softmax(...)).")


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


def _progress_bar(show, start, epochs, n_batches):
    if not show or start >= epochs:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=(epochs - start) * n_batches, desc=f"epoch {start + 1}/{epochs}", unit="batch")


def _show(bar, live, history, epoch, epochs):
    if bar is not None:
        bar.set_description(f"epoch {min(epoch + 2, epochs)}/{epochs}")
        bar.set_postfix({k: f"{v:.4g}" for k, v in history.last.items() if k.startswith(("train", "val"))})
    if live is not None:
        live.update(history)
