"""Test configuration shared by the unit tests and nbval.

Notebook kernels inherit this process's environment, so setting the variables here makes every
notebook run in the smoke profile, with results written outside the repository, even when the
caller set nothing.

The device under test is ``PTCOURSE_TEST_DEVICE`` (``cuda``, ``cpu``, ``mps``), else the best one
here (CUDA when available): it becomes ``PTCOURSE_DEVICE``, which ``fit``, ``evaluate``, notebooks
and subprocesses follow, and the ``device`` fixture. Tests marked ``cuda`` need a CUDA GPU and are
skipped without one.
"""
import atexit
import os
import shutil
import tempfile
import time

import pytest

os.environ.setdefault("PTCOURSE_PROFILE", "smoke")
os.environ.setdefault("PTCOURSE_RESULTS", os.path.join(tempfile.gettempdir(), "ptcourse-test-results"))
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PTCOURSE_TEST_DEVICE"):
    os.environ["PTCOURSE_DEVICE"] = os.environ["PTCOURSE_TEST_DEVICE"]
# nbval discards a kernel's stderr: a kernel that crashes in native code would die without a trace.
# Kernels started under pytest write faulthandler's traceback to a file instead (shown on failure).
from ptcourse.tools.lab import crash_report, kernel_crash_logs, why_dead  # noqa: E402

KERNEL_LOGS = tempfile.mkdtemp(prefix="ptcourse-kernel-logs-")
atexit.register(shutil.rmtree, KERNEL_LOGS, ignore_errors=True)
os.environ.update(kernel_crash_logs(KERNEL_LOGS))
# under pytest-xdist each worker gets a share of the cores instead of all of them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(share))


def _fail_fast_when_a_kernel_dies():
    """nbval waits for a cell's reply for the whole cell timeout even when the kernel has died (33 min
    by default; --nbval-cell-timeout in pyproject.toml lowers it). Wait in one-second slices instead and
    fail at once, saying how the kernel died, when it is gone."""
    from queue import Empty

    from nbval.kernel import RunningKernel
    wait = RunningKernel.await_reply

    def await_reply(self, msg_id, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                return wait(self, msg_id, timeout=left)
            except Empty:
                if not self.is_alive():
                    raise RuntimeError(f"the kernel died while running this cell ({why_dead(self.km)})") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    RunningKernel.await_reply = await_reply


_fail_fast_when_a_kernel_dies()


def pytest_configure(config):
    wanted = os.environ.get("PTCOURSE_TEST_DEVICE", "")
    if wanted.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"PTCOURSE_TEST_DEVICE={wanted}, but torch {torch.__version__} sees no CUDA GPU "
                                    f"(torch.version.cuda={torch.version.cuda}).")


@pytest.fixture(scope="session")
def device():
    """The device under test: ``PTCOURSE_TEST_DEVICE``, else CUDA when available, else MPS, else the CPU."""
    from ptcourse.runtime import best_device
    return best_device()


def pytest_collection_modifyitems(config, items):
    """Notebook cells (nbval) belong to the slow tier, like tests marked ``slow`` by hand; tests
    marked ``cuda`` are skipped where torch sees no CUDA GPU."""
    import torch
    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
        if no_cuda is not None and item.get_closest_marker("cuda"):
            item.add_marker(no_cuda)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed notebook cell whose kernel crashed gets the crash's traceback in its report."""
    report = (yield).get_result()
    if report.failed and str(item.fspath).endswith(".ipynb"):
        crash = crash_report(KERNEL_LOGS)
        if crash:
            report.sections.append(("kernel crash (faulthandler)", crash))
