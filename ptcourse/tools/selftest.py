"""``python -m ptcourse selftest``: train a tiny model through every path this machine offers.

For a TA before class (a lab GPU, a Colab runtime) and for CI on the CPU. Each row trains a small
MLP on synthetic data with ``ptcourse.fit`` and checks what the course promises there:

* fp32; bf16 autocast and fp16 autocast with a GradScaler, each with gradient clipping,
  accumulation and an LR schedule (scheduler steps == optimizer steps);
* a channels-last convolution (chapters 02 and 04 use that memory format);
* checkpoint, kill (SIGKILL at a random step, mid-epoch) and resume: the same weights as an
  uninterrupted run (bit for bit on the CPU);
* DDP through ``torchrun`` over every visible GPU when there are two or more (NCCL), else two CPU
  processes (gloo); the world size it got is checked, not assumed.

It prints a pass/fail table headed by the device's name and exits non-zero if anything failed.
On a CPU it takes well under a minute.
"""
from __future__ import annotations

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

EPOCHS, BATCH = 3, 16


def _data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 2.5
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, 16, generator=g), y)


def _model():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))


def _loaders():
    train = DataLoader(_data(0), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(_data(1, 128), batch_size=64)


def _flat(model):
    return torch.cat([p.detach().float().cpu().flatten() for p in model.parameters()])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        n = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(device)} ({n} GPU{'s' if n > 1 else ''} visible)"
    if device.type == "mps":
        return "Apple GPU (mps)"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- the checks
def check_precision(precision, device):
    """Train with ``precision``: clipping, accumulation 2 and a linear schedule; it must learn, and
    the scheduler must step exactly as often as the optimizer really did."""
    import ptcourse
    ptcourse.seed_everything(0)
    model, (train, val) = _model(), _loaders()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.2, total_iters=20)
    real = {"steps": 0}
    opt.register_step_post_hook(lambda *a: real.__setitem__("steps", real["steps"] + 1))
    h = ptcourse.fit(model, train, epochs=EPOCHS, optimizer=opt, scheduler=sched, grad_accum=2, max_grad_norm=1.0,
                     precision=precision, val_loader=val, metrics={"acc": ptcourse.accuracy}, device=device,
                     progress=False)
    attempted = EPOCHS * len(train) // 2
    assert sched.last_epoch == real["steps"], f"scheduler stepped {sched.last_epoch}x, optimizer {real['steps']}x"
    assert real["steps"] >= attempted - 5, f"only {real['steps']} of {attempted} steps taken (GradScaler skips)"
    assert h.last["val_acc"] > 0.9, f"val_acc {h.last['val_acc']:.3f} (should be > 0.9)"
    return f"val_acc {h.last['val_acc']:.3f}, loss {h['train_loss'][0]:.3f} -> {h['train_loss'][-1]:.3f}, " \
           f"{real['steps']}/{attempted} steps"


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
    uninterrupted run in the same process as the resume."""
    total = EPOCHS * len(_loaders()[0])
    kill_at = random.Random().randrange(3, total)
    me = [sys.executable, "-m", "ptcourse.tools.selftest", "--worker", "resume", str(folder), str(device)]
    killed = _run(me + ["--kill-at", str(kill_at)])
    assert killed.returncode == -signal.SIGKILL, \
        f"the run to kill did not die of SIGKILL: {_why_failed(killed)}"
    resumed = _run(me)
    assert resumed.returncode == 0, _why_failed(resumed)
    out = torch.load(folder / "resume.pt", weights_only=True)
    diff = (out["resumed"] - out["reference"]).abs().max().item()
    exact = diff == 0 and out["steps_equal"]
    if device.type == "cpu":
        assert exact, (f"killed at step {kill_at}/{total}: largest difference {diff:.3g}, "
                       f"same losses {out['steps_equal']}")
    else:
        assert diff < 1e-5, f"killed at step {kill_at}/{total}: largest difference {diff:.3g}"
    return f"killed at step {kill_at}/{total}, resumed: " + ("bit-identical" if exact else f"max diff {diff:.2g}")


def check_ddp(device, folder: Path):
    """``torchrun`` over all visible GPUs (two or more), else two CPU processes over gloo."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    n, env = (gpus, {}) if gpus >= 2 else (2, {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    run = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                "-m", "ptcourse.tools.selftest", "--worker", "ddp", str(folder)], env=env, timeout=600)
    assert run.returncode == 0, _why_failed(run)
    outs = [torch.load(folder / f"ddp.rank{r}", weights_only=True) for r in range(n)]
    worlds = {o["world"] for o in outs}
    assert worlds == {n}, f"asked for {n} processes, they saw world sizes {sorted(worlds)}"
    assert all(torch.equal(o["params"], outs[0]["params"]) for o in outs), "the processes' weights differ"
    assert len({o["val_acc"] for o in outs}) == 1, "the processes report different validation accuracies"
    assert outs[0]["val_acc"] > 0.9, f"val_acc {outs[0]['val_acc']:.3f}"
    return f"{n} processes ({outs[0]['backend']}, {outs[0]['device']}), val_acc {outs[0]['val_acc']:.3f}, " \
           "weights identical, checkpoint saved"


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
        h = ptcourse.fit(model, _loaders()[0], epochs=EPOCHS, optimizer=opt, loss_fn=loss_fn, grad_accum=2,
                         scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, 0.5), checkpoint_dir=ckpt, save_every=1,
                         device=device, progress=False)
        return model, h
    if kill_at:
        train(folder / "ckpt", 0)
        return
    model, h = train(folder / "ckpt", 123)  # resumes: a different seed must not matter
    calls["n"] = 0
    ref, ref_h = train(None, 0)
    torch.save({"resumed": _flat(model), "reference": _flat(ref), "steps_equal": h.steps == ref_h.steps},
               folder / "resume.pt")


def _worker_ddp(folder):
    import ptcourse
    ptcourse.seed_everything(0)
    model, (train, val) = _model(), _loaders()
    h = ptcourse.fit(model, train, epochs=EPOCHS, lr=1e-2, val_loader=val, metrics={"acc": ptcourse.accuracy},
                     checkpoint_dir=folder / "ckpt", save_every=3, progress=False)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"world": dist.get_world_size() if dist.is_initialized() else 1, "params": _flat(model),
                "val_acc": h.last["val_acc"], "backend": dist.get_backend() if dist.is_initialized() else "none",
                "device": str(next(model.parameters()).device)}, folder / f"ddp.rank{rank}")


# ----------------------------------------------------------------------------- the table
def _mkdir(tmp, name) -> Path:
    (Path(tmp) / name).mkdir()
    return Path(tmp) / name


def selftest(ddp: bool = True, out=print) -> bool:
    """Run every check this machine supports and print the table; True if all passed."""
    import ptcourse
    device = ptcourse.runtime.best_device()
    out(f"ptcourse {ptcourse.__version__} selftest · {device_name(device)} · device {device} · "
        f"torch {torch.__version__} · python {platform.python_version()}")
    bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    rows, reasons = [], []
    with tempfile.TemporaryDirectory(prefix="ptcourse-selftest-") as tmp:
        checks = [
            ("fp32", lambda: check_precision("fp32", device)),
            ("bf16 autocast + clip + accum + schedule",
             (lambda: check_precision("bf16", device)) if bf16 else "bf16 not supported here"),
            ("fp16 autocast + GradScaler + clip + accum + schedule",
             (lambda: check_precision("fp16", device)) if device.type in ("cpu", "cuda") else "no fp16 autocast"),
            ("channels-last convolution", lambda: check_channels_last(device)),
            ("checkpoint, kill at a random step, resume", lambda: check_resume(device, _mkdir(tmp, "resume"))),
            ("DDP (torchrun)", (lambda: check_ddp(device, _mkdir(tmp, "ddp"))) if ddp else "skipped (--no-ddp)"),
        ]
        for name, check in checks:
            t0 = time.perf_counter()
            if isinstance(check, str):
                rows.append((name, "skip", 0.0, check))
                continue
            try:
                detail = check()
                rows.append((name, "pass", time.perf_counter() - t0, detail))
            except Exception as err:  # noqa: BLE001 - a failed check is a row of the table
                why = f"{type(err).__name__}: {err}".strip()
                if not isinstance(err, AssertionError):
                    why += "\n" + traceback.format_exc(limit=-2).strip()
                rows.append((name, "FAIL", time.perf_counter() - t0, why.replace("\n", " | ")[:600]))
                reasons.append((name, why))
    width = max(len(r[0]) for r in rows)
    out(f"{'check':{width}s}  result  {'time':>6s}  detail")
    for name, status, secs, detail in rows:
        out(f"{name:{width}s}  {status:6s}  {secs:5.1f}s  {detail}")
    for name, why in reasons:     # the table's row is cut short; the whole reason, to report it
        out(f"\n{name} failed:\n  " + why.replace("\n", "\n  "))
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    out(f"{len(failed)} of {len(rows)} checks failed: {', '.join(failed)}" if failed else
        f"all {sum(r[1] == 'pass' for r in rows)} checks passed ({sum(r[1] == 'skip' for r in rows)} skipped)")
    return not failed


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m ptcourse selftest", description=__doc__.split("\n")[0])
    p.add_argument("--no-ddp", action="store_true", help="skip the multi-process check")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, folder, *rest = args.worker
        if kind == "resume":
            _worker_resume(Path(folder), rest[0], args.kill_at)
        else:
            _worker_ddp(Path(folder))
        return 0
    return 0 if selftest(ddp=not args.no_ddp) else 1


if __name__ == "__main__":
    sys.exit(main())
