"""The lab commands: `python -m ptcourse download` and `python -m ptcourse run`."""
import json
import os
import time

import nbformat
import numpy as np
import pytest

from ptcourse import data
from ptcourse.tools import lab
from ptcourse.__main__ import main as cli


def test_download_offline_reports_present_and_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PTCOURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data.write_dataset("mnist", {"train": (np.zeros((3, 28, 28), np.uint8), [0, 1, 2]),
                                 "test": (np.zeros((2, 28, 28), np.uint8), [0, 1])}, list("012"), "test")
    code = cli(["download", "mnist", "cifar10", "resnet18", "bert-base-uncased"])
    out = capsys.readouterr().out
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "present" in rows["mnist"]
    assert "missing" in rows["cifar10"] and "offline" in rows["cifar10"]
    assert "missing" in rows["ResNet18_Weights.IMAGENET1K_V1"] and "resnet18-f37072fd.pth" in out
    assert "missing" in rows["bert-base-uncased"]
    assert "3 item(s) missing" in out
    # idempotent and verifying: everything present -> exit 0; a damaged file -> reported
    assert cli(["download", "mnist"]) == 0
    (tmp_path / "data" / "mnist" / "test.npz").write_bytes(b"garbage")
    assert cli(["download", "mnist"]) == 1
    assert "damaged" in capsys.readouterr().out


def _code_of_notebooks():
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    cells = [c.source for d in ("chapters", "solutions") for p in sorted((root / d).glob("*.ipynb"))
             for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code"]
    return "\n".join(cells), re


def test_download_profiles_name_what_the_notebooks_need():
    # a lab runs `download --profile X` online once, then every notebook offline: whatever the notebooks'
    # code loads in profile X must be in X's lists (chapter 06 loads SST-2 in every profile)
    code, re = _code_of_notebooks()
    datasets = set(re.findall(r'data\.load\("(\w+)"', code))
    assert datasets >= {"mnist", "cifar10", "rotten_tomatoes", "sst2"}
    for profile in ("smoke", "cpu", "gpu"):
        assert datasets <= set(lab.DATASETS_FOR[profile]), (profile, datasets - set(lab.DATASETS_FOR[profile]))
        picked = set(re.findall(rf'\b{profile}="([\w.-]+/[\w.-]+|bert-[\w-]+)"', code))
        always = set(re.findall(r'from_pretrained\("([\w.-]+/[\w.-]+)"\)', code))
        assert picked and picked | always <= set(lab.HF_MODELS_FOR[profile]), (profile, picked | always)
    rows = lab.download(["imagenet"], "cpu", offline=True)
    assert rows[0][2] == "unknown"


def _notebook(path, code):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in code]
    nbformat.write(nb, path)


@pytest.mark.slow
def test_run_executes_records_skips_and_fails(tmp_path, capsys):
    (tmp_path / "chapters").mkdir()
    _notebook(tmp_path / "chapters" / "01_ok.ipynb",
              ["import os, ptcourse", "ptcourse.report('01_ok', {'acc': 0.75, 'profile': os.environ['PTCOURSE_PROFILE']})"])
    _notebook(tmp_path / "chapters" / "02_bad.ipynb", ["x = 1", "raise ValueError('broken on purpose')"])
    out = tmp_path / "runs"
    code = cli(["run", "--profile", "smoke", "--root", str(tmp_path), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    assert "chapters/01_ok.ipynb" in text and "passed" in text and "acc=0.75" in text
    assert "failed" in text and "broken on purpose" in text
    rec = json.loads((out / "results" / "01_ok.json").read_text())
    assert rec["metrics"]["profile"] == "smoke"
    executed = nbformat.read(out / "chapters" / "01_ok.ipynb", as_version=4)
    assert executed.cells[1].outputs  # the executed copy keeps its outputs
    # resumable: the passed notebook is skipped, the failed one runs again
    cli(["run", "01", "02", "--profile", "smoke", "--root", str(tmp_path), "--out", str(out)])
    text = capsys.readouterr().out
    assert "skip  chapters/01_ok.ipynb" in text and "run   chapters/02_bad.ipynb" in text
    assert cli(["run", "01", "--force", "--profile", "smoke", "--root", str(tmp_path), "--out", str(out)]) == 0
    assert "run   chapters/01_ok.ipynb" in capsys.readouterr().out
    assert cli(["run", "07", "--root", str(tmp_path), "--out", str(out)]) == 2


@pytest.mark.slow
def test_run_says_why_a_kernel_died_and_shows_a_native_crash(tmp_path, capsys):
    # a native crash (here a NULL read through ctypes) and an outside kill (what the out-of-memory
    # killer does) both end as "the kernel died"; the runner must say which, and where
    (tmp_path / "chapters").mkdir()
    _notebook(tmp_path / "chapters" / "01_segv.ipynb", ["x = 1", "import ctypes\nctypes.string_at(0)"])
    _notebook(tmp_path / "chapters" / "02_killed.ipynb", ["import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"])
    rows = lab.run_notebooks(lab.find_notebooks(tmp_path), "smoke", tmp_path / "runs", echo=lambda *a: None)
    segv, killed = rows
    assert segv["status"] == "failed" and "the kernel died in cell 1 (SIGSEGV" in segv["error"]
    assert "Fatal Python error: Segmentation fault" in segv["error"]        # faulthandler's traceback
    assert "string_at" in segv["error"]                                    # ... down to the call
    assert "the kernel died in cell 0 (SIGKILL" in killed["error"] and "out-of-memory" in killed["error"]
    assert "Fatal Python error" not in killed["error"]                     # no stale log from the first


def test_system_log_names_the_process_and_its_kill():
    # lines in the formats Linux writes (copied from this machine's dmesg after a real memory-cgroup
    # kill): only the lines about the given process come back, and SIGKILL is called what it was
    log = ("[55654.926346] oom-kill:constraint=CONSTRAINT_MEMCG,task_memcg=/x,task=python,pid=10958,uid=0\n"
           "[55654.926411] Memory cgroup out of memory: Killed process 10958 (python) anon-rss:1204172kB\n"
           "[55655.000001] Memory cgroup out of memory: Killed process 109580 (python) anon-rss:1kB\n"
           "[55656.000000] python[10958]: segfault at 0 ip 00007f00 sp 00007ffc error 4 in libc.so.6\n")
    said = lab.system_log(10958, read=lambda: log)
    assert len(said) == 3 and not any("109580" in line for line in said)
    assert lab.system_log(4321, read=lambda: log) == []
    assert lab.system_log(4321, read=lambda: (_ for _ in ()).throw(PermissionError("dmesg"))) == []


def _memory_cgroup(tmp_name: str, limit_bytes: int):
    """A memory cgroup (v1 or v2) limited to ``limit_bytes``: its folder, or None where this machine
    does not let us make one (not root, no writable cgroup file system)."""
    from pathlib import Path
    for root, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                             (Path("/sys/fs/cgroup"), "memory.max")):
        if not (root / "cgroup.procs").exists() or (limit_file == "memory.max"
                                                    and not (root / "cgroup.controllers").exists()):
            continue
        group = root / tmp_name
        try:
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(limit_bytes))
            return group
        except OSError:
            if group.exists():
                group.rmdir()
    return None


@pytest.mark.slow
def test_run_names_an_out_of_memory_kill_from_the_system_log(tmp_path):
    # The real thing a student meets on a laptop or Colab: the kernel's memory outgrows what the
    # machine has and the kernel is SIGKILLed. Here the "machine" is a 1.5 GB memory cgroup around
    # the runner and its kernel; the kernel allocates more (it must outgrow the runner, or the killer
    # picks the runner, the larger process). Where no cgroup can be made (not root),
    # test_system_log_names_the_process_and_its_kill covers the log reading alone.
    import subprocess
    import sys
    group = _memory_cgroup(f"ptcourse-test-{os.getpid()}", 1500 * 2**20)
    if group is None:
        pytest.skip("cannot create a memory cgroup here (needs root and a writable /sys/fs/cgroup)")
    (tmp_path / "chapters").mkdir()
    _notebook(tmp_path / "chapters" / "01_hog.ipynb",
              ["x = 1", "blocks = [b\"x\" * 64 * 2**20 for _ in range(40)]   # 2.5 GB, every page written"])
    driver = (f"from pathlib import Path\nfrom ptcourse.tools import lab\n"
              f"rows = lab.run_notebooks([Path({str(tmp_path / 'chapters' / '01_hog.ipynb')!r})], 'smoke', "
              f"Path({str(tmp_path / 'runs')!r}), echo=lambda *a: None)\nprint(rows[0]['error'])")
    try:
        proc = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"',
                               sys.executable, driver], capture_output=True, text=True, timeout=120)
    finally:
        for _ in range(50):     # the group can be removed once its last process is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)
    assert "the kernel died in cell 1 (SIGKILL: killed by the out-of-memory killer" in proc.stdout, proc.stderr[-2000:]
    assert "system log:" in proc.stdout and "Killed process" in proc.stdout


def test_crash_logs_reach_a_kernel_whose_stderr_is_discarded(tmp_path, monkeypatch):
    # nbval starts kernels with stderr=/dev/null; conftest.py gives them this environment, so a
    # native crash in a notebook under CI still leaves its traceback in a file
    from jupyter_client.manager import start_new_kernel
    import os
    for name, value in lab.kernel_crash_logs(tmp_path).items():
        monkeypatch.setenv(name, value)
    km, kc = start_new_kernel(kernel_name="python3", stderr=open(os.devnull, "w"))
    try:
        kc.execute("import faulthandler; assert faulthandler.is_enabled()\nimport ctypes; ctypes.string_at(0)")
        for _ in range(100):
            if not km.is_alive():
                break
            time.sleep(0.1)
        assert not km.is_alive()
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    assert "Segmentation fault" in lab.crash_report(tmp_path)


@pytest.mark.slow
def test_nbval_report_of_a_crashed_kernel_shows_the_crash(tmp_path):
    # the CI path: nbval runs a notebook whose kernel segfaults; conftest.py must put the crash's
    # traceback into the failure report (nbval itself discards the kernel's stderr)
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    _notebook(tmp_path / "crash.ipynb", ["x = 1", "import ctypes\nctypes.string_at(0)"])
    env = {k: v for k, v in os.environ.items() if k != "IPYTHONDIR"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "--nbval-lax", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-o", "addopts=", str(tmp_path / "crash.ipynb")],   # the cell timeout stays 2000 s
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "the kernel died while running this cell (SIGSEGV" in proc.stdout     # at once, not after the timeout
    assert "kernel crash (faulthandler)" in proc.stdout and "Segmentation fault" in proc.stdout
    assert "string_at" in proc.stdout
