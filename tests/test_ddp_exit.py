"""Leaving the process group at exit: no gloo worker thread may still hold a tensor of ours then.

gloo runs a collective on a worker thread that lets go of the tensors a moment after the caller saw
the collective finish. If that late release falls into interpreter shutdown, it needs the GIL to
free the Python tensor and the process aborts ("terminate called without an active exception").
"""
import threading
import time

import torch

from ptcourse import distributed


class _SlowWorker:
    """Stands in for gloo's worker thread: the collective is done at once (the caller goes on), but
    the thread keeps its (C++) reference to the tensor for ``linger`` seconds more. That reference is
    what ``Tensor._use_count`` counts; a Python thread cannot take one, so the stand-in patches
    ``_use_count`` to count the tensors it is holding."""

    def __init__(self, monkeypatch, linger=0.3):
        self.linger, self.threads, self.holding = linger, [], set()
        real = torch.Tensor._use_count
        monkeypatch.setattr(torch.Tensor, "_use_count", lambda t: real(t) + (id(t) in self.holding))
        monkeypatch.setattr(distributed.dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
        monkeypatch.setattr(distributed, "_HELD", [])

    def all_reduce(self, t, op=None):
        self.holding.add(id(t))

        def release():
            time.sleep(self.linger)
            self.holding.discard(id(t))
        worker = threading.Thread(target=release, daemon=True)
        worker.start()
        self.threads.append(worker)


def test_leave_waits_until_no_worker_thread_holds_a_collectives_tensor(monkeypatch):
    worker = _SlowWorker(monkeypatch)
    sums = distributed.all_sum(torch.zeros(3), world=2)
    flags = distributed.any_true(torch.zeros(2), world=2)
    assert distributed.held() == 2            # the worker threads still hold both tensors
    t0 = time.perf_counter()
    distributed.leave()
    assert time.perf_counter() - t0 >= 0.2    # leave waited for them ...
    assert sums._use_count() == 1 and flags._use_count() == 1   # ... until ours were the only references
    assert all(not w.is_alive() for w in worker.threads)
    assert distributed.held() == 0


def test_leave_gives_up_after_its_timeout(monkeypatch):
    _SlowWorker(monkeypatch, linger=5)
    distributed.all_sum(torch.zeros(1), world=2)
    t0 = time.perf_counter()
    distributed.leave(timeout=0.2)
    assert 0.2 <= time.perf_counter() - t0 < 2   # a stuck worker does not hang the exit


def test_only_the_newest_tensors_are_kept():
    saved = list(distributed._HELD)
    try:
        distributed._HELD.clear()
        for _ in range(40):
            distributed._hold(torch.zeros(1))
        assert len(distributed._HELD) == 16
    finally:
        distributed._HELD[:] = saved
