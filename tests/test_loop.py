import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ptcourse
from ptcourse import checkpoint
from ptcourse.loop import NonFiniteLossError

SCRIPT = Path(__file__).with_name("_train_script.py")


def blobs(n=400, seed=0):
    centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(99)) * 3  # the same task for every seed
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, 8, generator=g), y)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_fit_learns_and_beats_chance_on_held_out_data():
    ptcourse.seed_everything(0)
    model = mlp()
    val = DataLoader(blobs(200, seed=1), batch_size=50)
    before = ptcourse.evaluate(model, val, {"acc": ptcourse.accuracy})
    history = ptcourse.fit(model, DataLoader(blobs(), batch_size=32, shuffle=True), epochs=5, lr=1e-2,
                           val_loader=val, metrics={"acc": ptcourse.accuracy}, progress=False)
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history.last["val_acc"] > 0.8  # chance is 0.25
    assert history.last["val_loss"] < before["loss"]
    assert history.best("val_loss")["epoch"] >= 3
    assert len(history.steps) == 5 * math.ceil(400 / 32)


def test_grad_accum_equals_one_big_batch():
    data = blobs(96)
    results = []
    for batch, accum in ((8, 4), (32, 1)):
        ptcourse.seed_everything(1)
        model = mlp()
        ptcourse.fit(model, DataLoader(data, batch_size=batch), epochs=2, grad_accum=accum,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-5)
    # and accumulation is not a no-op: batch 8 without accumulation ends elsewhere
    ptcourse.seed_everything(1)
    model = mlp()
    ptcourse.fit(model, DataLoader(data, batch_size=8), epochs=2,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert not torch.allclose(torch.cat([p.detach().flatten() for p in model.parameters()]), results[1], atol=1e-3)


def test_grad_accum_with_a_partial_last_group_averages_over_that_group():
    data = blobs(40)  # 5 batches of 8, grad_accum 2 -> groups of 2, 2, 1
    ptcourse.seed_everything(2)
    model = mlp()
    hist = ptcourse.fit(model, DataLoader(data, batch_size=8), epochs=1, grad_accum=2, progress=False,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert len(hist.steps) == 5


def run(args, env=None, check=True):
    env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=240, check=check)


def load_out(path):
    return torch.load(f"{path}.rank0", weights_only=True)


def strip_times(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history["epochs"]]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    run([str(tmp_path / "full"), "--ckpt", str(tmp_path / "ck_full")])
    # 64 examples / batch 8 = 8 steps per epoch; step 13 is in the middle of epoch 2
    crashed = run([str(tmp_path / "resumed"), "--ckpt", str(tmp_path / "ck"), "--kill-at", "13"], check=False)
    assert crashed.returncode == -9, crashed.stderr
    assert checkpoint.load(tmp_path / "ck" / "last.pt")["epoch"] == 1
    resumed = run([str(tmp_path / "resumed"), "--ckpt", str(tmp_path / "ck")])
    assert "Resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout
    full, res = load_out(tmp_path / "full"), load_out(tmp_path / "resumed")
    for k in full["params"]:
        assert torch.equal(full["params"][k], res["params"][k]), k
    assert strip_times(full["history"]) == strip_times(res["history"])
    assert full["history"]["steps"] == res["history"]["steps"]
    # a fresh run (no checkpoint) from a different start would not match: the test can fail
    other = run([str(tmp_path / "other"), "--epochs", "2"])
    assert other.returncode == 0
    assert not torch.equal(load_out(tmp_path / "other")["params"]["0.weight"], full["params"]["0.weight"])


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    ptcourse.fit(mlp(), DataLoader(blobs(32), batch_size=8), epochs=1, checkpoint_dir=tmp_path, progress=False)
    other = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="does not fit this model"):
        ptcourse.fit(other, DataLoader(blobs(32), batch_size=8), epochs=2, checkpoint_dir=tmp_path, progress=False)


def test_nan_loss_stops_with_a_clear_message():
    x, y = blobs(64).tensors
    x[40] = float("nan")  # example 40 sits in batch 6 (batch size 8, no shuffle)
    with pytest.raises(NonFiniteLossError) as err:
        ptcourse.fit(mlp(), DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, progress=False)
    msg = str(err.value)
    assert "nan" in msg and "epoch 1, step 6" in msg and "last finite loss: " in msg
    assert "learning rate" in msg and "max_grad_norm" in msg


def test_labels_out_of_range_are_explained():
    x, y = blobs(32).tensors
    y[5] = 7
    with pytest.raises(ValueError, match=r"Labels must lie in 0\.\.3 .* labels from 0 to 7"):
        ptcourse.fit(mlp(), DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, progress=False)
    y[5] = -1
    with pytest.raises(ValueError, match="labels from -1"):
        ptcourse.evaluate(mlp(), DataLoader(TensorDataset(x, y), batch_size=8))


def test_hugging_face_style_dict_batches():
    class Out:
        def __init__(self, logits, loss):
            self.logits, self.loss = logits, loss

    class HFLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = mlp()

        def forward(self, inputs, labels=None):
            logits = self.lin(inputs)
            return Out(logits, torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None)

    x, y = blobs(128).tensors
    rows = [{"inputs": a, "labels": b} for a, b in zip(x, y)]
    loader = DataLoader(rows, batch_size=16)
    ptcourse.seed_everything(0)
    model = HFLike()
    history = ptcourse.fit(model, loader, epochs=4, lr=1e-2, val_loader=loader,
                           metrics={"acc": ptcourse.accuracy}, progress=False)
    assert history.last["val_acc"] > 0.8
    logits, targets = ptcourse.predict(model, loader)
    assert logits.shape == (128, 4) and torch.equal(targets, y)


def test_precision_choice_on_cpu_and_bf16_autocast_runs():
    assert ptcourse.profile().precision == "fp32" or torch.cuda.is_available()
    ptcourse.seed_everything(0)
    h = ptcourse.fit(mlp(), DataLoader(blobs(64), batch_size=16), epochs=1, precision="bf16", progress=False)
    assert math.isfinite(h.last["train_loss"])
    with pytest.raises(ValueError, match="precision="):
        ptcourse.fit(mlp(), DataLoader(blobs(64), batch_size=16), epochs=1, precision="fp8", progress=False)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), str(tmp_path / "ddp"), "--batch", "8", "--no-shuffle", "--dropout", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"ddp.rank{r}", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r1["world"] == 2, "did not really run as 2 processes"
    single = run([str(tmp_path / "one"), "--batch", "16", "--no-shuffle", "--dropout", "0"])
    assert single.returncode == 0
    one = load_out(tmp_path / "one")
    for k in one["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks disagree on {k}"
        assert torch.allclose(r0["params"][k], one["params"][k], atol=1e-5), k
    # validation metrics are reduced over the two shards: equal to the single process's
    for a, b in zip(r0["history"]["epochs"], one["history"]["epochs"]):
        assert a["val_acc"] == pytest.approx(b["val_acc"]) and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    assert strip_times(r0["history"]) == strip_times(r1["history"])  # (step losses are per process)


def test_out_of_memory_becomes_advice():
    class Greedy(torch.nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), Greedy())
    with pytest.raises(ptcourse.loop.OutOfMemoryAdvice, match=r"batch size 16 .*grad_accum=2"):
        ptcourse.fit(model, DataLoader(blobs(32), batch_size=16), epochs=1, progress=False)


def test_validation_with_step_fn_reports_the_training_objective():
    """An autoencoder trained with step_fn: val_loss is its reconstruction loss, not a cross-entropy."""
    x, _ = blobs(128).tensors
    ae = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Linear(3, 8))

    def recon(model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[0])

    loader = DataLoader(TensorDataset(x, torch.zeros(128, dtype=torch.long)), batch_size=32)
    ptcourse.seed_everything(0)
    h = ptcourse.fit(ae, loader, epochs=3, step_fn=recon, val_loader=loader, lr=1e-2, progress=False)
    expected = torch.nn.functional.mse_loss(ae(x), x).item()
    assert h.last["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert h["val_loss"][-1] < h["val_loss"][0]
