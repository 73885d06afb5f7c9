"""Does a notebook kernel die or hang now and then? Run a sequence of notebooks again and again.

Issue 12, item 10: executing chapter 05 in the smoke profile right after chapters 00 and 03 (one
process starting the kernels one after the other, as nbval does), the kernel died in 2 of 16 runs
and a cpu run once hung. A failure that rare needs many repeats to show or to rule out, so this
script repeats the sequence in fresh kernels (``ptcourse.tools.lab.run_notebooks``, which names the
signal and the native traceback of a kernel that dies) and counts what happened:

    passed   every cell ran
    died     the kernel process ended during a cell (DeadKernelError)
    hung     a cell went past ``--cell-timeout`` (a lost reply waits forever otherwise)
    failed   a cell raised (a bug, not the kernel)

With ``--loops 2`` two sequences run side by side (as ``pytest -n 2`` does in CI); the figures
then include the load that comes with it. Prints the ipykernel, jupyter_client and pyzmq versions,
since a kernel that stops answering is a property of those.

Usage::

    python benchmarks/kernel_soak.py --minutes 25 --loops 2
    python benchmarks/kernel_soak.py --notebooks chapters/05_knowledge_distillation.ipynb --rounds 10

To compare versions of the course, ``--checkout`` runs the notebooks of another checkout (say a
``git worktree`` of an older commit) with that checkout's ``ptcourse`` imported in the kernels; the
driver stays this one. To compare kernels, run the script with the Python of another virtual
environment: kernels start with the interpreter that runs the script::

    git worktree add /tmp/old <commit>
    /path/to/other-venv/bin/python benchmarks/kernel_soak.py --checkout /tmp/old --loops 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["chapters/00_getting_started.ipynb", "chapters/03_bert_finetuning.ipynb",
           "chapters/05_knowledge_distillation.ipynb"]


def outcome(row: dict) -> str:
    """passed / died / hung / failed, from a row of ``run_notebooks``."""
    error = row["error"] or ""
    if row["status"] == "passed":
        return "passed"
    if "kernel died" in error:
        return "died"
    if "Timeout" in error or "timed out" in error:
        return "hung"
    return "failed"


def slowest_cell(executed: str) -> tuple[int | None, float]:
    """(index, seconds) of the slowest code cell of an executed notebook, from nbclient's timestamps:
    a run much slower than the others shows where it stalled."""
    import json
    from datetime import datetime
    try:
        cells = json.loads(Path(executed).read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None, 0.0
    best = (None, 0.0)
    for i, cell in enumerate(cells):
        ex = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            took = (datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
                    - datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
            best = max(best, (i, took), key=lambda b: b[1])
    return best


def loop(worker: int, notebooks: list[str], profile: str, deadline: float, rounds: int, cell_timeout: int,
         queue, checkout: Path = ROOT) -> None:
    """One sequence after another until the deadline or the round count; each row goes to ``queue``."""
    from ptcourse.tools import lab
    if checkout != ROOT:    # the kernels import the other checkout's ptcourse (this process keeps its own)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    paths = [checkout / nb for nb in notebooks]
    done = 0
    while time.time() < deadline and (rounds <= 0 or done < rounds):
        with tempfile.TemporaryDirectory(prefix=f"soak{worker}-") as out:
            rows = lab.run_notebooks(paths, profile, Path(out), force=True, timeout=cell_timeout,
                                     echo=lambda *_: None)
            slowest = [slowest_cell(row["output"]) for row in rows]
        for row, (cell, took) in zip(rows, slowest):
            queue.put((worker, done, row["notebook"], outcome(row), row["wall_s"], cell, took, row["error"]))
        done += 1
    queue.put(None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notebooks", nargs="+", default=DEFAULT)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--minutes", type=float, default=20.0, help="stop starting new rounds after this long")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per loop (0: until --minutes)")
    ap.add_argument("--loops", type=int, default=1, help="sequences running side by side")
    ap.add_argument("--cell-timeout", type=int, default=300, help="seconds before a cell counts as hung")
    ap.add_argument("--checkout", type=Path, default=ROOT,
                    help="run the notebooks (and ptcourse) of this checkout of the course, e.g. an old commit's worktree")
    args = ap.parse_args(argv)
    args.checkout = args.checkout.resolve()

    print("ipykernel", version("ipykernel"), "| jupyter_client", version("jupyter_client"),
          "| pyzmq", version("pyzmq"), "| nbclient", version("nbclient"), "| torch", version("torch"))
    if args.checkout != ROOT:
        print("notebooks and kernel-side ptcourse from", args.checkout)
    print(f"load average at the start: {os.getloadavg()[0]:.1f}; {args.loops} loop(s), profile {args.profile}")
    deadline = time.time() + 60 * args.minutes
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=loop, args=(w, args.notebooks, args.profile, deadline, args.rounds,
                                            args.cell_timeout, queue, args.checkout))
             for w in range(args.loops)]
    for p in procs:
        p.start()
    counts, walls, finished = Counter(), {}, 0
    while finished < len(procs):
        item = queue.get()
        if item is None:
            finished += 1
            continue
        worker, rnd, nb, what, wall, cell, took, error = item
        counts[(nb, what)] += 1
        walls.setdefault(nb, []).append(wall)
        print(f"loop {worker} round {rnd:2d}  {nb:45s} {what:7s} {wall:6.0f} s  slowest cell {cell}: {took:5.0f} s"
              + (f"  {error}" if error else ""), flush=True)
    for p in procs:
        p.join()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'notebook':45s} {'runs':>5s} {'passed':>7s} {'died':>5s} {'hung':>5s} {'failed':>7s} {'median s':>9s}")
    for nb in args.notebooks:
        key = f"{Path(nb).parent.name}/{Path(nb).name}"
        n = sum(counts[(key, w)] for w in ("passed", "died", "hung", "failed"))
        med = statistics.median(walls.get(key, [0]))
        print(f"{key:45s} {n:5d} {counts[(key, 'passed')]:7d} {counts[(key, 'died')]:5d} "
              f"{counts[(key, 'hung')]:5d} {counts[(key, 'failed')]:7d} {med:9.0f}")
    bad = sum(v for (nb, w), v in counts.items() if w != "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
