"""Checkpoints on other machines than the one that wrote them: the random states of the devices
(Apple MPS, any number of GPUs), another number of processes, persistent loader workers, and
files the safe loader refuses. The devices are stand-ins (monkeypatched torch functions); each
test says what it stands in for."""
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ptcourse
from ptcourse import checkpoint, files

from _crash import Crash, crash_at


def blobs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(torch.randn(4, 8, generator=torch.Generator().manual_seed(9))[y] * 3
                         + torch.randn(n, 8, generator=g), y)


def dropout_mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 4))


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- Apple MPS
@pytest.fixture
def mps_generator(monkeypatch):
    """Stands in for a Mac's MPS generator: ``torch.mps.get_rng_state`` / ``set_rng_state`` read and
    write a byte tensor held here (``box["state"]``), as the real ones do the Apple GPU's generator."""
    import torch._dynamo  # noqa: F401 - the optimizers import it, reading the real is_available, before it is replaced
    box = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *a, **k: box["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s, *a, **k: box.__setitem__("state", s.clone()))
    return box


def test_the_mps_random_state_is_saved_and_restored(mps_generator, tmp_path):
    """Dropout on a Mac draws from the MPS generator: a resumed run must continue its stream."""
    files.save_atomic(checkpoint.rng_state(), tmp_path / "rng.pt")
    saved = mps_generator["state"]
    mps_generator["state"] = torch.full((16,), 7, dtype=torch.uint8)  # the stream moved on
    checkpoint.set_rng_state(files.load(tmp_path / "rng.pt"))
    assert torch.equal(mps_generator["state"], saved)


def test_fit_resumes_the_mps_random_state(mps_generator, tmp_path):
    loader = DataLoader(blobs(32), batch_size=8)
    ptcourse.fit(dropout_mlp(), loader, epochs=1, checkpoint_dir=tmp_path, device="cpu", progress=False)
    at_save = mps_generator["state"]
    mps_generator["state"] = torch.full((16,), 7, dtype=torch.uint8)  # a new kernel: another state
    ptcourse.fit(dropout_mlp(), loader, epochs=2, checkpoint_dir=tmp_path, device="cpu", progress=False)
    assert torch.equal(mps_generator["state"], at_save)


def test_a_checkpoint_without_an_mps_state_resumes_on_a_mac(mps_generator):
    """A checkpoint written on Linux or Colab has no MPS state: nothing to restore, no error."""
    state = checkpoint.rng_state()
    del state["mps"]
    checkpoint.set_rng_state(state)


# ----------------------------------------------------------------------------- another number of GPUs
@pytest.fixture
def cuda_generators(monkeypatch):
    """Stands in for CUDA's per-GPU generators on a machine with ``gpus["n"]`` GPUs. As the real
    functions do, setting the state of a GPU that does not exist fails (set_rng_state_all with more
    states than GPUs)."""
    gpus = {"n": 4, "states": {}}

    def check(i):
        if i >= gpus["n"]:
            raise IndexError(f"invalid device ordinal {i} (this machine has {gpus['n']} GPUs)")

    def set_rng_state(state, device="cuda"):
        i = torch.device(device).index if not isinstance(device, int) else device
        check(i or 0)
        gpus["states"][i or 0] = state.clone()

    def set_rng_state_all(states):
        for i, s in enumerate(states):
            set_rng_state(s, i)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus["n"])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((8,), i, dtype=torch.uint8)
                                                                  for i in range(gpus["n"])])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    return gpus


def test_a_checkpoint_from_more_gpus_resumes_on_fewer_and_says_what_differs(cuda_generators):
    """A run on a 4-GPU lab node resumed on Colab's one GPU (or a DDP run resumed in one process):
    GPU 0's random state is restored, and a warning says the others could not be."""
    state = checkpoint.rng_state()          # 4 GPUs
    cuda_generators["n"] = 1
    with pytest.warns(UserWarning, match=r"4 GPUs.*1"):
        checkpoint.set_rng_state(state)
    assert list(cuda_generators["states"]) == [0] and torch.equal(cuda_generators["states"][0], state["cuda"][0])


def test_a_checkpoint_from_fewer_gpus_restores_those_it_has(cuda_generators):
    cuda_generators["n"] = 1
    state = checkpoint.rng_state()          # 1 GPU
    cuda_generators["n"] = 2
    with pytest.warns(UserWarning, match=r"1 GPU.*2"):
        checkpoint.set_rng_state(state)
    assert list(cuda_generators["states"]) == [0]


def test_the_same_number_of_gpus_restores_all_without_a_warning(cuda_generators):
    state = checkpoint.rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.set_rng_state(state)
    assert sorted(cuda_generators["states"]) == [0, 1, 2, 3]


def test_a_checkpoint_of_two_processes_resumes_in_one_and_says_so(tmp_path):
    """A DDP run (2 processes) resumed in one process: the model, optimizer and History resume; the
    data shares and per-process random states cannot, and a warning says so."""
    loader = DataLoader(blobs(32), batch_size=8)
    ptcourse.fit(dropout_mlp(), loader, epochs=1, checkpoint_dir=tmp_path, progress=False)
    state = files.load(tmp_path / "last.pt")
    state["rng"] = state["rng"] * 2         # what two processes write: one random state each
    files.save_atomic(state, tmp_path / "last.pt")
    with pytest.warns(UserWarning, match=r"2 processes.*1"):
        h = ptcourse.fit(dropout_mlp(), loader, epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert len(h) == 2


# ----------------------------------------------------------------------------- files the safe loader refuses
def test_a_sound_file_with_a_type_outside_the_allowlist_is_not_called_damaged(tmp_path):
    """A checkpoint that holds, say, a path object is intact: telling the student to delete it would
    throw away a good run. The message names the type and the safe way to allow it."""
    import pathlib
    path = tmp_path / "last.pt"
    torch.save({"w": torch.ones(2), "data_dir": pathlib.PurePosixPath("/data")}, path)
    with pytest.raises(files.CheckpointError) as err:
        files.load(path)
    msg = str(err.value)
    assert "pathlib.PurePosixPath" in msg and "add_safe_globals([PurePosixPath])" in msg
    assert "damaged" not in msg.replace("not damaged", "") and "Delete" not in msg
    assert "weights_only=False" not in msg


# ----------------------------------------------------------------------------- persistent workers


def persistent_loader():
    """Shuffled by the global generator, one persistent worker process (which draws nothing random)."""
    return DataLoader(blobs(48), batch_size=8, shuffle=True, num_workers=1, persistent_workers=True)


def train_persistent(model, ck=None, loss_fn=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the warning about the workers' own random draws
        return ptcourse.fit(model, persistent_loader(), epochs=3, lr=1e-2, loss_fn=loss_fn, checkpoint_dir=ck,
                            save_every=2, progress=False)


def test_persistent_workers_resume_to_the_same_weights(tmp_path):
    """With persistent workers the loader draws its workers' base seed only when its first epoch
    starts. A resumed run's first epoch must not draw it again: that draw would shift the random
    state that orders the data and drives dropout, and the run would continue elsewhere."""
    ptcourse.seed_everything(0)
    ref = dropout_mlp()
    ref_h = train_persistent(ref)
    for at in (4, 7, 15):  # of batches 1..18 (6 per epoch): mid-epoch 1, start of epoch 2, mid-epoch 3
        ck = tmp_path / f"at{at}"
        ptcourse.seed_everything(0)
        with pytest.raises(Crash):
            train_persistent(dropout_mlp(), ck, crash_at(at))
        ptcourse.seed_everything(1000 + at)
        model = dropout_mlp()
        h = train_persistent(model, ck)
        assert torch.equal(flat(model), flat(ref)), f"crash at batch {at}"
        assert h.steps == ref_h.steps


def test_checkpointing_with_persistent_workers_says_what_is_not_exact(tmp_path):
    """Random draws inside persistent workers (augmentations) run on across epochs in processes a
    checkpoint cannot see: fit says so when it checkpoints such a loader."""
    with pytest.warns(UserWarning, match="persistent_workers.*augmentation"):
        ptcourse.fit(dropout_mlp(), persistent_loader(), epochs=1, checkpoint_dir=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint, nothing to say
        ptcourse.fit(dropout_mlp(), persistent_loader(), epochs=1, progress=False)
