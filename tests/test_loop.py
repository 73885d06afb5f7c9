"""fit, evaluate and predict: what they compute, exact resume after a crash, several processes
(the slow tests run tests/_train_script.py in subprocesses, two of them under torchrun with gloo)."""
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ptcourse
from ptcourse import checkpoint, distributed, loop
from ptcourse.chapters.bert_finetuning import LengthGroupedBatchSampler
from ptcourse.loop import NonFiniteLossError

from _crash import Crash, crash_at

SCRIPT = Path(__file__).with_name("_train_script.py")


def blobs(n=400, seed=0):
    centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(99)) * 3  # the same task for every seed
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, 8, generator=g), y)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_fit_learns_and_beats_chance_on_held_out_data(device):
    ptcourse.seed_everything(0)
    model = mlp().to(device)
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
        ptcourse.fit(model, DataLoader(data, batch_size=batch), epochs=2, grad_accum=accum, device="cpu",
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-5)
    # and accumulation is not a no-op: batch 8 without accumulation ends elsewhere
    ptcourse.seed_everything(1)
    model = mlp()
    ptcourse.fit(model, DataLoader(data, batch_size=8), epochs=2, device="cpu",
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert not torch.allclose(torch.cat([p.detach().flatten() for p in model.parameters()]), results[1], atol=1e-3)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_partial_last_accumulation_window_equals_one_big_batch():
    """40 examples, batches of 8, grad_accum=2: windows of 2, 2 and 1 batches. Each step must equal
    one step on the same examples as one batch (16, 16, 8): the last window is divided by 1, not by
    grad_accum (dividing by grad_accum would halve the last step's gradient)."""
    data = blobs(40)
    results = []
    for batch, accum in ((8, 2), (16, 1)):
        ptcourse.seed_everything(2)
        model = mlp()
        hist = ptcourse.fit(model, DataLoader(data, batch_size=batch), epochs=2, grad_accum=accum, device="cpu",
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.5), progress=False)
        results.append(flat(model))
    assert len(hist.steps) == 6
    assert torch.allclose(results[0], results[1], atol=1e-6)


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


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["generator", "grouped"])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, loader):
    """Checkpoints every optimizer step; a hard kill (SIGKILL) at a random step, mid-epoch;
    the resumed run must end with exactly the weights and History of an uninterrupted run, for a
    loader shuffled by its own generator and for the length-grouped batch sampler (chapter 03)."""
    import random
    step = random.Random().randrange(2, 3 * 8)  # 3 epochs of 8 steps
    common = ["--loader", loader, "--save-every", "1"]
    run([str(tmp_path / "full"), *common])
    crashed = run([str(tmp_path / "res"), "--ckpt", str(tmp_path / "ck"), "--kill-at", str(step), *common], check=False)
    assert crashed.returncode == -9, crashed.stderr
    resumed = run([str(tmp_path / "res"), "--ckpt", str(tmp_path / "ck"), *common])
    assert "Resumed from" in resumed.stdout, resumed.stdout
    full, res = load_out(tmp_path / "full"), load_out(tmp_path / "res")
    for k in full["params"]:
        assert torch.equal(full["params"][k], res["params"][k]), f"{k} differs after a kill at step {step}"
    assert full["history"]["steps"] == res["history"]["steps"], f"kill at step {step}"
    assert strip_times(full["history"]) == strip_times(res["history"]), f"kill at step {step}"


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


def test_labels_out_of_range_are_explained(device):
    x, y = blobs(32).tensors
    y[5] = 7
    with pytest.raises(ValueError, match=r"Labels must lie in 0\.\.3 .* labels from 0 to 7"):
        ptcourse.fit(mlp(), DataLoader(TensorDataset(x, y), batch_size=8), epochs=1, progress=False)
    y[5] = -1
    with pytest.raises(ValueError, match="labels from -1"):
        ptcourse.evaluate(mlp().to(device), DataLoader(TensorDataset(x, y), batch_size=8))


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
@pytest.mark.parametrize("objective", ["loss_fn", "step_fn"])
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path, objective):
    """2 gloo processes with batches of 8 train to the weights of one process with batches of 16.
    With ``step_fn`` the step calls the model's layers one by one (as ``model.encoder(x)``): it must
    get the model itself, and its gradients must still be averaged over the processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    extra = ["--no-shuffle", "--dropout", "0", *(["--step-fn"] if objective == "step_fn" else [])]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), str(tmp_path / "ddp"), "--batch", "8", *extra],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"ddp.rank{r}", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and r1["world"] == 2, "did not really run as 2 processes"
    # The group fit() joined is destroyed before Python shuts down (torch requires it). Left alive, a
    # gloo worker thread can touch Python during interpreter shutdown and abort the process with
    # "terminate called without an active exception", at random, after training has finished.
    for r in (0, 1):
        assert (tmp_path / f"ddp.exit{r}").read_text() == "no group", f"rank {r} exited with its process group alive"
    single = run([str(tmp_path / "one"), "--batch", "16", *extra])
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
    h = ptcourse.fit(ae, loader, epochs=3, step_fn=recon, val_loader=loader, lr=1e-2, progress=False, device="cpu")
    expected = torch.nn.functional.mse_loss(ae(x), x).item()
    assert h.last["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert h["val_loss"][-1] < h["val_loss"][0]


# ----------------------------------------------------------------------------- notebooks, GPUs, restarts
def test_fit_zeroes_stale_gradients_before_the_first_step():
    """A .backward() in an earlier notebook cell must not be added to fit's first step."""
    data = DataLoader(blobs(32), batch_size=32)
    ends = []
    for stale in (False, True):
        ptcourse.seed_everything(3)
        model = mlp()
        if stale:
            x, y = blobs(32, seed=5).tensors
            torch.nn.functional.cross_entropy(model(x), y).backward()  # e.g. a cell that inspected gradients
        ptcourse.fit(model, data, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), progress=False,
                     device="cpu")
        ends.append(flat(model))
    assert torch.equal(ends[0], ends[1])


def test_resume_restores_random_states_whatever_device_the_tensors_map_to(tmp_path, monkeypatch):
    """Stands in for resuming on CUDA: torch.set_rng_state accepts only CPU byte tensors,
    and a checkpoint loaded with map_location=<the training device> puts them on the GPU. Here any
    map_location other than the string "cpu" delivers the byte tensors (the random states) on
    'meta', which torch.set_rng_state refuses just as it refuses CUDA tensors; the other tensors stay
    loadable (as CUDA ones would be by load_state_dict)."""
    loader = lambda: DataLoader(blobs(32), batch_size=8, shuffle=True)  # noqa: E731
    ptcourse.seed_everything(0)
    ptcourse.fit(mlp(), loader(), epochs=1, checkpoint_dir=tmp_path, progress=False)
    real_load = torch.load

    def load_like_a_gpu_run(f, map_location=None, **kw):
        state = real_load(f, map_location="cpu", **kw)
        if isinstance(map_location, str) and map_location == "cpu":
            return state
        return torch.utils._pytree.tree_map(
            lambda t: t.to("meta") if torch.is_tensor(t) and t.dtype == torch.uint8 else t, state)
    monkeypatch.setattr(torch, "load", load_like_a_gpu_run)
    h = ptcourse.fit(mlp(), loader(), epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert len(h) == 2


def test_resume_is_exact_with_a_generator_loader_at_an_epoch_end(tmp_path):
    """A DataLoader(generator=...) is built afresh, from its seed, after a restart; two epochs in one
    go must equal one epoch, a restart (fresh model, fresh loader), and a second epoch: the resumed
    loader's generator must continue from the saved state, not from its seed."""
    def loader():
        return DataLoader(blobs(64), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(4))
    ptcourse.seed_everything(0)
    ref = mlp()
    ref_h = ptcourse.fit(ref, loader(), epochs=2, progress=False, device="cpu")
    ptcourse.seed_everything(0)
    ptcourse.fit(mlp(), loader(), epochs=1, checkpoint_dir=tmp_path, progress=False, device="cpu")
    ptcourse.seed_everything(99)
    model = mlp()
    h = ptcourse.fit(model, loader(), epochs=2, checkpoint_dir=tmp_path, progress=False, device="cpu")
    assert torch.equal(flat(model), flat(ref)) and h.steps == ref_h.steps




def dropout_mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 4))


LOADERS = {
    "generator": lambda: DataLoader(blobs(60), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(4)),
    "grouped": lambda: DataLoader(blobs(60), batch_sampler=LengthGroupedBatchSampler(
        torch.arange(60) % 17, 8, group=2, seed=1)),
    "global": lambda: DataLoader(blobs(60), batch_size=8, shuffle=True),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_crash_at_any_step_resumes_to_the_same_weights(tmp_path, kind):
    """Exact resume in one process: checkpoints every 2 optimizer steps (grad_accum=2 over 8
    batches per epoch, dropout on); a crash at several steps, then a fresh model, loader and random state,
    must end exactly where an uninterrupted run ends."""
    def train(model, ck=None, loss_fn=None):
        return ptcourse.fit(model, LOADERS[kind](), epochs=3, grad_accum=2, lr=1e-2, loss_fn=loss_fn,
                            scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
                            checkpoint_dir=ck, save_every=2, progress=False, device="cpu")
    ptcourse.seed_everything(0)
    ref = dropout_mlp()
    ref_h = train(ref)
    for at in (7, 9, 23):  # of batches 1..24; saves after batches 4, 8 (epoch end), 12, 16, 20: a crash mid-epoch 1,
        # at the start of epoch 2 (resumes from the epoch-end save), mid-epoch 3 (two epochs of generator state)
        ck = tmp_path / f"at{at}"
        ptcourse.seed_everything(0)
        with pytest.raises(Crash):
            train(dropout_mlp(), ck, crash_at(at))
        ptcourse.seed_everything(1000 + at)
        model = dropout_mlp()
        h = train(model, ck)
        assert torch.equal(flat(model), flat(ref)), f"crash at batch {at}"
        assert h.steps == ref_h.steps and strip_times(h.to_dict()) == strip_times(ref_h.to_dict())


def test_save_every_accepts_steps_and_times():
    assert checkpoint.parse_every(500) == (500, None)
    assert checkpoint.parse_every("10min") == (None, 600.0)
    assert checkpoint.parse_every("90s") == (None, 90.0)
    assert checkpoint.parse_every(None) == (None, None)
    with pytest.raises(ValueError, match="save_every"):
        checkpoint.parse_every("often")


def test_label_check_never_reads_device_tensors():
    """Stands in for a GPU-to-CPU sync on every step: reading the values of a 'meta'
    tensor raises, as reading a CUDA tensor makes the CPU wait for the GPU. The label check must
    use the targets as they were on the CPU, before the batch moved to the device."""
    model = mlp().to("meta")
    x, y = blobs(16).tensors
    logits, _, loss = loop.forward(model, (x.to("meta"), y.to("meta")), cpu_targets=y)
    assert logits.device.type == "meta" and loss.device.type == "meta"
    y[3] = 9
    with pytest.raises(ValueError, match="labels from 0 to 9"):
        loop.forward(model, (x.to("meta"), y.to("meta")), cpu_targets=y)


@pytest.fixture
def two_fake_processes(monkeypatch):
    """A world of 2 processes as fit sees it (environment + torch.distributed), with an all_reduce
    that records the device of its tensor and then stops the run."""
    seen = []

    class Stop(Exception):
        pass

    def all_reduce(t, *a, **k):
        seen.append(t.device)
        raise Stop
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **k: model)
    return seen, Stop


def test_collectives_get_tensors_on_the_training_device(two_fake_processes):
    """Stands in for NCCL on several GPUs: NCCL has no CPU all-reduce, so every tensor a
    collective gets must be on the training device. 'meta' plays the GPU: training and evaluating on
    it works, reading its values back does not (like a sync the reduction must not need)."""
    seen, Stop = two_fake_processes
    meta = torch.device("meta")
    with pytest.raises(Stop):  # evaluate's sums
        ptcourse.evaluate(mlp().to(meta), DataLoader(blobs(32), batch_size=8), {"acc": ptcourse.accuracy}, device=meta)
    with pytest.raises(Stop):  # fit's agreement on NaN / saving, at the first loss check
        ptcourse.fit(mlp(), DataLoader(blobs(32), batch_size=8), epochs=1, device=meta, progress=False)
    with pytest.raises(Stop):  # the epoch's train loss
        loop._EpochLosses().mean(meta, world=2)
    assert seen == [meta, meta, meta]


def test_scheduler_steps_only_when_the_grad_scaler_steps():
    """fp16 + GradScaler on the CPU: a step whose gradients overflow is skipped by the
    scaler, and then the scheduler must not advance either: scheduler steps == optimizer steps."""
    ptcourse.seed_everything(0)
    model = mlp()
    blow_up = {"on": False}
    model[0].weight.register_hook(lambda g: g * float("inf") if blow_up["on"] else g)
    calls = {"n": 0}

    def step_fn(m, batch):
        calls["n"] += 1
        blow_up["on"] = calls["n"] in (2, 3)  # the 2nd and 3rd steps overflow
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    real_steps = {"n": 0}
    optimizer.register_step_post_hook(lambda *a: real_steps.__setitem__("n", real_steps["n"] + 1))
    h = ptcourse.fit(model, DataLoader(blobs(64), batch_size=8), epochs=1, step_fn=step_fn, optimizer=optimizer,
                     scheduler=scheduler, precision="fp16", max_grad_norm=1.0, progress=False)
    assert len(h.steps) == 8 and real_steps["n"] <= 6  # (the scaler may skip more while it finds its scale)
    assert scheduler.last_epoch == real_steps["n"]


def _reference_amp_loop(model, loader, dtype, accum, clip, epochs, lr):
    """The textbook mixed-precision loop, written out: what fit must compute."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=5)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    batches = list(loader)
    for _ in range(epochs):
        for i, (x, y) in enumerate(batches):
            window = min(accum, len(batches) - i // accum * accum)
            with torch.autocast("cpu", dtype=dtype):
                loss = torch.nn.functional.cross_entropy(model(x), y) / window
            (scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % accum == 0 or i + 1 == len(batches):
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
                scheduler.step()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_scaler_clipping_accumulation_and_schedule_match_the_textbook_loop(precision):
    """CPU autocast stands in for CUDA's: the same sequence of scale, unscale, clip, step, update and
    schedule as the reference loop, bit for bit (7 batches, grad_accum 3: windows 3, 3, 1)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    loader = DataLoader(blobs(56), batch_size=8)
    ptcourse.seed_everything(0)
    ref = mlp()
    _reference_amp_loop(ref, loader, dtype, accum=3, clip=0.5, epochs=2, lr=1e-2)
    ptcourse.seed_everything(0)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ptcourse.fit(model, loader, epochs=2, optimizer=opt, grad_accum=3, max_grad_norm=0.5, precision=precision,
                 device="cpu",
                 scheduler=torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=5), progress=False)
    assert torch.equal(flat(model), flat(ref))


def test_scheduler_steps_equal_optimizer_steps_with_accumulation():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ptcourse.fit(model, DataLoader(blobs(80), batch_size=8), epochs=2, optimizer=opt, scheduler=sched,
                 grad_accum=3, progress=False)
    assert sched.last_epoch == 2 * 4  # 10 batches per epoch in windows of 3, 3, 3, 1


def test_train_loss_is_weighted_by_batch_size_like_validation():
    """20 examples in batches of 8, 8 and 4; with a learning rate of 0 the model does not
    change, so the epoch's train loss must equal the sample-weighted loss evaluate reports."""
    loader = DataLoader(blobs(20), batch_size=8)
    model = mlp()
    h = ptcourse.fit(model, loader, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                     progress=False)
    assert h.last["train_loss"] == pytest.approx(ptcourse.evaluate(model, loader)["loss"], rel=1e-6)


def test_distributed_train_loader_keeps_the_loaders_options():
    """The per-process loader keeps generator, worker_init_fn and persistent_workers: they decide
    the order, the workers' seeds and the speed of the run it shards."""
    g = torch.Generator().manual_seed(5)

    def init(worker_id):
        pass
    loader = DataLoader(blobs(32), batch_size=4, shuffle=True, generator=g, worker_init_fn=init, num_workers=1,
                        persistent_workers=True, prefetch_factor=3)
    shard = distributed.shard_train(loader, rank=1, world=2)
    assert shard.generator is g and shard.worker_init_fn is init and shard.persistent_workers
    assert shard.prefetch_factor == 3 and shard.num_workers == 1
    assert shard.sampler.rank == 1 and shard.sampler.shuffle and len(shard.sampler) == 16


def test_a_damaged_checkpoint_is_explained_without_the_unsafe_advice(tmp_path):
    """A half-copied last.pt names the file and what to do, and never advises weights_only=False
    (torch's own message does: an unsafe load of a file that cannot be trusted)."""
    ptcourse.fit(mlp(), DataLoader(blobs(32), batch_size=8), epochs=1, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "last.pt"

    def bad_pickle(b):  # a bit flipped inside data.pkl: torch's own error advises weights_only=False
        import struct
        import zipfile
        info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data.pkl"))
        name_len, extra_len = struct.unpack("<HH", b[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        return b[:start] + b"c" + b[start + 1:]  # the GLOBAL opcode: refused by the safe unpickler
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:200] + b"\0" * 300 + b[500:], bad_pickle):
        good = path.read_bytes()
        path.write_bytes(damage(good))
        with pytest.raises(checkpoint.CheckpointError) as err:
            ptcourse.fit(mlp(), DataLoader(blobs(32), batch_size=8), epochs=2, checkpoint_dir=tmp_path, progress=False)
        text = "".join(traceback.format_exception(err.value))
        assert str(path) in str(err.value) and "damaged" in str(err.value) and "Delete it" in str(err.value)
        assert "weights_only" not in text
        path.write_bytes(good)


@pytest.mark.slow
def test_a_nan_in_one_process_stops_all_processes_with_the_same_error(tmp_path):
    """Only rank 1 sees a NaN; both processes must stop with NonFiniteLossError at the
    same check (not rank 0 left waiting in a collective for a peer that has gone)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), str(tmp_path / "nan"), "--nan-at", "3", "--nan-rank", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"nan.rank{r}", weights_only=True) for r in (0, 1))
    assert r0["error"] == r1["error"] == "NonFiniteLossError", (r0, r1)
    assert "step 3 of that epoch" in r1["message"] and "another process" in r0["message"]


@pytest.mark.slow
def test_an_out_of_memory_in_one_process_ends_the_run_instead_of_hanging(tmp_path):
    """An OOM on rank 1 (inside its forward pass, where rank 0 waits in DDP's gradient
    all-reduce and no agreement is possible) must end the whole run with the advice, not leave rank 0
    waiting forever: the failing process exits and the launcher stops the others."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), str(tmp_path / "oom"), "--oom-at", "3", "--nan-rank", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode != 0 and "OutOfMemoryAdvice" in ddp.stderr and "grad_accum=2" in ddp.stderr
    assert time.perf_counter() - t0 < 200


@pytest.mark.slow
def test_ddp_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    """Mid-epoch checkpoints under DDP (2 gloo processes): each process's random state is saved and
    restored (dropout differs per process), and the per-process shards restart where they stopped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(SCRIPT), *args, "--save-every", "1"], env=env, capture_output=True, text=True,
                              timeout=300)
    full = torchrun(str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = torchrun(str(tmp_path / "res"), "--ckpt", str(tmp_path / "ck"), "--kill-at", "6")  # 4 steps/epoch
    assert killed.returncode != 0
    state = checkpoint.load(tmp_path / "ck" / "last.pt")
    assert (state["epoch"], state["batch"], len(state["rng"])) == (1, 1, 2)
    resumed = torchrun(str(tmp_path / "res"), "--ckpt", str(tmp_path / "ck"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for rank in (0, 1):
        a, b = (torch.load(tmp_path / f"{n}.rank{rank}", weights_only=True) for n in ("full", "res"))
        assert a["world"] == b["world"] == 2
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), (rank, k)
        assert strip_times(a["history"]) == strip_times(b["history"])


def test_count_parameters_counts_shared_tensors_once_and_can_skip_frozen_ones():
    from ptcourse import count_parameters
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight                      # weight tying, as in a GPT
    model = torch.nn.Sequential(emb, head, torch.nn.LayerNorm(4))
    assert count_parameters(model) == 40 + 8
    model[2].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 40


def test_live_plot_redraws_after_each_epoch(monkeypatch):
    drawn = []
    monkeypatch.setattr(ptcourse.plots.LivePlot, "update", lambda self, history: drawn.append(len(history)))
    ptcourse.fit(mlp(), DataLoader(blobs(32), batch_size=8), epochs=2, live_plot=True, progress=False)
    assert drawn == [1, 2]


def test_clipping_covers_what_the_optimizer_steps_and_every_gradient_is_cleared():
    """A linear probe whose body was left trainable: the optimizer holds only the head. Every step
    must start with no gradient anywhere in the model (the body's must not pile up from step to
    step), and max_grad_norm must clip the head's gradients by their own norm: each step equals the
    hand-written loop that clips and steps the head. Clipping over all of the model's gradients
    would shrink the head's steps by the body's (growing) norm."""
    data = DataLoader(blobs(64), batch_size=8)

    def probe():
        ptcourse.seed_everything(4)
        return mlp()
    ref = probe()
    opt = torch.optim.SGD(ref[2].parameters(), lr=0.5)
    for x, y in data:
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref[2].parameters(), 0.1)
        opt.step()
        ref.zero_grad(set_to_none=True)
    model, left = probe(), []

    def step_fn(m, batch):
        left.append([p.grad for p in m.parameters()])  # what the previous steps left behind
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
    ptcourse.fit(model, data, epochs=1, step_fn=step_fn, optimizer=torch.optim.SGD(model[2].parameters(), lr=0.5),
                 max_grad_norm=0.1, progress=False)
    assert len(left) == 8 and all(g is None for grads in left for g in grads)
    assert torch.equal(flat(model), flat(ref))
    assert torch.equal(model[0].weight, probe()[0].weight)  # the body, outside the optimizer, did not move


def test_step_fn_gets_the_model_itself_and_runs_inside_the_ddp_forward(two_fake_processes, monkeypatch):
    """Stands in for DistributedDataParallel under torchrun: a wrapper that, like DDP, has only its
    own attributes and notes when its forward is running. A step_fn that calls a submodule
    (``model.encoder(x)``) must get the model itself (not the wrapper, where the attribute is
    missing) and run inside the wrapper's forward: DDP prepares each step's gradient all-reduce in
    its forward, and a step that bypasses it trains without synchronising the gradients."""
    seen, Stop = two_fake_processes
    inside = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            inside.append(True)
            try:
                return self.module(*args, **kwargs)
            finally:
                inside.pop()
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)

    class EncoderHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    calls = []

    def step_fn(model, batch):
        calls.append((type(model).__name__, bool(inside)))
        return torch.nn.functional.cross_entropy(model.head(model.encoder(batch[0])), batch[1])
    with pytest.raises(Stop):  # at the first reading of the losses, after this process's 2 of the 4 batches
        ptcourse.fit(EncoderHead(), DataLoader(blobs(32), batch_size=8), epochs=1, step_fn=step_fn, progress=False)
    assert calls == [("EncoderHead", True)] * 2


def test_predict_computes_no_loss():
    """predict returns outputs and targets; it must not compute a loss from targets that are not
    class labels: regression values, a label per token, or labels outside the model's outputs; and
    a dataset without targets gives None."""
    x, y = blobs(16).tensors
    ids = torch.randint(0, 10, (16, 6))
    cases = [(torch.nn.Linear(8, 1), TensorDataset(x, x.sum(1))),                    # float targets
             (torch.nn.Embedding(10, 5), TensorDataset(ids, ids.roll(-1, dims=1))),  # [B, T] labels, [B, T, V] logits
             (torch.nn.Linear(8, 2), TensorDataset(x, y))]                           # labels up to 3, 2 outputs
    for model, data in cases:
        logits, targets = ptcourse.predict(model, DataLoader(data, batch_size=8))
        with torch.no_grad():
            assert torch.allclose(logits, model(data.tensors[0]))
        assert torch.equal(targets, data.tensors[1])
    logits, targets = ptcourse.predict(torch.nn.Linear(8, 3), DataLoader(TensorDataset(x), batch_size=8))
    assert logits.shape == (16, 3) and targets is None


def test_accumulation_windows_cover_every_batch_once():
    """Each optimizer step averages the batches of its window: the sizes fit's loss is divided by
    are the windows' real sizes (the last one of an epoch may be short), and each window steps once,
    at its last batch."""
    for grad_accum in range(1, 5):
        for n_batches in range(1, 12):
            windows, current = [], []
            for i in range(n_batches):
                size, steps_now = loop._accumulation_window(i, grad_accum, n_batches)
                current.append(size)
                if steps_now:
                    windows.append(current)
                    current = []
            assert current == [] and sum(len(w) for w in windows) == n_batches
            assert all(set(w) == {len(w)} and len(w) <= grad_accum for w in windows)
            assert all(len(w) == grad_accum for w in windows[:-1])


def test_progress_bar_counts_every_batch(monkeypatch):
    """The bar advances as the losses are read (every 10 steps and at each epoch's end)."""
    bars, make = [], loop._progress_bar
    monkeypatch.setattr(loop, "_progress_bar", lambda *a: bars.append(make(*a)) or bars[-1])
    loader = DataLoader(blobs(200), batch_size=8)
    ptcourse.fit(mlp(), loader, epochs=2, progress=True)
    assert bars[0].n == bars[0].total == 2 * len(loader)
    assert "loss" in bars[0].postfix and "val" not in bars[0].postfix
