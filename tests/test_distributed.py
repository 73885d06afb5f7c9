"""Several processes (``ptcourse.distributed``) checked in one process: the device each process
trains on, the process group it joins, and each rank's share of the data (world=2 computed here by
calling the sharding with rank 0 and rank 1)."""
import pytest
import torch
from torch.utils.data import (BatchSampler, DataLoader, SequentialSampler, SubsetRandomSampler, TensorDataset,
                              WeightedRandomSampler)

from ptcourse import distributed


@pytest.fixture
def mac(monkeypatch):
    """Stands in for a Mac with Apple silicon: MPS available, no CUDA."""
    monkeypatch.delenv("PTCOURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


@pytest.fixture
def gpus(monkeypatch):
    """Stands in for a CUDA machine on which this process sees ``n`` GPUs (``gpus(n)``)."""
    monkeypatch.delenv("PTCOURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def see(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return see


@pytest.fixture
def group(monkeypatch):
    """Stands in for ``torch.distributed``'s process group: records the backend ``setup`` joins with
    and the GPU it selects, without starting one."""
    seen = {"backend": None, "set_device": []}

    def init_process_group(backend, *a, **k):
        seen["backend"] = backend
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen["set_device"].append(torch.device(d)))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    return seen


# ----------------------------------------------------------------------------- devices
def test_several_processes_on_a_mac_train_on_the_cpu_over_gloo(mac, group):
    """gloo, the only backend without CUDA, has no MPS support: two processes on a Mac must use
    the CPU, while one process still gets the Apple GPU."""
    assert distributed.resolve_device(None, 0, 1).type == "mps"
    rank, local_rank, world = distributed.setup()
    assert (rank, local_rank, world) == (1, 1, 2) and group["backend"] == "gloo"
    assert distributed.resolve_device(None, local_rank, world) == torch.device("cpu")


def test_mps_asked_for_by_name_in_several_processes_is_refused_clearly(mac):
    with pytest.raises(ValueError, match="gloo.*MPS|MPS.*gloo"):
        distributed.resolve_device("mps", 0, 2)


def test_each_process_takes_gpu_local_rank_when_it_sees_them_all(gpus, group):
    gpus(2)
    rank, local_rank, world = distributed.setup()
    assert group["backend"] == "nccl" and group["set_device"] == [torch.device("cuda", 1)]
    assert distributed.resolve_device(None, local_rank, world) == torch.device("cuda", 1)


def test_a_process_that_sees_one_gpu_uses_it_whatever_its_local_rank(gpus, group):
    """Launchers that give each process its own GPU (CUDA_VISIBLE_DEVICES per process, e.g. SLURM's
    or an accelerate config): local rank 1 sees its GPU as cuda:0, and cuda:1 does not exist."""
    gpus(1)
    rank, local_rank, world = distributed.setup()
    assert distributed.resolve_device(None, local_rank, world) == torch.device("cuda", 0)
    assert group["set_device"] in ([], [torch.device("cuda", 0)])


def test_setup_selects_the_gpu_it_was_asked_to_train_on(gpus, group):
    """fit(device="cuda:3") in a process of local rank 1: NCCL's collectives must run on GPU 3, the
    GPU the model is on, so setup makes it the current device."""
    gpus(4)
    distributed.setup("cuda:3")
    assert group["set_device"] == [torch.device("cuda", 3)]
    assert distributed.resolve_device("cuda:3", 1, 2) == torch.device("cuda", 3)


# ----------------------------------------------------------------------------- each rank's share
def epoch_of(loader, epoch):
    distributed.set_epoch(loader, epoch)
    return [i for batch in loader for i in batch[0].tolist()]


def indexed(n):
    """A dataset whose examples are their own indices, so a batch shows which examples it holds."""
    return TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))


def subset():
    return SubsetRandomSampler(range(0, 100, 3))  # 34 examples


def weighted():
    return WeightedRandomSampler([1.0 if i % 4 == 0 else 0.0 for i in range(100)], num_samples=40)


@pytest.mark.parametrize("make", [subset, weighted])
def test_a_custom_sampler_keeps_its_choice_shared_between_the_ranks(make):
    """Two processes, each building its loader as the same script does; their global random states
    differ (as dropout or augmentations can leave them). Each rank takes its share of the sampler's
    choice, the same number of examples on every rank, and together they see what the sampler
    picks: the 34 examples of the subset, or 40 draws among the examples of weight 1."""
    shares = []
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        loader = DataLoader(indexed(100), batch_size=4, sampler=make())
        shards = distributed.shard_train(loader, rank, world=2)
        shares.append([epoch_of(shards, epoch) for epoch in (0, 1)])
    for epoch in (0, 1):
        mine, theirs = shares[0][epoch], shares[1][epoch]
        assert len(mine) == len(theirs) == len(make()) // 2
        if make is subset:
            assert sorted(mine + theirs) == list(range(0, 100, 3))
        else:
            assert all(i % 4 == 0 for i in mine + theirs)
    assert shares[0][0] != shares[0][1]  # a new draw each epoch


def test_the_stock_samplers_still_become_a_distributed_sampler():
    loader = DataLoader(indexed(10), batch_size=2, shuffle=True)
    assert isinstance(distributed.shard_train(loader, 0, 2).sampler, torch.utils.data.DistributedSampler)
    plain = distributed.shard_train(DataLoader(indexed(10), batch_size=2), 1, 2)
    assert epoch_of(plain, 0) == [1, 3, 5, 7, 9]


def test_evaluation_on_several_processes_keeps_a_batch_samplers_batches():
    """A validation loader built with a batch_sampler (e.g. length-grouped batches): each rank
    evaluates whole batches of it, in batches of their size, not one example at a time."""
    sampler = BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False)
    loader = DataLoader(indexed(10), batch_sampler=sampler)
    shards = [list(distributed.shard_eval(loader, rank, 2)) for rank in (0, 1)]
    sizes = [[len(b[0]) for b in s] for s in shards]
    assert sizes == [[4, 2], [4]]
    assert sorted(i for s in shards for b in s for i in b[0].tolist()) == list(range(10))
