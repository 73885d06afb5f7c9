"""Running the course in a lab: fill the caches once, then check every notebook headlessly.

    python -m ptcourse download --profile cpu     # datasets + pretrained weights for that profile
    python -m ptcourse run --profile smoke        # execute every notebook, print a summary table

A lab fills a shared folder once (``PTCOURSE_DATA`` for datasets, ``HF_HUB_CACHE`` and
``TORCH_HOME`` for weights) and points every machine at it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import data
from ..results import fmt

# what each profile's notebooks need
# (tests/test_lab.py checks these lists against the dataset and model names in the notebooks' code)
DATASETS_FOR = {"smoke": ["mnist", "cifar10", "rotten_tomatoes", "sst2"],
                "cpu": ["mnist", "cifar10", "rotten_tomatoes", "sst2"],
                "gpu": ["mnist", "cifar10", "rotten_tomatoes", "sst2"]}
HF_MODELS_FOR = {"smoke": ["sentence-transformers/all-MiniLM-L6-v2"],
                 "cpu": ["sentence-transformers/all-MiniLM-L6-v2"],
                 "gpu": ["sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L12-v2",
                         "bert-base-uncased"]}
TORCHVISION_WEIGHTS = ["ResNet18_Weights.IMAGENET1K_V1"]


def _dataset(name: str, offline: bool) -> tuple[str, str]:
    present = all(data.cached(name).values())
    if not present:
        if offline:
            return "missing", f"not in {data.data_dir() / name} (offline: nothing downloaded)"
        try:
            data.download(name)
        except data.DatasetMissingError as err:
            return "missing", str(err).split("\n")[0]
    problems = data.verify(name)
    if problems:
        return "damaged", "; ".join(problems)
    return ("present" if present else "downloaded"), str(data.data_dir() / name)


def _hf_model(repo: str, offline: bool) -> tuple[str, str]:
    from huggingface_hub import snapshot_download

    try:
        return "present", snapshot_download(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: fall through to a download
        pass
    if offline:
        return "missing", "not in the Hugging Face cache (HF_HUB_CACHE) and HF_HUB_OFFLINE is set"
    try:
        return "downloaded", snapshot_download(repo, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except Exception as err:  # noqa: BLE001
        return "missing", f"download failed: {type(err).__name__}: {str(err)[:150]}"


def _torchvision_weights(spec: str, offline: bool) -> tuple[str, str]:
    import torch
    import torchvision

    enum_name, member = spec.split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if path.exists():
        return "present", str(path)
    if offline:
        return "missing", f"not at {path} (offline: copy {path.name} there, or set TORCH_HOME)"
    try:
        weights.get_state_dict(progress=True)
        return "downloaded", str(path)
    except Exception as err:  # noqa: BLE001
        return "missing", f"download from {weights.url} failed: {type(err).__name__}: {str(err)[:150]}"


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode (``1``, ``true``, ``yes``, ``on``, any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(names=None, profile_name: str = "cpu", offline: bool | None = None) -> list[tuple]:
    """Fill the caches for ``profile_name`` (or just ``names``); return ``(name, kind, status, where)`` rows.

    Idempotent: what is present is only verified. Offline (``HF_HUB_OFFLINE=1``) nothing is
    downloaded and the rows say exactly what is missing.
    """
    if offline is None:
        offline = hf_offline()
    wanted = list(names) if names else (DATASETS_FOR[profile_name] + HF_MODELS_FOR[profile_name]
                                        + TORCHVISION_WEIGHTS)
    rows = []
    for name in wanted:
        if name in data.DATASETS:
            rows.append((name, "dataset", *_dataset(name, offline)))
        elif name.startswith("ResNet") or name == "resnet18":
            spec = TORCHVISION_WEIGHTS[0] if name == "resnet18" else name
            rows.append((spec, "torchvision weights", *_torchvision_weights(spec, offline)))
        elif "/" in name or name.startswith("bert"):
            rows.append((name, "Hugging Face model", *_hf_model(name, offline)))
        else:
            rows.append((name, "?", "unknown", f"not a dataset ({', '.join(data.DATASETS)}), "
                         "Hugging Face model id or torchvision weights name"))
    return rows


# ----------------------------------------------------------------------------- run
def find_notebooks(root: Path, names=None) -> list[Path]:
    """The notebooks to run: ``names`` (paths or chapter numbers like ``01``), else chapters + solutions."""
    if not names:
        return sorted((root / "chapters").glob("*.ipynb")) + sorted((root / "solutions").glob("*.ipynb"))
    out = []
    for name in names:
        p = Path(name)
        if p.suffix == ".ipynb":
            if not p.exists():
                raise FileNotFoundError(f"no notebook {p}")
            out.append(p.resolve())
        else:
            matches = sorted((root / "chapters").glob(f"{name}*.ipynb"))
            if not matches:
                raise FileNotFoundError(f"no chapter notebook starting with {name!r} in {root / 'chapters'}")
            out += matches
    return out


def kernel_crash_logs(folder) -> dict:
    """Environment variables under which a kernel writes the traceback of a native crash to ``folder``.

    A kernel that crashes in native code (a segmentation fault in a C extension) dies without a
    Python traceback: the notebook only says that the kernel died, and nbval even discards the
    kernel's stderr. Kernels started with this environment run an IPython startup file that turns
    on :mod:`faulthandler`, writing into ``folder/kernel-<pid>.log``; :func:`crash_report` reads
    them back.

    Example:
        >>> os.environ.update(kernel_crash_logs(tmp))     # then start kernels (nbclient, nbval)
        >>> print(crash_report(tmp))                      # after one died
    """
    folder = Path(folder).resolve()
    startup = folder / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-crash-log.py").write_text(
        "# written by ptcourse.tools.lab.kernel_crash_logs: a native crash leaves its traceback here\n"
        "import faulthandler as _fh, os as _os\n"
        f"_fh.enable(open(_os.path.join({str(folder)!r}, f'kernel-{{_os.getpid()}}.log'), 'w'))\n"
        "del _fh, _os\n")
    return {"IPYTHONDIR": str(folder / "ipython")}


def crash_report(folder, max_lines: int = 25) -> str:
    """The crashes logged in ``folder`` (see :func:`kernel_crash_logs`): for each, the error and the
    stack of the thread that crashed (the cell's code is in it); the whole log is in the file."""
    texts = []
    for log in sorted(Path(folder).glob("kernel-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        if not lines:
            continue
        start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 1)
        stack = lines[start:]
        stack = stack[:stack.index("")] if "" in stack else stack
        cell = next((i for i, line in enumerate(stack) if "/ipykernel_" in line), None)
        stack = stack if cell is None else stack[:cell + 1]      # down to the cell; the kernel's own frames after
        texts.append("\n".join([lines[0], *stack[:max_lines], f"(all threads: {log})"]))
    return "\n".join(texts)


def system_log(pid: int, read=None) -> list[str]:
    """What the operating system's log (Linux ``dmesg``) says about process ``pid``.

    The out-of-memory killer names the process it kills there ("Out of memory: Killed process 4321
    (python) ..."), so a SIGKILL's cause can be shown instead of guessed. Empty where nothing is said
    or the log cannot be read (many systems let only root read it). ``read`` returns the log's text
    (default: run ``dmesg``).

    Example:
        >>> system_log(4321, read=lambda: "[9.1] Out of memory: Killed process 4321 (python) anon-rss:9GB")
        ['[9.1] Out of memory: Killed process 4321 (python) anon-rss:9GB']
    """
    import re
    import subprocess

    def dmesg():
        return subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout

    try:
        text = (read or dmesg)()
    except (OSError, subprocess.SubprocessError):
        return []
    mentions = re.compile(rf"(Killed process {pid}\b|\bpid={pid}\b|\[{pid}\]:)")
    return [line for line in text.splitlines() if mentions.search(line)]


def why_dead(kernel_manager) -> str:
    """Why the kernel of a ``jupyter_client`` kernel manager died, in words: its exit code or the signal
    that killed it, what to do, and what the system log says about its process (an out-of-memory kill
    is named there, see :func:`system_log`)."""
    import re
    import signal
    process = getattr(getattr(kernel_manager, "provisioner", None), "process", None)
    exit_code = process.poll() if process is not None else None
    if exit_code is None or exit_code >= 0:
        return f"exit code {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    said = system_log(process.pid)
    oom = any(re.search(r"out of memory|oom[-_]kill", line, re.IGNORECASE) for line in said)
    advice = {"SIGKILL": ("killed by the out-of-memory killer: close other notebooks or use a smaller profile"
                          if oom else "killed from outside, most often by the out-of-memory killer: check "
                          "`dmesg`, close other notebooks or use a smaller profile"),
              "SIGSEGV": "a crash in native code: the traceback of the crash is below"}
    text = f"{name}: {advice.get(name, 'killed by a signal')}"
    return text + "".join(f"\n  system log: {line.strip()}" for line in said[-3:])


def run_notebooks(notebooks, profile_name: str, out_dir: Path, force: bool = False, timeout: int = 1800,
                  echo=print) -> list[dict]:
    """Execute notebooks in fresh kernels; executed copies and ``status.json`` go to ``out_dir``.

    ``timeout`` bounds each cell (seconds): a cell that runs longer fails the notebook.

    Notebooks recorded as passed in ``status.json`` (same profile) are skipped unless ``force``.
    """
    import nbformat

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    status_path = out_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    results_dir = out_dir / "results"
    env_before = dict(os.environ)
    crash_dir = out_dir / "kernel-logs"
    os.environ.update(PTCOURSE_PROFILE=profile_name, PTCOURSE_RESULTS=str(results_dir.resolve()),
                      **kernel_crash_logs(crash_dir))
    rows = []
    try:
        for path in notebooks:
            key = f"{path.parent.name}/{path.name}"
            prev = status.get(key)
            if prev and prev["status"] == "passed" and prev["profile"] == profile_name and not force:
                rows.append({**prev, "notebook": key, "skipped": True})
                echo(f"skip  {key} (passed before; --force to rerun)")
                continue
            echo(f"run   {key} ({profile_name}) ...")
            nb = nbformat.read(path, as_version=4)
            t0 = time.time()
            error, _ = execute(nb, path, timeout, crash_dir)
            dest = out_dir / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, dest)
            row = {"notebook": key, "profile": profile_name, "status": "failed" if error else "passed",
                   "wall_s": round(time.time() - t0, 1), "error": error, "output": str(dest)}
            status[key] = row
            status_path.write_text(json.dumps(status, indent=2))
            rows.append(row)
            echo(f"      {row['status']} in {row['wall_s']:.0f} s" + (f": {error}" if error else ""))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return rows


def execute(nb, path: Path, timeout: int, crash_dir: Path, **client_options):
    """Run ``nb`` (read from ``path``) in a fresh kernel in the notebook's folder.

    Returns ``(error, client)``: ``error`` is ``None`` if every cell ran, else why not (the failing
    cell and its error, a dead kernel's cause and native crash report, a timeout); ``client`` is the
    ``nbclient.NotebookClient`` (its widget state, for instance). ``client_options`` go to it."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    progress = {"cell": None, "km": None}
    for old in crash_dir.glob("kernel-*.log"):
        old.unlink()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_notebook_start=lambda notebook: progress.update(km=client.km),
                            on_cell_start=lambda cell, cell_index: progress.update(cell=cell_index),
                            **client_options)
    error = None
    try:
        client.execute()
    except CellExecutionError as err:
        error = f"cell {progress['cell']}: {err.ename}: {err.evalue}"[:500]
    except DeadKernelError:
        crash = crash_report(crash_dir)
        error = f"the kernel died in cell {progress['cell']} ({why_dead(progress['km'])})" + (f"\n{crash}" if crash else "")
    except Exception as err:  # noqa: BLE001 - a timeout, a kernel that did not start, ...
        error = f"{type(err).__name__} in cell {progress['cell']}: {err}"[:500]
    return error, client


def summary(rows, results_dir: Path) -> str:
    """A table: notebook, status, wall time, and the chapter's recorded results in brief."""
    recorded = {}
    for p in Path(results_dir).glob("*.json"):
        rec = json.loads(p.read_text())
        recorded[rec["chapter"]] = rec["metrics"]
    lines = [f"{'notebook':42s} {'status':8s} {'wall s':>7s}  results"]
    for r in rows:
        stem = Path(r["notebook"]).stem
        metrics = recorded.get(stem, {}) if r["notebook"].startswith("chapters/") else {}
        brief = ", ".join(f"{k}={fmt(v, max_items=4)}" for k, v in list(metrics.items())[:4])
        status = r["status"] + (" (skip)" if r.get("skipped") else "")
        lines.append(f"{r['notebook']:42s} {status:8s} {r['wall_s']:7.0f}  {brief}")
    return "\n".join(lines)
