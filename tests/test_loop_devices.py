"""Where ``fit``, ``evaluate`` and ``predict`` run, and how batches get there.

No GPU is needed: the 'meta' device plays the GPU. ``PTCOURSE_DEVICE=meta`` makes it what
``best_device()`` finds (as CUDA is on Colab); tensors on it have shapes but no values, so a
computation there runs, while reading a value back or mixing it with a CPU tensor fails, as
mixing a CUDA tensor with a CPU one does.
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ptcourse
from ptcourse import loop

META = torch.device("meta")


def blobs(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(torch.randn(n, 8, generator=g) + y[:, None].float(), y)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


class Seen(Exception):
    """Raised by :class:`Where` once it has recorded where its first batch ran."""


class Where(torch.nn.Module):
    """A classifier that records the device of its weights and of its first input, then stops."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.lin.weight.device, x.device))
        raise Seen


def test_evaluate_and_predict_run_a_model_where_it_is(monkeypatch):
    """A teacher loaded on the CPU and never trained by fit, evaluated where the best device is a
    GPU: without device=, evaluate and predict must run it on its own device (the CPU here), with a
    warning that a GPU is there. Moving only the batches to the best device gives a device-mismatch
    error."""
    monkeypatch.setenv("PTCOURSE_DEVICE", "meta")
    assert ptcourse.runtime.best_device() == META
    ptcourse.seed_everything(0)
    model = mlp()
    loader = DataLoader(blobs(), batch_size=8)
    x, y = blobs().tensors
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="on the CPU, so it runs there, though meta is available"):
        result = ptcourse.evaluate(model, loader, {"acc": ptcourse.accuracy})
    assert result["acc"] == pytest.approx(ptcourse.accuracy(expected, y).item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(expected, y).item(), rel=1e-6)
    with pytest.warns(UserWarning, match="move it with model.to"):
        logits, targets = ptcourse.predict(model, loader)
    assert torch.allclose(logits, expected) and torch.equal(targets, y)
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}  # the model was not moved


def test_the_device_argument_moves_the_model_there():
    """device= is where evaluate and predict run: the model is moved there and the batches follow."""
    for run in (lambda m, data: ptcourse.evaluate(m, data, device=META),
                lambda m, data: ptcourse.predict(m, data, device=META)):
        model = Where()
        with pytest.raises(Seen):
            run(model, DataLoader(blobs(), batch_size=8))
        assert model.seen == [(META, META)]


def test_fit_trains_on_the_best_device_unless_told_otherwise(monkeypatch):
    """A freshly built model lives on the CPU; fit must still train it on the GPU (the best device)
    unless device= says where, and moves the model there."""
    monkeypatch.setenv("PTCOURSE_DEVICE", "meta")
    model = Where()
    with pytest.raises(Seen):
        ptcourse.fit(model, DataLoader(blobs(), batch_size=8), epochs=1, progress=False)
    assert model.seen == [(META, META)]
    model = Where()
    with pytest.raises(Seen):
        ptcourse.fit(model, DataLoader(blobs(), batch_size=8), epochs=1, progress=False, device="cpu")
    assert model.seen == [(torch.device("cpu"), torch.device("cpu"))]


def test_a_model_without_weights_runs_on_the_best_device(monkeypatch):
    """A module with no parameters or buffers has no device of its own: evaluate and predict use the
    best device for it, as fit would."""
    monkeypatch.setenv("PTCOURSE_DEVICE", "meta")
    assert loop.model_device(torch.nn.ReLU()) == META
    assert loop.model_device(torch.nn.BatchNorm1d(3, affine=False)) == torch.device("cpu")  # buffers only
    assert loop.model_device(mlp().to(META)) == META


def test_only_host_to_cuda_copies_are_asynchronous(monkeypatch):
    """``non_blocking=True`` is safe for a copy from the CPU to a CUDA GPU, pinned or not (CUDA
    stages pageable memory before the call returns), and a waste nowhere: from pageable memory to
    MPS it can deliver corrupted data, and from a GPU to the CPU it returns before the values
    arrive. The stand-in for the copy records what to_device asks of ``Tensor.to`` for each pair of
    devices, without copying; a 'meta' tensor plays a tensor already on a GPU."""
    calls = []

    def record(self, device, non_blocking=False, **kwargs):
        calls.append((self.device.type, torch.device(device).type, non_blocking))
        return self
    host, gpu = torch.zeros(2), torch.zeros(2, device=META)
    monkeypatch.setattr(torch.Tensor, "to", record)
    for tensor, target in ((host, "cuda"), (host, torch.device("cuda", 1)), (host, "mps"), (host, "cpu"),
                           (gpu, "cpu")):
        loop.to_device({"x": [tensor], "n": 3}, target)
    assert calls == [("cpu", "cuda", True), ("cpu", "cuda", True), ("cpu", "mps", False), ("cpu", "cpu", False),
                     ("meta", "cpu", False)]
