"""A small deterministic training run used by the resume and DDP tests (run as a subprocess).

usage: python _train_script.py OUT_FILE [--ckpt DIR] [--kill-at STEP] [--batch B] [--epochs E] [--sgd]
"""
import argparse
import os
import signal

import torch
from torch.utils.data import DataLoader, TensorDataset

import ptcourse

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--ckpt", default=None)
p.add_argument("--kill-at", type=int, default=0)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--no-shuffle", action="store_true")
p.add_argument("--dropout", type=float, default=0.2)
args = p.parse_args()

torch.set_num_threads(1)
ptcourse.seed_everything(0)
g = torch.Generator().manual_seed(123)
x = torch.randn(96, 10, generator=g)
y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
train = TensorDataset(x[:64], y[:64])
val = TensorDataset(x[64:], y[64:])
model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Dropout(args.dropout),
                            torch.nn.Linear(32, 3))
steps = {"n": 0}


def loss_fn(logits, targets):
    steps["n"] += torch.is_grad_enabled()  # count training steps only, not validation batches
    if args.kill_at and steps["n"] == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard crash, mid-epoch
    return torch.nn.functional.cross_entropy(logits, targets)


history = ptcourse.fit(model, DataLoader(train, batch_size=args.batch, shuffle=not args.no_shuffle),
                       epochs=args.epochs, lr=0.05, loss_fn=loss_fn,
                       scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5, 0.5),
                       val_loader=DataLoader(val, batch_size=5), metrics={"acc": ptcourse.accuracy},
                       checkpoint_dir=args.ckpt, progress=False)
rank = int(os.environ.get("RANK", "0"))
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "history": history.to_dict(), "world": world}, f"{args.out}.rank{rank}")
