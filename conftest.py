"""Test configuration shared by the unit tests and nbval.

Notebook kernels inherit this process's environment, so setting the variables here makes every
notebook run in the smoke profile, with results written outside the repository, even when the
caller set nothing.
"""
import os
import tempfile

os.environ.setdefault("PTCOURSE_PROFILE", "smoke")
os.environ.setdefault("PTCOURSE_RESULTS", os.path.join(tempfile.gettempdir(), "ptcourse-test-results"))
os.environ.setdefault("MPLBACKEND", "Agg")
# under pytest-xdist each worker gets a share of the cores instead of all of them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(share))


def pytest_collection_modifyitems(config, items):
    """Notebook cells (nbval) belong to the slow tier, like tests marked ``slow`` by hand."""
    import pytest
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
