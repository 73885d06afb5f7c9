"""How much does ``ptcourse.fit`` cost over a hand-written loop? And a Hugging Face ``Trainer``?

The same small CNN (the one of chapter 00), the same MNIST subset (pre-loaded as one float tensor,
so data loading costs the same everywhere), the same optimizer (AdamW, constant learning rate, no
gradient clipping) and the same number of optimizer steps, trained three ways:

    (a) hand     a plain PyTorch loop: forward, cross_entropy, backward, step, zero_grad, loss.item()
    (b) fit      ptcourse.fit(..., progress=False)
    (c) Trainer  transformers.Trainer on the CPU: no evaluation, no saving, no logging, no clipping

The runs are interleaved in one process (a, b, c, a, b, c, ...), the first round is a warm-up and
is discarded, and the table reports the median steps/s over the remaining rounds and each
method's ratio to (a): the median over rounds of (its steps/s / the hand loop's steps/s in the same
round), which cancels slow drifts in the machine's load. Steps per CPU-second (this process's CPU
time) are shown too: on a shared machine they move less than the wall clock. Only the training call is timed (building the model, optimizer and
Trainer object is not). Run it on a quiet machine; it prints the load average.

Usage::

    python benchmarks/loop_overhead.py                      # about 1-3 minutes
    python benchmarks/loop_overhead.py --steps 400 --rounds 8 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--epochs", type=int, default=2, help="the steps are split over this many epochs")
    p.add_argument("--rounds", type=int, default=9, help="rounds of (a, b, c); the first is a warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--methods", default="hand,fit,trainer", help="comma-separated subset to run")
    return p.parse_args()


args = parse_args()
# fix the threads before torch starts its thread pools
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset, default_collate  # noqa: E402

import ptcourse  # noqa: E402

torch.set_num_threads(args.threads)


def small_cnn() -> nn.Module:
    """The small CNN of chapter 00 (about 20k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


class WithLoss(nn.Module):
    """What a ``Trainer`` expects: ``forward(**batch)`` returns a dict holding the loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def as_dict(rows):
    """The default collate, then named fields for the Trainer."""
    x, y = default_collate(rows)
    return {"x": x, "labels": y}


# ----------------------------------------------------------------------------- data, once
if args.steps % args.epochs:
    raise SystemExit(f"--steps ({args.steps}) must be a multiple of --epochs ({args.epochs})")
n_examples = args.batch_size * args.steps // args.epochs
train = ptcourse.data.load("mnist", "train", limit=n_examples, seed=0)
images, labels = train.tensors()                       # float [N, 1, 28, 28] in [0, 1], long [N]
dataset = TensorDataset(images, labels)
ptcourse.seed_everything(0)
INIT = small_cnn().state_dict()                         # every run starts from the same weights
LR = 1e-3


def fresh():
    model = small_cnn()
    model.load_state_dict(INIT)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def loader(seed=0):
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the three runs
class Clock:
    """Wall-clock and CPU time (this process, all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_hand():
    model, optimizer = fresh()
    data = loader()
    losses = []
    with Clock() as clock:
        model.train()
        for epoch in range(args.epochs):
            for x, y in data:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
    return clock, len(losses), statistics.fmean(losses)


def run_fit():
    model, optimizer = fresh()
    data = loader()
    with Clock() as clock:
        history = ptcourse.fit(model, data, epochs=args.epochs, optimizer=optimizer, progress=False,
                               device="cpu")
    return clock, len(history.steps), statistics.fmean(history.steps)


def run_trainer():
    from transformers import PrinterCallback, Trainer, TrainingArguments

    model, optimizer = fresh()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True,
            per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
            eval_strategy="no", save_strategy="no", logging_strategy="no",
            dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
            seed=0)
        trainer = Trainer(model=WithLoss(model), args=targs, train_dataset=dataset, data_collator=as_dict,
                          optimizers=(optimizer, None))
        trainer.remove_callback(PrinterCallback)        # it would print the final metrics dict
        with Clock() as clock:
            result = trainer.train()
    return clock, result.global_step, result.training_loss


RUNS = {"hand": ("(a) hand-written loop", run_hand),
        "fit": ("(b) ptcourse.fit", run_fit),
        "trainer": ("(c) transformers.Trainer", run_trainer)}


def main():
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in RUNS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(RUNS)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    load0 = os.getloadavg()
    print(f"loop_overhead: small CNN ({sum(p.numel() for p in small_cnn().parameters()):,} parameters), "
          f"MNIST subset of {n_examples} images, batch {args.batch_size}, {args.steps} steps "
          f"({args.epochs} epochs), AdamW lr {LR}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, ptcourse {ptcourse.__version__}; "
          f"{args.threads} thread(s) of {os.cpu_count()} CPUs; {args.rounds} rounds (first = warm-up)")
    print(f"load average at start (1/5/15 min): {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    wall = {m: [] for m in methods}       # steps per second of wall-clock time, per round
    cpu = {m: [] for m in methods}        # steps per second of this process's CPU time
    mean_loss = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        line = []
        for m in methods:
            clock, steps, loss = RUNS[m][1]()
            if steps != args.steps:
                raise RuntimeError(f"{m} ran {steps} steps, expected {args.steps}")
            if r > 0:
                wall[m].append(steps / clock.wall)
                cpu[m].append(steps / clock.cpu)
            mean_loss[m] = loss
            line.append(f"{m} {steps / clock.wall:6.1f}")
        print(f"  round {r:2d}{' (warm-up)' if r == 0 else '          '}  steps/s: " + "   ".join(line),
              flush=True)
    load1 = os.getloadavg()

    med = {m: statistics.median(wall[m]) for m in methods}
    med_cpu = {m: statistics.median(cpu[m]) for m in methods}
    base = "hand" if "hand" in methods else None

    def paired(rates, m):
        """Median over rounds of (rate of m / rate of the hand loop in the same round)."""
        return statistics.median(a / b for a, b in zip(rates[m], rates[base]))

    print()
    print(f"| method | steps/s (median of {args.rounds - 1} rounds) | min-max | ratio to (a) "
          "| steps per CPU-second | ratio to (a) | mean train loss |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        ratio = f"{paired(wall, m):.3f}" if base else "-"
        ratio_cpu = f"{paired(cpu, m):.3f}" if base else "-"
        print(f"| {RUNS[m][0]} | {med[m]:.1f} | {min(wall[m]):.1f}-{max(wall[m]):.1f} | {ratio} "
              f"| {med_cpu[m]:.1f} | {ratio_cpu} | {mean_loss[m]:.4f} |")
    print()
    print(f"load average at end (1/5/15 min): {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    if base and "fit" in methods:
        r_fit = paired(wall, "fit")
        verdict = "meets" if r_fit >= 0.95 else "misses"
        extra = ""
        if "trainer" in methods:
            extra = f"; fit is {paired(wall, 'fit') / paired(wall, 'trainer'):.2f}x the speed of Trainer"
        print(f"fit / hand-written loop = {r_fit:.3f} (wall clock): {verdict} the 0.95 goal{extra}.")
    if max(load0[0], load1[0]) > 1.5 * args.threads:
        print(f"NOTE: the machine was busy (load average above {1.5 * args.threads:g} for {args.threads} "
              "thread(s)); wall-clock numbers are noisy. The CPU-time columns are less affected.")


if __name__ == "__main__":
    main()
