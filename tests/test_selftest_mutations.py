"""Every selftest row must fail when the feature it names is broken, and only the rows that rely on
that feature may fail; unbroken, they pass.

Each test breaks one feature on purpose (a mutation) at a seam that stays put while the library
changes: torch's autocast, GradScaler and clip_grad_norm_, the checkpoint module's restore of the
random states, DistributedDataParallel and the distributed sampler. Rows that train in this process
get the mutation from ``monkeypatch``; rows that start worker processes (the kill-and-resume runs,
``torchrun``) start ``_selftest_mutant.py`` instead of the selftest module (``selftest.WORKER``),
which applies it there. The rows run on the device under test (see conftest.py).
"""
import contextlib
import functools
import re
from pathlib import Path

import pytest
import torch

from ptcourse.tools import selftest

IN_PROCESS = ("fp32", "bf16", "fp16", "fp16-skip", "channels-last")
WITH_WORKERS = ("resume", "resume-world", "ddp-gloo", "ddp-nccl")
MUTANT = Path(__file__).with_name("_selftest_mutant.py")
GradScaler = torch.amp.GradScaler          # the real one, before any test patches torch.amp


def run_rows(device, folder, keys) -> dict:
    """``{key: (status, detail)}`` of those rows among ``keys`` that run on ``device``."""
    results = {}
    for key, _, check in selftest.plan(device, folder, ddp=True):
        if key in keys and not isinstance(check, str):
            status, _, detail, why = selftest.run_check(check)
            results[key] = (status, why or detail)
    return results


def failed(results) -> set:
    return {key for key, (status, _) in results.items() if status == "FAIL"}


# ----------------------------------------------------------------------------- mutations in this process
def autocast_off(mp):
    mp.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())


def autocast_always_fp16(mp):
    """Autocast on, but in float16 whatever dtype was asked for."""
    real = torch.autocast

    def fp16(device_type, dtype=None, enabled=True, cache_enabled=None):
        return real(device_type, torch.float16, enabled, cache_enabled)
    mp.setattr(torch, "autocast", fp16)


def fp16_without_scaler(mp):
    """``fit`` gets a disabled GradScaler: the loss is not scaled, nothing is skipped."""
    mp.setattr(torch.amp, "GradScaler", functools.partial(GradScaler, enabled=False))


class _ClipsBeforeUnscaling(GradScaler):
    """The loop's explicit ``unscale_`` does nothing, so the gradients are clipped while still scaled
    and unscaled only inside ``step``."""

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer, *args, **kwargs):
        super().unscale_(optimizer)
        return super().step(optimizer, *args, **kwargs)


class _CannotTellASkippedStep(GradScaler):
    """The scale as read by the loop never changes, so a skipped step looks like a real one and the
    scheduler steps anyway. (This mirrors how ``fit`` tells a skipped step: the scale backs off.)"""

    def get_scale(self):
        return 2.0 ** 16


def clip_before_unscale(mp):
    mp.setattr(torch.amp, "GradScaler", _ClipsBeforeUnscaling)


def scheduler_steps_on_skipped_steps(mp):
    mp.setattr(torch.amp, "GradScaler", _CannotTellASkippedStep)


def no_clipping(mp):
    mp.setattr(torch.nn.utils, "clip_grad_norm_", lambda parameters, max_norm, *args, **kwargs: torch.tensor(0.0))


# mutation -> (the rows it must fail, a word from the failing reason of each of those rows)
IN_PROCESS_MUTATIONS = {
    "autocast off": (autocast_off, {"bf16": "autocast off", "fp16": "autocast off"}),
    "autocast in fp16 when bf16 is asked": (autocast_always_fp16, {"bf16": "matmul in float16"}),
    "fp16 without a GradScaler": (fp16_without_scaler, {"fp16": "without a GradScaler", "fp16-skip": ""}),
    "clipping before unscaling": (clip_before_unscale, {"fp16": "unscaled and clipped"}),
    "no clipping": (no_clipping, {"fp32": "unscaled and clipped", "bf16": "unscaled and clipped",
                                  "fp16": "unscaled and clipped"}),
    "scheduler steps on skipped steps": (scheduler_steps_on_skipped_steps, {"fp16-skip": "scheduler"}),
}


@pytest.fixture(scope="module")
def unmutated(device, tmp_path_factory):
    return run_rows(device, tmp_path_factory.mktemp("unmutated"), IN_PROCESS)


@pytest.mark.slow
def test_the_rows_pass_unmutated(unmutated):
    assert not failed(unmutated), unmutated
    assert {"fp32", "fp16", "fp16-skip", "channels-last"} <= set(unmutated)   # (bf16 is skipped on a T4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IN_PROCESS_MUTATIONS))
def test_a_broken_feature_fails_exactly_its_rows(name, device, tmp_path, monkeypatch, unmutated):
    mutate, must_fail = IN_PROCESS_MUTATIONS[name]
    mutate(monkeypatch)
    results = run_rows(device, tmp_path, IN_PROCESS)
    monkeypatch.undo()
    expected = set(must_fail) & set(results)              # a row skipped on this device cannot fail
    skips = int(re.search(r"\((\d+) skipped\)", unmutated["fp16"][1]).group(1))
    if name == "scheduler steps on skipped steps" and skips:
        expected.add("fp16")    # the fp16 row had overflow skips of its own: it must catch this too
    assert expected and failed(results) == expected, results
    for key in expected & set(must_fail):
        assert must_fail[key] in results[key][1], results[key]


# ----------------------------------------------------------------------------- mutations in the worker processes
WORKER_MUTATIONS = {
    "none": (set(), ""),
    "no-rng-restore": ({"resume"}, "largest difference"),
    "ddp-no-sync": ({"ddp-gloo", "ddp-nccl"}, "weights differ"),
    "ddp-no-shard": ({"ddp-gloo", "ddp-nccl"}, "apart"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mutation", list(WORKER_MUTATIONS))
def test_a_broken_worker_fails_exactly_its_rows(mutation, device, tmp_path, monkeypatch):
    """``none`` shows that starting the mutant script instead of the module changes nothing."""
    monkeypatch.setattr(selftest, "WORKER", [str(MUTANT), mutation])
    results = run_rows(device, tmp_path, WITH_WORKERS)
    must_fail, word = WORKER_MUTATIONS[mutation]
    expected = must_fail & set(results)
    assert failed(results) == expected, results
    assert all(word in results[key][1] for key in expected), results
    assert mutation != "none" or {"resume", "resume-world"} <= set(results)


@pytest.mark.slow
def test_a_resume_that_ignores_the_checkpoint_fails_the_other_world_size_row(device, tmp_path, monkeypatch):
    """In this process (where the 2-process checkpoint is resumed) ``fit`` starts afresh instead."""
    from ptcourse import checkpoint
    from ptcourse.history import History
    monkeypatch.setattr(checkpoint.Checkpointer, "resume", lambda self, epochs: (0, History()))
    results = run_rows(device, tmp_path, WITH_WORKERS)
    assert failed(results) == {"resume-world"}, results
    assert "did not resume" in results["resume-world"][1]


# ----------------------------------------------------------------------------- which rows run where
def test_bf16_runs_where_fit_would_choose_it_not_where_torch_says_supported(monkeypatch, tmp_path):
    """Stands in for a T4 (compute capability 7.5): torch reports bf16 support there, but fit picks
    fp16; the bf16 row must follow fit's rule (``runtime.best_precision``) and say why it skips."""
    from ptcourse import runtime
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    for choice, runs in (("fp16", False), ("bf16", True)):
        monkeypatch.setattr(runtime, "best_precision", lambda device: choice)
        rows = {key: check for key, _, check in selftest.plan(cuda, tmp_path)}
        assert callable(rows["bf16"]) is runs, rows["bf16"]
        assert callable(rows["fp16"])
        if not runs:
            assert "fit uses fp16" in rows["bf16"]


def test_on_one_gpu_the_nccl_row_says_nccl_was_not_tested(monkeypatch, tmp_path):
    from ptcourse import runtime
    monkeypatch.setattr(runtime, "best_precision", lambda device: "bf16")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rows = {key: check for key, _, check in selftest.plan(cuda, tmp_path)}
    assert callable(rows["ddp-gloo"]) and "NCCL not tested" in rows["ddp-nccl"] and "only gloo" in rows["ddp-nccl"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rows = {key: check for key, _, check in selftest.plan(cuda, tmp_path)}
    assert callable(rows["ddp-nccl"]) and isinstance(rows["ddp-gloo"], str)
    rows = {key: check for key, _, check in selftest.plan(torch.device("cpu"), tmp_path)}
    assert callable(rows["ddp-gloo"]) and "NCCL not tested" in rows["ddp-nccl"]


def test_the_nccl_row_fails_when_the_processes_used_another_backend(monkeypatch, tmp_path):
    """Stands in for torchrun on two GPUs whose processes fell back to gloo: the row names NCCL, so
    the backend the processes report must be NCCL."""
    import subprocess
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def fake_torchrun(n, kind, folder, *args, env=None):
        for rank in range(n):
            torch.save({"world": n, "params": torch.zeros(3), "val_acc": 1.0, "backend": "gloo", "device": "cpu"},
                       Path(folder) / f"ddp.rank{rank}")
        return subprocess.CompletedProcess(["torchrun"], 0, "", "")
    monkeypatch.setattr(selftest, "_torchrun", fake_torchrun)
    with pytest.raises(AssertionError, match=r"used \['gloo'\], not nccl"):
        selftest.check_ddp(torch.device("cuda"), tmp_path, "nccl")


@pytest.mark.cuda
def test_on_this_gpu_the_bf16_row_follows_the_compute_capability(tmp_path):
    """On a T4 (7.5) the bf16 row is skipped although torch reports bf16 support; from 8.0 it runs."""
    cuda = torch.device("cuda")
    rows = {key: check for key, _, check in selftest.plan(cuda, tmp_path)}
    assert callable(rows["bf16"]) is (torch.cuda.get_device_capability(cuda)[0] >= 8), rows["bf16"]
