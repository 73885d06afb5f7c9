"""``python -m ptcourse selftest``: train a tiny model through every path this machine offers.

For a TA before class (a lab GPU, a Colab runtime) and for CI on the CPU. Each row trains a small
MLP on synthetic data with ``ptcourse.fit`` and checks, from inside the run, that the feature it
names is really at work (a row whose feature is off fails even when the model still learns):

* fp32, bf16 and fp16, each with gradient clipping, accumulation and an LR schedule: autocast is on
  with the requested dtype inside the forward (off for fp32); with fp16 the loss is scaled (a
  GradScaler); when the optimizer steps, the gradients are the unscaled ones clipped to
  ``max_grad_norm``; steps come only at the end of accumulation windows; the scheduler has stepped
  once per optimizer step. bf16 runs where ``fit`` would choose it (``runtime.best_precision``);
* fp16 with an overflowing gradient injected at one known step: that step is skipped by the
  optimizer and by the scheduler, and the scale backs off;
* a channels-last convolution (chapters 02 and 04 use that memory format);
* checkpoint, kill (SIGKILL at a random step, mid-epoch) and resume: the same weights and step
  losses as an uninterrupted run (bit for bit on the CPU);
* a checkpoint written by two processes (DDP, gloo), killed mid-epoch, resumed by one process on
  this device: it resumes from the saved weights and position and finishes;
* DDP through ``torchrun``: NCCL over every visible GPU when there are two or more, else two CPU
  processes over gloo; the ranks must agree and match one process trained on the same global
  batch. With one GPU the NCCL row says that NCCL was not tested.

It prints a pass/fail table headed by the device's name, the total time, and exits non-zero if
anything failed. On a 2-core CPU it uses about 50 s of CPU time (longer in wall time when the
machine is busy).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS, BATCH, ACCUM, MAX_NORM = 3, 16, 2, 0.25
GLOBAL_BATCH = 32           # the DDP rows: split over the processes, compared with one process
# Seconds the whole selftest takes on a T4-class GPU (Colab's); None until a run there is measured.
T4_SECONDS = None
# How a check starts its worker processes: Python's arguments before ``--worker`` (``torchrun`` gets
# the same). The tests put a script there that breaks one feature in the workers first.
WORKER = ["-m", "ptcourse.tools.selftest"]


def _data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 2.5
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, 16, generator=g), y)


def _model(dropout=0.1):
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 4))


def _loaders():
    train = DataLoader(_data(0), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(_data(1, 128), batch_size=64)


def _flat(model_or_state):
    tensors = model_or_state.values() if isinstance(model_or_state, dict) else model_or_state.parameters()
    return torch.cat([p.detach().float().cpu().flatten() for p in tensors])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        n = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(device)} ({n} GPU{'s' if n > 1 else ''} visible)"
    if device.type == "mps":
        return "Apple GPU (mps)"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- watching a run
class _Probe:
    """Watches one ``fit`` run from inside the model and the optimizer.

    * autocast: in the first layer's forward, whether autocast is on and the dtype of that
      layer's output (a matmul's output has the dtype autocast computed it in);
    * the loss scale: ``fit`` runs backward on ``scale * loss / window``, so the gradient that
      reaches the loss is ``scale / window``; the scale is 1 without a GradScaler;
    * the gradients when the optimizer steps: their total norm must be that of the accumulated,
      unscaled gradients clipped to ``max_norm``. Clipped before unscaling they end ``scale``
      times too small, not clipped they exceed ``max_norm``;
    * accumulation and the schedule: each optimizer step ends an accumulation window, and the
      scheduler has stepped once for every earlier optimizer step.

    Use ``loss_fn`` as the run's loss function. Problems are collected in ``errors``.
    """

    def __init__(self, model, optimizer, scheduler, device, n_batches, accum, max_norm=None):
        self.device_type, self.scheduler = device.type, scheduler
        self.n, self.accum, self.max_norm = n_batches, accum, max_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.micro, self.steps, self.clipped = 0, 0, 0     # training micro-batches, optimizer steps
        self.autocast, self.scales, self.stepped, self.errors = set(), [], set(), []
        self.sq = {}                                      # parameter -> squared norm of its gradient
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        first.register_forward_hook(self._forward)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulated)
        optimizer.register_step_pre_hook(self._step)
        optimizer.register_step_post_hook(self._stepped)

    def window(self) -> int:
        """The number (0, 1, ...) of the accumulation window the current micro-batch belongs to."""
        i = self.micro - 1
        per_epoch = math.ceil(self.n / self.accum)
        return i // self.n * per_epoch + i % self.n // self.accum

    def _window_size(self, micro) -> int:
        i = (micro - 1) % self.n
        return min(self.accum, self.n - i // self.accum * self.accum)   # (fit's rule: the last may be short)

    def _ends_window(self, micro) -> bool:
        i = (micro - 1) % self.n
        return (i + 1) % self.accum == 0 or i + 1 == self.n

    def loss_fn(self, logits, targets):
        loss = nn.functional.cross_entropy(logits, targets)
        if torch.is_grad_enabled():
            self.micro += 1
            size = self._window_size(self.micro)
            loss.register_hook(lambda g: self.scales.append(float(g) * size))
        return loss

    def _forward(self, module, args, out):
        if torch.is_grad_enabled():
            self.autocast.add((torch.is_autocast_enabled(self.device_type), out.dtype))

    def _accumulated(self, p):
        self.sq[p] = p.grad.detach().double().pow(2).sum()

    def _step(self, optimizer, args, kwargs):
        k = self.steps + 1
        if not self._ends_window(self.micro):
            self.errors.append(f"optimizer step {k} came after micro-batch {(self.micro - 1) % self.n + 1} of "
                               f"{self.n}, inside an accumulation window of {self.accum}")
        if self.scheduler is not None and self.scheduler.last_epoch != self.steps:
            self.errors.append(f"before optimizer step {k} the scheduler had stepped "
                               f"{self.scheduler.last_epoch} times, not {self.steps}")
        scale = self.scales[-1]
        raw = math.sqrt(sum(float(v) for v in self.sq.values())) / scale        # unscaled, not clipped
        expected = raw * min(1.0, self.max_norm / (raw + 1e-6)) if self.max_norm else raw   # (clip_grad_norm_'s eps)
        now = math.sqrt(sum(float(p.grad.detach().double().pow(2).sum()) for p in self.params if p.grad is not None))
        if abs(now - expected) > 1e-3 * expected + 1e-12:
            self.errors.append(f"at optimizer step {k} the gradient norm was {now:.4g}; unscaled and clipped "
                               f"to {self.max_norm} it is {expected:.4g} (loss scale {scale:g})")
        self.clipped += bool(self.max_norm) and raw > self.max_norm

    def _stepped(self, optimizer, args, kwargs):
        self.steps += 1
        self.stepped.add(self.window())

    def windows(self) -> int:
        """Accumulation windows seen so far (optimizer steps attempted)."""
        return self.window() + 1 if self.micro else 0

    def skipped(self) -> list[int]:
        return [w for w in range(self.windows()) if w not in self.stepped]

    def raise_errors(self):
        if self.errors:
            more = f" (and {len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
            raise AssertionError("; ".join(self.errors[:3]) + more)


# ----------------------------------------------------------------------------- the checks
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _precision_run(precision, device, max_norm=MAX_NORM, inject=None):
    """Train the MLP with ``precision``, clipping, accumulation and a linear schedule, watched by
    a :class:`_Probe`. ``inject(model, probe)`` may register more hooks on the model first."""
    import ptcourse
    ptcourse.seed_everything(0)
    model, (train, val) = _model(), _loaders()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.2, total_iters=20)
    probe = _Probe(model, opt, sched, device, len(train), ACCUM, max_norm)
    if inject is not None:
        inject(model, probe)
    h = ptcourse.fit(model, train, epochs=EPOCHS, optimizer=opt, scheduler=sched, grad_accum=ACCUM,
                     max_grad_norm=max_norm, precision=precision, loss_fn=probe.loss_fn, val_loader=val,
                     metrics={"acc": ptcourse.accuracy}, device=device, progress=False)
    return h, probe, sched


def _autocast_words(on, dtype):
    return f"autocast {'on' if on else 'off'}, matmul in {str(dtype).removeprefix('torch.')}"


def check_precision(precision, device):
    """Train with ``precision``, clipping, accumulation 2 and a linear schedule: it must learn, and the
    probe must see autocast, the GradScaler (fp16), unscale-then-clip, the accumulation windows and
    a schedule that follows the optimizer's real steps."""
    h, probe, sched = _precision_run(precision, device)
    want = (precision != "fp32", _DTYPES[precision])
    if probe.autocast != {want}:
        seen = "; ".join(_autocast_words(*s) for s in sorted(probe.autocast, key=str))
        raise AssertionError(f"inside the forward: {seen}; {precision} means {_autocast_words(*want)}")
    if precision == "fp16" and min(probe.scales) <= 1:
        raise AssertionError("fp16 without a GradScaler: the loss reached backward unscaled "
                             f"(scale {min(probe.scales):g})")
    probe.raise_errors()
    windows, skipped = probe.windows(), probe.skipped()
    assert windows == EPOCHS * math.ceil(len(_loaders()[0]) / ACCUM), f"{windows} accumulation windows"
    assert sched.last_epoch == probe.steps, f"scheduler stepped {sched.last_epoch}x, optimizer {probe.steps}x"
    assert len(skipped) <= 5, f"{len(skipped)} of {windows} steps skipped (GradScaler overflow)"
    assert probe.clipped > 0, f"the gradient norm never exceeded max_grad_norm={MAX_NORM}: clipping went untested"
    assert h.last["val_acc"] > 0.9, f"val_acc {h.last['val_acc']:.3f} (should be > 0.9)"
    scale = f", loss scale {probe.scales[-1]:g}" if precision == "fp16" else ""
    return (f"val_acc {h.last['val_acc']:.3f}, {probe.steps}/{windows} steps ({len(skipped)} skipped), "
            f"clipped {probe.clipped}x{scale}")


def check_skipped_step(device, at=3):
    """fp16: an inf gradient injected in accumulation window ``at``. The GradScaler must skip that
    optimizer step, the scheduler must not step for it (it has stepped once per real step at every
    step), the scale must back off, and training must go on."""
    def inject(model, probe):
        model[0].weight.register_hook(lambda g: g * float("inf") if probe.window() == at else g)
    h, probe, sched = _precision_run("fp16", device, inject=inject)
    assert at not in probe.stepped, f"the optimizer stepped in window {at}, whose gradient was inf"
    sched_errors = [e for e in probe.errors if "scheduler" in e]
    assert not sched_errors, sched_errors[0]
    assert sched.last_epoch == probe.steps, f"scheduler stepped {sched.last_epoch}x, optimizer {probe.steps}x"
    per_window = [probe.scales[i] for i in range(0, len(probe.scales), ACCUM)]   # (full windows: 16 batches)
    assert per_window[at + 1] < per_window[at], \
        f"the loss scale did not back off after the overflow ({per_window[at]:g} -> {per_window[at + 1]:g})"
    assert max(probe.stepped) > at and math.isfinite(h.last["train_loss"]), "training did not go on"
    return f"step {at + 1} skipped, scheduler {sched.last_epoch} = optimizer {probe.steps} steps, " \
           f"scale {per_window[at]:g} -> {per_window[at + 1]:g}"


def check_channels_last(device):
    import ptcourse
    ptcourse.seed_everything(0)
    x, y = _data(0).tensors
    images = x.view(-1, 1, 4, 4).repeat(1, 3, 2, 2)  # 3 x 8 x 8 "images"
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 64, 4))
    net = net.to(memory_format=torch.channels_last)
    loader = DataLoader(TensorDataset(images, y), batch_size=BATCH, shuffle=True)

    def step(model, batch):
        return nn.functional.cross_entropy(model(batch[0].contiguous(memory_format=torch.channels_last)), batch[1])
    h = ptcourse.fit(net, loader, epochs=2, step_fn=step, lr=1e-2, device=device, progress=False)
    assert h["train_loss"][-1] < h["train_loss"][0], f"loss {h['train_loss']}"
    return f"loss {h['train_loss'][0]:.3f} -> {h['train_loss'][-1]:.3f}"


def _run(args, env=None, timeout=300):
    env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(n, *args, env=None):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                 *WORKER, "--worker", *args], env=env, timeout=600)


_ON_CPU = {"CUDA_VISIBLE_DEVICES": "", "PTCOURSE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}  # gloo workers


def _why_failed(run) -> str:
    """What a failed subprocess said about why: the first Python traceback in its stderr (under
    ``torchrun``, the worker that failed first; the launcher's own traceback and its summary come
    after it) and the last lines (torchrun's "Root Cause" summary)."""
    err = run.stderr
    first = err.find("Traceback (most recent call last)")
    head = err[first:first + 2500] if first >= 0 else ""
    return f"exit status {run.returncode}\n{head}\n...\n{err[-800:]}" if head else \
        f"exit status {run.returncode}\n{run.stdout[-800:]}{err[-1500:]}"


def check_resume(device, folder: Path):
    """A run killed (SIGKILL) at a random mid-epoch step, resumed from its checkpoint, against an
    uninterrupted run in the same process as the resume: the same weights and step losses (bit
    for bit on the CPU; within float tolerance on a GPU)."""
    total = EPOCHS * len(_loaders()[0])
    kill_at = random.Random().randrange(3, total)
    me = [sys.executable, *WORKER, "--worker", "resume", str(folder), str(device)]
    killed = _run(me + ["--kill-at", str(kill_at)])
    assert killed.returncode == -signal.SIGKILL, \
        f"the run to kill did not die of SIGKILL: {_why_failed(killed)}"
    resumed = _run(me)
    assert resumed.returncode == 0, _why_failed(resumed)
    out = torch.load(folder / "resume.pt", weights_only=True)
    where = f"killed at step {kill_at}/{total}"
    assert len(out["steps"]) == len(out["ref_steps"]) == total, \
        f"{where}: {len(out['steps'])} step losses after the resume, {len(out['ref_steps'])} without, of {total}"
    diff = (out["resumed"] - out["reference"]).abs().max().item()
    loss_diff = (out["steps"] - out["ref_steps"]).abs().max().item()
    exact = diff == 0 and loss_diff == 0
    if device.type == "cpu":
        assert exact, f"{where}: largest difference {diff:.3g} in the weights, {loss_diff:.3g} in the step losses"
    else:
        assert diff < 1e-5 and loss_diff < 1e-4, \
            f"{where}: largest difference {diff:.3g} in the weights, {loss_diff:.3g} in the step losses"
    return f"{where}, resumed: weights and {total} step losses " + \
        ("bit-identical" if exact else f"within {max(diff, loss_diff):.2g}")


def check_resume_other_world(device, folder: Path):
    """Two gloo processes (DDP) train with a checkpoint every step and are killed mid-epoch; one
    process on ``device`` resumes from that checkpoint. Equality with an uninterrupted run is not
    expected (the batches are split differently); checked: it resumes (not restarts) from the saved
    position, starts from the saved weights bit for bit, keeps the finished epochs' History, and
    finishes all epochs with finite losses and a model that still classifies well."""
    import ptcourse
    from ptcourse import checkpoint
    per_rank = len(_loaders()[0]) // 2
    kill_at = per_rank + 5             # rank 0's 5th micro-batch of epoch 2: saved after batch 4
    run = _torchrun(2, "resume-world", str(folder), "--kill-at", str(kill_at), env=_ON_CPU)
    assert run.returncode != 0, "the two processes were not killed"
    assert (folder / "ckpt" / "last.pt").exists(), f"no checkpoint was written: {_why_failed(run)}"
    state = checkpoint.load(folder / "ckpt" / "last.pt")
    assert len(state["rng"]) == 2 and state["batch"] > 0, \
        f"expected a mid-epoch checkpoint of 2 processes, got {len(state['rng'])} at batch {state['batch']}"
    ptcourse.seed_everything(123)      # a different start: the checkpoint must decide
    model, (train, val) = _model(), _loaders()
    start = {}

    def first_training_forward(module, args):
        if module.training and "params" not in start:
            start["params"] = _flat(module)
    model.register_forward_pre_hook(first_training_forward)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        h = ptcourse.fit(model, train, epochs=EPOCHS, lr=1e-2, grad_accum=ACCUM, val_loader=val,
                         metrics={"acc": ptcourse.accuracy}, checkpoint_dir=folder / "ckpt", save_every=1,
                         device=device, progress=False)
    where = f"in epoch {state['epoch'] + 1} after batch {state['batch']}"
    assert f"Resumed from {folder / 'ckpt' / 'last.pt'} {where}" in printed.getvalue(), \
        f"did not resume {where}: printed {printed.getvalue()!r}"
    assert torch.equal(start["params"], _flat(state["model"])), "training did not start from the checkpoint's weights"
    done = state["history"]["epochs"]
    assert [r["train_loss"] for r in h.epochs[:len(done)]] == [r["train_loss"] for r in done], \
        "the History of the epochs finished before the kill was not kept"
    assert len(h) == EPOCHS and all(math.isfinite(v) for v in h.steps), f"{len(h)} epochs, steps {h.steps[-5:]}"
    assert h.last["val_acc"] > 0.9, f"val_acc {h.last['val_acc']:.3f} (should be > 0.9)"
    return f"2 processes killed {where}; 1 process on {device} resumed there from the saved weights, " \
           f"finished {EPOCHS} epochs, val_acc {h.last['val_acc']:.3f}"


def _ddp_train(folder, per_rank_batch, device=None, world=1):
    """The DDP rows' run: no shuffling and no dropout, so that ``world`` processes with batches of
    ``per_rank_batch`` and one process with batches of ``world * per_rank_batch`` compute the same
    thing. fp32 and SGD, so that both agree to float rounding."""
    import ptcourse
    ptcourse.seed_everything(0)
    global_batch = world * per_rank_batch
    n = global_batch * (256 // global_batch)       # every process gets whole, equal batches
    model = _model(dropout=0.0)
    h = ptcourse.fit(model, DataLoader(_data(0, n), batch_size=per_rank_batch), epochs=EPOCHS,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), precision="fp32",
                     val_loader=DataLoader(_data(1, 128), batch_size=64), metrics={"acc": ptcourse.accuracy},
                     checkpoint_dir=folder, save_every=3, device=device, progress=False)
    return model, h


def check_ddp(device, folder: Path, backend):
    """``torchrun``: NCCL over every visible GPU, or gloo over two CPU processes. The processes must
    see the world size asked for and the backend named, end with identical weights, and match one
    process trained on the same global batch (on the GPU, or on the CPU for gloo)."""
    if backend == "nccl":
        n, env, single = torch.cuda.device_count(), {}, device
    else:
        n, env, single = 2, _ON_CPU, torch.device("cpu")
    per_rank = max(1, GLOBAL_BATCH // n)
    run = _torchrun(n, "ddp", str(folder), str(per_rank), env=env)
    assert run.returncode == 0, _why_failed(run)
    outs = [torch.load(folder / f"ddp.rank{r}", weights_only=True) for r in range(n)]
    worlds, backends = {o["world"] for o in outs}, {o["backend"] for o in outs}
    assert worlds == {n}, f"asked for {n} processes, they saw world sizes {sorted(worlds)}"
    assert backends == {backend}, f"the processes used {sorted(backends)}, not {backend}"
    assert all(torch.equal(o["params"], outs[0]["params"]) for o in outs), "the processes' weights differ"
    assert len({o["val_acc"] for o in outs}) == 1, "the processes report different validation accuracies"
    one, h = _ddp_train(None, per_rank * n, single)
    diff = (outs[0]["params"] - _flat(one)).abs().max().item()
    tol = 1e-5 if single.type == "cpu" else 1e-4
    assert diff <= tol, (f"{n} processes with batches of {per_rank} and 1 process with batches of {per_rank * n} "
                         f"end {diff:.3g} apart (more than {tol:g})")
    assert outs[0]["val_acc"] > 0.9, f"val_acc {outs[0]['val_acc']:.3f}"
    return (f"{n} processes ({backend}, {outs[0]['device']}), batch {per_rank} each = 1 process with batch "
            f"{per_rank * n} (max diff {diff:.1g}), val_acc {outs[0]['val_acc']:.3f}, checkpoint saved")


# ----------------------------------------------------------------------------- subprocess workers
def _worker_resume(folder, device, kill_at):
    import ptcourse
    torch.set_num_threads(1)
    device = torch.device(device)
    calls = {"n": 0}

    def loss_fn(logits, y):
        calls["n"] += torch.is_grad_enabled()
        if kill_at and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, as when Colab disconnects
        return nn.functional.cross_entropy(logits, y)

    def train(ckpt, seed):
        ptcourse.seed_everything(seed)
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        h = ptcourse.fit(model, _loaders()[0], epochs=EPOCHS, optimizer=opt, loss_fn=loss_fn, grad_accum=ACCUM,
                         scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, 0.5), checkpoint_dir=ckpt, save_every=1,
                         device=device, progress=False)
        return model, h
    if kill_at:
        train(folder / "ckpt", 0)
        return
    model, h = train(folder / "ckpt", 123)  # resumes: a different seed must not matter
    calls["n"] = 0
    ref, ref_h = train(None, 0)
    torch.save({"resumed": _flat(model), "reference": _flat(ref), "steps": torch.tensor(h.steps, dtype=torch.float64),
                "ref_steps": torch.tensor(ref_h.steps, dtype=torch.float64)}, folder / "resume.pt")


def _worker_resume_world(folder, kill_at):
    """One of two DDP processes that checkpoint every step; rank 0 dies at micro-batch ``kill_at``."""
    import ptcourse
    rank = int(os.environ.get("RANK", "0"))
    calls = {"n": 0}

    def loss_fn(logits, y):
        calls["n"] += torch.is_grad_enabled()
        if rank == 0 and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(logits, y)
    ptcourse.seed_everything(0)
    model, (train, val) = _model(), _loaders()
    ptcourse.fit(model, train, epochs=EPOCHS, lr=1e-2, grad_accum=ACCUM, loss_fn=loss_fn, val_loader=val,
                 metrics={"acc": ptcourse.accuracy}, checkpoint_dir=folder / "ckpt", save_every=1, progress=False)


def _worker_ddp(folder, per_rank_batch):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, h = _ddp_train(folder / "ckpt", per_rank_batch, world=world)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"world": dist.get_world_size() if dist.is_initialized() else 1, "params": _flat(model),
                "val_acc": h.last["val_acc"], "backend": dist.get_backend() if dist.is_initialized() else "none",
                "device": str(next(model.parameters()).device)}, folder / f"ddp.rank{rank}")


# ----------------------------------------------------------------------------- the table
def _mkdir(tmp, name) -> Path:
    (Path(tmp) / name).mkdir()
    return Path(tmp) / name


def plan(device: torch.device, tmp, ddp: bool = True) -> list[tuple[str, str, object]]:
    """The rows for ``device``: ``(key, title, check)`` where ``check`` is a function to call, or
    the reason the row is skipped here. Subprocess rows get their own folder under ``tmp``."""
    from ptcourse import runtime
    cuda, gpus = device.type == "cuda", (torch.cuda.device_count() if device.type == "cuda" else 0)
    if cuda:   # bf16 where fit would choose it (a T4 reports bf16 support, but only emulates it)
        fits_choice = runtime.best_precision(device)
        bf16 = True if fits_choice == "bf16" else \
            f"skipped: fit uses {fits_choice} on this GPU (compute capability < 8)"
    else:
        bf16 = True if device.type == "cpu" else "bf16 autocast not supported here"
    fp16 = True if device.type in ("cpu", "cuda") else "no fp16 autocast here"
    no_ddp = "skipped (--no-ddp)"
    if not ddp:
        gloo = nccl = no_ddp
    elif gpus >= 2:
        gloo, nccl = f"skipped: NCCL tested over the {gpus} GPUs instead", True
    else:
        gloo = True
        nccl = ("skipped: 1 GPU visible, NCCL not tested (needs 2+); only gloo on the CPU was tested" if cuda
                else "skipped: no CUDA GPU, NCCL not tested; only gloo on the CPU was tested")

    def when(ok, check):
        return check if ok is True else ok
    return [
        ("fp32", "fp32 + clip + accum + schedule", lambda: check_precision("fp32", device)),
        ("bf16", "bf16 autocast + clip + accum + schedule", when(bf16, lambda: check_precision("bf16", device))),
        ("fp16", "fp16 autocast + GradScaler + clip + accum + schedule",
         when(fp16, lambda: check_precision("fp16", device))),
        ("fp16-skip", "fp16 overflow: step skipped, schedule too", when(fp16, lambda: check_skipped_step(device))),
        ("channels-last", "channels-last convolution", lambda: check_channels_last(device)),
        ("resume", "checkpoint, kill at a random step, resume", lambda: check_resume(device, _mkdir(tmp, "resume"))),
        ("resume-world", "resume a 2-process checkpoint in 1 process",
         when(ddp or no_ddp, lambda: check_resume_other_world(device, _mkdir(tmp, "resume-world")))),
        ("ddp-gloo", "DDP (torchrun), gloo: 2 CPU processes = 1",
         when(gloo, lambda: check_ddp(device, _mkdir(tmp, "ddp-gloo"), "gloo"))),
        ("ddp-nccl", f"DDP (torchrun), NCCL: {gpus if gpus >= 2 else 'all'} GPUs = 1",
         when(nccl, lambda: check_ddp(device, _mkdir(tmp, "ddp-nccl"), "nccl"))),
    ]


def run_check(check) -> tuple[str, float, str, str | None]:
    """``(status, seconds, detail, whole reason if it failed)`` of one planned row."""
    if isinstance(check, str):
        return "skip", 0.0, check, None
    t0 = time.perf_counter()
    try:
        detail = check()
        return "pass", time.perf_counter() - t0, detail, None
    except Exception as err:  # noqa: BLE001 - a failed check is a row of the table
        why = f"{type(err).__name__}: {err}".strip()
        if not isinstance(err, AssertionError):
            why += "\n" + traceback.format_exc(limit=-2).strip()
        return "FAIL", time.perf_counter() - t0, why.replace("\n", " | ")[:600], why


def selftest(ddp: bool = True, out=print, device=None) -> bool:
    """Run every check this machine supports and print the table; True if all passed."""
    import ptcourse
    t_start = time.perf_counter()
    device = torch.device(device) if device is not None else ptcourse.runtime.best_device()
    out(f"ptcourse {ptcourse.__version__} selftest · {device_name(device)} · device {device} · "
        f"torch {torch.__version__} · python {platform.python_version()}")
    rows, reasons = [], []
    with tempfile.TemporaryDirectory(prefix="ptcourse-selftest-") as tmp:
        for key, title, check in plan(device, tmp, ddp):
            t0 = time.perf_counter()
            status, _, detail, why = run_check(check)
            rows.append((title, status, time.perf_counter() - t0, detail))
            if why is not None:
                reasons.append((title, why))
    width = max(len(r[0]) for r in rows)
    out(f"{'check':{width}s}  result  {'time':>6s}  detail")
    for name, status, secs, detail in rows:
        out(f"{name:{width}s}  {status:6s}  {secs:5.1f}s  {detail}")
    for name, why in reasons:     # the table's row is cut short; the whole reason, to report it
        out(f"\n{name} failed:\n  " + why.replace("\n", "\n  "))
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    out(f"{len(failed)} of {len(rows)} checks failed: {', '.join(failed)}" if failed else
        f"all {sum(r[1] == 'pass' for r in rows)} checks passed ({sum(r[1] == 'skip' for r in rows)} skipped)")
    total = f"total time {time.perf_counter() - t_start:.0f} s"
    if device.type == "cuda":
        total += "; on a T4-class GPU: " + (f"about {T4_SECONDS:.0f} s" if T4_SECONDS else "not yet measured on a T4")
    out(total)
    return not failed


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m ptcourse selftest", description=__doc__.split("\n")[0])
    p.add_argument("--no-ddp", action="store_true", help="skip the multi-process checks")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, folder, *rest = args.worker
        if kind == "resume":
            _worker_resume(Path(folder), rest[0], args.kill_at)
        elif kind == "resume-world":
            _worker_resume_world(Path(folder), args.kill_at)
        else:
            _worker_ddp(Path(folder), int(rest[0]))
        return 0
    return 0 if selftest(ddp=not args.no_ddp) else 1


if __name__ == "__main__":
    sys.exit(main())
