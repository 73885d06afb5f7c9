"""``fit``: one explicit, readable training loop for every chapter.

The heart of it is the loop you would write by hand::

    for batch in train_loader:
        loss = loss_fn(model(x), y)        # or step_fn(model, batch)
        loss.backward()
        optimizer.step(); optimizer.zero_grad()

plus what real training needs: the device, mixed precision on CUDA, gradient accumulation and
clipping, a per-step LR schedule, validation metrics, a progress bar, a clear stop on a NaN loss.
What is not the loop lives beside it: several processes (DDP) in ``distributed.py``, checkpoints
that resume exactly after a crash or a Colab disconnect in ``checkpoint.py``, metrics such as
``accuracy`` in ``metrics.py``, the live plot in ``plots.py``.

Where each runs: ``fit`` trains on ``device=`` or else on the best device (the GPU on Colab), and
moves the model there; ``evaluate`` and ``predict`` run on ``device=`` if given (moving the model
there), else where the model already is (see :func:`model_device`).

Example:
    >>> history = fit(model, train_loader, epochs=3, lr=1e-3, val_loader=val_loader,
    ...               metrics={"acc": ptcourse.accuracy}, checkpoint_dir="checkpoints/cnn")
    >>> history.best("val_acc")["epoch"]
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings

import torch
import torch.nn.functional as F

from . import distributed
from .checkpoint import Checkpointer
from .history import History
from .runtime import best_device, best_precision


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class OutOfMemoryAdvice(RuntimeError):
    """The device ran out of memory; the message says what to change."""


# ----------------------------------------------------------------------------- devices and batches
def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter, or of its first buffer; a module
    with neither (e.g. ``nn.ReLU()``) holds nothing to move and runs anywhere: the best device.

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else best_device()


def _place(model, device) -> torch.device:
    """The device ``evaluate`` and ``predict`` run on: ``device`` (the model is moved there) or else
    the model's own, so that a model ``fit`` never saw (a teacher loaded on the CPU) is not left
    behind while its batches go to the GPU. Running on the CPU when a GPU is there is correct but
    slow, so it comes with a warning."""
    if device is None:
        device, best = model_device(model), best_device()
        if device.type == "cpu" and best.type != "cpu":
            warnings.warn(f"the model's weights are on the CPU, so it runs there, though {best} is available: "
                          "move it with model.to(device), or pass device=.", stacklevel=3)
        return device
    device = torch.device(device)
    model.to(device)
    return device


def to_device(batch, device):
    """Move every tensor in a (nested) tuple / list / dict to ``device``.

    Only a copy from the CPU to a CUDA GPU is asynchronous (``non_blocking``): CUDA has taken the
    data, pinned or not, before the call returns. Elsewhere it is unsafe: from pageable memory to
    Apple's MPS it can deliver corrupted data, and from a GPU to the CPU it returns before the
    values have arrived.
    """
    device = torch.device(device)
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=device.type == "cuda" and batch.device.type == "cpu")
    if _is_dict(batch):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _is_dict(batch) -> bool:
    return isinstance(batch, dict) or hasattr(batch, "keys")


def _targets(batch):
    """The targets of a batch: ``labels`` of a dict, the second item of a tuple or list, else None."""
    if _is_dict(batch):
        return batch.get("labels")
    return batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None


def _batch_size(batch) -> int:
    if _is_dict(batch):
        first = batch.get("labels") if batch.get("labels") is not None else next(iter(batch.values()))
        return len(first)
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


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


def _no_loss(logits, targets):
    """``loss_fn`` for :func:`forward` when no loss is wanted (``predict``, metrics after ``step_fn``)."""
    return None


def forward(model, batch, loss_fn=None, *, cpu_targets=None):
    """Run a batch through the model: returns ``(logits, targets, loss or None)``.

    A batch is ``(inputs, targets, ...)``, ``(inputs,)``, a tensor of inputs, or a Hugging Face
    dict (``labels`` are its targets). The loss is ``loss_fn(logits, targets)``; without
    ``loss_fn``, cross-entropy, or for a dict batch the model's own loss. ``cpu_targets``: the
    targets before the batch moved to the device, for the label check made before a loss.
    """
    targets = _targets(batch)
    if _is_dict(batch):
        out = model(**batch)
        logits = getattr(out, "logits", out)
    else:
        logits = model(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if loss_fn is _no_loss:
        return logits, targets, None
    _check_labels(logits, targets if cpu_targets is None else cpu_targets)
    if loss_fn is not None:
        return logits, targets, loss_fn(logits, targets)
    if _is_dict(batch):
        return logits, targets, getattr(out, "loss", None)  # the Hugging Face model's own loss
    return logits, targets, F.cross_entropy(logits, targets)


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


# ----------------------------------------------------------------------------- evaluate, predict
@torch.no_grad()
def evaluate(model, loader, metrics=None, *, loss_fn=None, step_fn=None, device=None,
             precision="auto") -> dict:
    """Average loss and metrics of ``model`` over ``loader`` (sample-weighted; reduced over processes).

    With ``step_fn`` the loss is ``step_fn(model, batch)``, the objective ``fit`` trained with
    (e.g. a reconstruction or contrastive loss); metrics then still see ``model(inputs)``.
    Runs on ``device`` if given (the model is moved there), else where the model is (under several
    GPU processes, keep it on this process's GPU, as ``fit`` leaves it: NCCL sums only GPU tensors).

    Example:
        >>> evaluate(model, test_loader, {"acc": accuracy})
        {'loss': 0.31, 'acc': 0.91}
    """
    rank, _, world = distributed.setup(device)
    device = _place(model, device)
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
                    logits, targets, _ = forward(model, batch, _no_loss)
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
    """All outputs (float32, on the CPU) and targets for ``loader``, in order; no loss, so the
    targets may be anything (class labels, regression values, a label per token) or absent (None).
    Runs on ``device`` if given (the model is moved there), else where the model is.

    Example:
        >>> logits, y = predict(model, test_loader)
        >>> (logits.argmax(1) == y).float().mean()
    """
    device = _place(model, device)
    autocast, _, _ = _autocast(device, precision)
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    for batch in loader:
        with autocast():
            logits, targets, _ = forward(model, to_device(batch, device), _no_loss)
        all_logits.append(logits.float().cpu())
        if targets is not None:
            all_targets.append(targets.cpu())
    model.train(was_training)
    return torch.cat(all_logits), (torch.cat(all_targets) if all_targets else None)


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

    Each step's loss: ``loss_fn(logits, targets)`` for ``(inputs, targets)`` batches (default
    cross-entropy; a Hugging Face dict batch uses the model's own loss), or ``step_fn(model, batch)
    -> loss`` for anything else (SimCLR view pairs, a teacher, ...). ``step_fn`` gets your model
    itself, so ``model.encoder(x)`` works; under several processes the whole call runs inside DDP's
    forward, so the gradients are still averaged over the processes (as DDP requires, every
    trainable parameter must get a gradient in each step).

    * ``optimizer``: default ``AdamW(lr=lr)`` over the trainable parameters; ``scheduler``: stepped
      after every optimizer step (or ``optimizer -> scheduler``).
    * ``grad_accum``: micro-batches per optimizer step. ``max_grad_norm``: clip the gradients of the
      parameters the optimizer steps to this norm. After each step every gradient of the model is
      cleared, also those of trainable parameters the optimizer does not hold (freeze them with
      ``requires_grad_(False)`` to save that work).
    * ``val_loader`` and ``metrics`` (``{"acc": accuracy}``): evaluated after every epoch.
    * ``device``: where to train, by default the best device (the GPU on Colab; under several
      processes this process's GPU); the model is moved there and stays there. ``precision``:
      ``auto`` (bf16/fp16 on CUDA), ``fp32``, ``bf16``, ``fp16``.
    * ``checkpoint_dir``: ``last.pt`` there, saved at each epoch's end and every ``save_every``
      (optimizer steps such as ``500``, or ``"10min"``; None: epoch ends only); a later call with
      the same folder resumes exactly where it stopped.
    * ``progress``: a progress bar; ``live_plot``: redraw the History's plot each epoch (Jupyter).

    Example:
        >>> history = fit(model, loader, epochs=2, val_loader=val, metrics={"acc": accuracy})
    """
    _check_arguments(loss_fn, step_fn, grad_accum)
    rank, local_rank, world = distributed.setup(device)
    device = distributed.resolve_device(device, local_rank, world)
    autocast, scaler, precision = _autocast(device, precision)
    model = model.to(device)
    # what each batch goes through: the model, or step_fn(model, batch); in several processes, in DDP
    net = distributed.wrap(model if step_fn is None else _StepFn(model, step_fn), device, world)
    train_loader = distributed.shard_train(train_loader, rank, world)
    optimizer, scheduler = _optimizer_and_scheduler(model, optimizer, lr, scheduler)
    ck = Checkpointer(checkpoint_dir, save_every, model=model, optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler, loader=train_loader, rank=rank, world=world)
    start, history = ck.resume(epochs)
    n_batches, steps = len(train_loader), 0
    bar = _progress_bar(progress and rank == 0, start, epochs, n_batches)
    live = _live_plot(live_plot and rank == 0)
    _zero_grad(model, optimizer)  # a .backward() in an earlier cell must not leak into the first step
    for epoch in range(start, epochs):
        distributed.set_epoch(train_loader, epoch)
        model.train()
        batches, partial = ck.batches(epoch)  # a resumed epoch goes on from where it stopped
        t0, losses = time.perf_counter(), _EpochLosses(partial)
        for i, batch in batches:
            window, steps_now = _accumulation_window(i, grad_accum, n_batches)
            cpu_targets, batch = _targets(batch), to_device(batch, device)
            with (distributed.no_sync(net, skip=not steps_now),  # DDP: average the gradients at the step's end
                  _explain_oom(device, train_loader, grad_accum, precision)):
                with autocast():
                    loss = net(batch) if step_fn else forward(net, batch, loss_fn, cpu_targets=cpu_targets)[2]
                _require_loss(loss)
                (scaler.scale(loss / window) if scaler else loss / window).backward()
            if steps_now:
                steps += 1
                _optimizer_step(optimizer, scheduler, scaler, model, max_grad_norm)
            losses.add(loss, _batch_size(batch))
            # read the losses now and then (each read waits for the GPU): stop on a NaN, maybe save
            if i + 1 == n_batches or (steps_now and (len(losses.unread) >= 10 or ck.due(steps))):
                values, any_non_finite, any_wants_save = _read_and_vote(losses, ck.due_by_time(), device, world)
                if any_non_finite:
                    raise _non_finite(values, epoch, losses, history, optimizer)
                losses.take(values)
                _show_progress(bar, values, losses)
                if (any_wants_save or ck.due(steps)) and i + 1 < n_batches:
                    ck.save(epoch, i + 1, history, losses.record())  # mid-epoch (the epoch's end: below)
        row = {"epoch": epoch + 1, "train_loss": losses.mean(device, world), "lr": optimizer.param_groups[0]["lr"]}
        if val_loader is not None:
            val = evaluate(model, val_loader, metrics, loss_fn=loss_fn, step_fn=step_fn, device=device,
                           precision=precision)
            row.update({f"val_{k}": v for k, v in val.items()})
        history.steps += losses.values
        history.log({**row, "time_s": time.perf_counter() - t0})
        ck.save(epoch + 1, 0, history)
        _show_epoch(bar, live, history, epoch, epochs)
    if bar is not None:
        bar.close()
    return history


# ----------------------------------------------------------------------------- fit's helpers
def _check_arguments(loss_fn, step_fn, grad_accum):
    if (loss_fn is not None) and (step_fn is not None):
        raise ValueError("give loss_fn= or step_fn=, not both.")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, not {grad_accum}.")


class _StepFn(torch.nn.Module):
    """``step_fn(model, batch)`` as a module, so that under several processes DDP can wrap the whole
    step, as Lightning wraps ``training_step``: DDP prepares each step's gradient all-reduce in its
    forward, and a step that called ``model.encoder(x)`` past it would train without averaging the
    gradients over the processes. ``step_fn`` itself gets the model, not the DDP wrapper."""

    def __init__(self, model, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch):
        return self.step_fn(self.model, batch)


def _optimizer_and_scheduler(model, optimizer, lr, scheduler):
    """Default ``AdamW(lr=lr)`` over the trainable parameters; ``scheduler`` may be ``optimizer -> scheduler``."""
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if scheduler is not None and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
    return optimizer, scheduler


def _accumulation_window(i, grad_accum, n_batches) -> tuple[int, bool]:
    """Gradient accumulation: which optimizer step batch ``i`` belongs to. Returns the number of
    batches that step averages over (``grad_accum``, fewer for an epoch's last step when
    ``n_batches`` is not a multiple of it) and whether batch ``i`` is the step's last (then the
    optimizer steps).

    Example:
        >>> [_accumulation_window(i, 3, 7) for i in range(7)]   # windows of 3, 3, 1
        [(3, False), (3, False), (3, True), (3, False), (3, False), (3, True), (1, True)]
    """
    first = i - i % grad_accum
    size = min(grad_accum, n_batches - first)
    return size, i == first + size - 1


def _require_loss(loss):
    if loss is None:
        raise ValueError("the model returned no loss: pass loss_fn= or step_fn=, "
                         "or put 'labels' in the batch of a Hugging Face model.")


def _zero_grad(model, optimizer):
    """Clear every gradient: the model's, including those of trainable parameters the optimizer
    does not hold (they would pile up from step to step), and the optimizer's, including tensors
    outside the model (e.g. a learned temperature)."""
    model.zero_grad(set_to_none=True)
    optimizer.zero_grad(set_to_none=True)


def _optimizer_step(optimizer, scheduler, scaler, model, max_grad_norm):
    """Clip, ``optimizer.step()``, clear the gradients, ``scheduler.step()``.

    Clipping covers the parameters the optimizer steps (its ``param_groups``), unscaled first
    under fp16. The scheduler steps only when the optimizer really stepped (a GradScaler skips the
    steps whose gradients overflowed)."""
    if max_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        stepped_params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(stepped_params, max_grad_norm)
    stepped = True
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()  # (reads the GPU; scaler.step does so anyway)
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scale shrinks exactly when the step was skipped
    _zero_grad(model, optimizer)
    if scheduler is not None and stepped:
        scheduler.step()


class _EpochLosses:
    """The losses of an epoch's steps. Each stays on the device, ``unread``, until ``fit`` reads a
    group of them at once (a read makes the CPU wait for the GPU); ``values`` are those read. Their
    sample-weighted mean is the epoch's training loss. A mid-epoch checkpoint keeps ``record()``."""

    def __init__(self, partial=None):
        partial = partial or {}
        self.values = list(partial.get("losses", []))
        self.weighted, self.n = partial.get("weighted", 0.0), partial.get("n", 0)
        self.unread, self.sizes = [], []

    def add(self, loss, n):
        self.unread.append(loss.detach().float())
        self.sizes.append(n)

    def take(self, values):
        """Record ``values``, the unread losses as read from the device."""
        self.values += values
        self.weighted += sum(v * n for v, n in zip(values, self.sizes))
        self.n += sum(self.sizes)
        self.unread, self.sizes = [], []

    def record(self) -> dict:
        return {"losses": list(self.values), "weighted": self.weighted, "n": self.n}

    def mean(self, device, world) -> float:
        """The epoch's training loss, weighted by batch size like the validation loss."""
        if world == 1:
            return self.weighted / self.n if self.n else math.nan
        t = distributed.all_sum(torch.tensor([self.weighted, self.n], dtype=torch.float64, device=device), world)
        return float(t[0] / t[1])


def _read_and_vote(losses, wants_save, device, world) -> tuple[list, bool, bool]:
    """Read the unread losses from the device together with two votes of all processes, in one
    transfer. Returns the losses, whether any process saw a NaN/inf (all must stop) and whether any
    process wants a checkpoint (its clock says it is time; saving is collective, so all save)."""
    unread = torch.stack(losses.unread)
    votes = torch.stack([(~torch.isfinite(unread)).any().float(), torch.tensor(float(wants_save), device=device)])
    non_finite, save, *values = torch.cat([distributed.any_true(votes, world), unread]).tolist()
    return values, bool(non_finite), bool(save)


def _non_finite(values, epoch, losses, history, optimizer) -> NonFiniteLossError:
    """The error for a NaN/inf among ``values``, the losses just read after ``losses.values``."""
    bad = [j for j, v in enumerate(values) if not math.isfinite(v)]
    if not bad:
        return NonFiniteLossError(f"The loss became NaN or infinite in another process at epoch {epoch + 1}; "
                                  "all processes stopped. Its message says where and what to try.")
    j = bad[0]
    finite = [p for p in history.steps + losses.values + values[:j] if math.isfinite(p)]
    last = f"{finite[-1]:.4g}" if finite else "none yet"
    return NonFiniteLossError(
        f"The loss became {values[j]} at epoch {epoch + 1}, step {len(losses.values) + j + 1} of that epoch "
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


# ----------------------------------------------------------------------------- what fit shows
def _progress_bar(show, start, epochs, n_batches):
    if not show or start >= epochs:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=(epochs - start) * n_batches, desc=f"epoch {start + 1}/{epochs}", unit="batch")


def _live_plot(show):
    if not show:
        return None
    from .plots import LivePlot  # (matplotlib loads only when a live plot is asked for)
    return LivePlot()


def _show_progress(bar, new_values, losses):
    """Advance the bar by the batches just read; show the mean of the epoch's last 50 losses."""
    if bar is not None:
        bar.update(len(new_values))
        recent = losses.values[-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")


def _show_epoch(bar, live, history, epoch, epochs):
    if bar is not None:
        bar.set_description(f"epoch {min(epoch + 2, epochs)}/{epochs}")
        bar.set_postfix({k: f"{v:.4g}" for k, v in history.last.items() if k.startswith(("train", "val"))})
    if live is not None:
        live.update(history)
