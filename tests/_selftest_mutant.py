"""The selftest's worker process with one feature broken on purpose (tests/test_selftest_mutations.py).

usage: python _selftest_mutant.py MUTATION --worker KIND FOLDER ...

The mutation tests put this script in ``selftest.WORKER``, so the selftest's subprocess checks start
it (directly or under ``torchrun``) instead of the selftest module; it applies MUTATION, then runs
the worker as usual. ``none`` breaks nothing: the rows must then pass.
"""
import sys

import torch

from ptcourse import checkpoint, distributed
from ptcourse.tools import selftest


def no_rng_restore():
    """A resume that restores neither the random states nor the loader's generator and sampler."""
    checkpoint.set_loader_state = lambda loader, state: None
    checkpoint.set_rng_state = lambda state: None


def ddp_no_sync():
    """DDP without its gradient all-reduce: every process trains its own copy of the model."""
    torch.nn.parallel.DistributedDataParallel = lambda module, **kwargs: module


def ddp_no_shard():
    """Every process trains on the whole training set, as if there were no DistributedSampler."""
    distributed.shard_train = lambda loader, rank, world: loader


MUTATIONS = {"none": lambda: None, "no-rng-restore": no_rng_restore, "ddp-no-sync": ddp_no_sync,
             "ddp-no-shard": ddp_no_shard}

if __name__ == "__main__":
    MUTATIONS[sys.argv[1]]()
    sys.exit(selftest.main(sys.argv[2:]))
