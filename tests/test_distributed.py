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
