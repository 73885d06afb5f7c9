"""A small deterministic training run used by the resume and DDP tests (run as a subprocess).

usage: python _train_script.py OUT_FILE [--ckpt DIR] [--kill-at STEP] [--batch B] [--epochs E]
       [--loader shuffle|generator|grouped|plain] [--save-every N] [--nan-at STEP --nan-rank R] [--oom-at STEP]
       [--step-fn]

Writes OUT_FILE.rank<R>: the final parameters, the History and the world size, or the name of the
error that stopped training (``--nan-at``); and OUT_FILE.exit<R>: whether a process group was still
there in the last exit handler Python ran (registered before ``fit``, so it runs after any that
``fit`` registered).
"""
import argparse
import atexit
import os
import signal

# The tests that run this script compare weights bit for bit, which the course promises on the CPU
# only (the selftest checks resume and DDP on a GPU): any GPU is hidden before torch starts, so the
# run and its processes train on the CPU, over gloo, whatever the device under test is.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["PTCOURSE_DEVICE"] = "cpu"

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import ptcourse  # noqa: E402
from ptcourse.chapters.bert_finetuning import LengthGroupedBatchSampler  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--ckpt", default=None)
p.add_argument("--kill-at", type=int, default=0)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--loader", default="shuffle", choices=["shuffle", "generator", "grouped", "plain"])
p.add_argument("--no-shuffle", action="store_true", help="same as --loader plain")
p.add_argument("--dropout", type=float, default=0.2)
p.add_argument("--save-every", type=int, default=None)
p.add_argument("--nan-at", type=int, default=0)
p.add_argument("--nan-rank", type=int, default=0, help="the process that sees the NaN (or the OOM)")
p.add_argument("--oom-at", type=int, default=0)
p.add_argument("--step-fn", action="store_true", help="train with a step_fn that calls the model's layers one by one")
args = p.parse_args()

torch.set_num_threads(1)
ptcourse.seed_everything(0)
g = torch.Generator().manual_seed(123)
x = torch.randn(96, 10, generator=g)
y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
lengths = torch.randint(1, 50, (64,), generator=g)
train = TensorDataset(x[:64], y[:64])
val = TensorDataset(x[64:], y[64:])
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Dropout(args.dropout),
                            torch.nn.Linear(32, 3))
kind = "plain" if args.no_shuffle else args.loader
loader = {
    "shuffle": lambda: DataLoader(train, batch_size=args.batch, shuffle=True),
    "plain": lambda: DataLoader(train, batch_size=args.batch),
    "generator": lambda: DataLoader(train, batch_size=args.batch, shuffle=True,
                                    generator=torch.Generator().manual_seed(7)),
    "grouped": lambda: DataLoader(train, batch_sampler=LengthGroupedBatchSampler(lengths, args.batch, group=2, seed=3)),
}[kind]()
rank = int(os.environ.get("RANK", "0"))
steps = {"n": 0}
atexit.register(lambda: open(f"{args.out}.exit{rank}", "w").write(
    "group still there" if torch.distributed.is_initialized() else "no group"))


def loss_fn(logits, targets):
    steps["n"] += torch.is_grad_enabled()  # count training steps only, not validation batches
    if args.kill_at and steps["n"] == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, mid-epoch
    loss = torch.nn.functional.cross_entropy(logits, targets)
    if args.nan_at and steps["n"] == args.nan_at and rank == args.nan_rank:
        loss = loss + loss.detach() * float("nan")  # only this process sees a NaN (its gradients stay finite)
    if args.oom_at and steps["n"] == args.oom_at and rank == args.nan_rank:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return loss


def step_fn(m, batch):
    """The same loss, calling the submodules directly (as a SimCLR step calls ``model.encoder``)."""
    return loss_fn(m[3](m[2](m[1](m[0](batch[0])))), batch[1])


objective = {"step_fn": step_fn} if args.step_fn else {"loss_fn": loss_fn}
try:
    history = ptcourse.fit(model, loader, epochs=args.epochs, lr=0.05, **objective,
                           scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5, 0.5),
                           val_loader=DataLoader(val, batch_size=5), metrics={"acc": ptcourse.accuracy},
                           checkpoint_dir=args.ckpt, progress=False,
                           **({"save_every": args.save_every} if args.save_every else {}))
except Exception as err:  # noqa: BLE001 - the NaN test records what stopped each process
    if not args.nan_at:
        raise
    torch.save({"error": type(err).__name__, "message": str(err)}, f"{args.out}.rank{rank}")
    raise SystemExit(0)
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "history": history.to_dict(), "world": world}, f"{args.out}.rank{rank}")
