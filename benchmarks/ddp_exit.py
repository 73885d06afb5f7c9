"""The gloo exit abort, measured: what is still running when a DDP process exits, and a soak.

    python benchmarks/ddp_exit.py threads        # gloo threads after destroy_process_group, with and without DDP
    python benchmarks/ddp_exit.py soak -n 200 -j 4   # n torchrun runs of the DDP test's script, j at a time

``threads`` starts two gloo processes and prints, in rank 1, the threads alive after
``destroy_process_group``: with a plain all_reduce the group is freed and its threads end; once
``DistributedDataParallel`` has been built they survive into interpreter shutdown, so a tensor
released late by one of them can abort the process there (see ``ptcourse.distributed.leave``).
``soak`` counts exit statuses and "terminate called" lines over many runs of
``tests/_train_script.py`` (the DDP test's command), run side by side to load the machine.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = textwrap.dedent('''
    import gc, os, sys, torch, torch.distributed as dist
    def threads():
        return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    dist.init_process_group("gloo")
    t = torch.ones(3)
    dist.all_reduce(t)
    if sys.argv[1] == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
        model(torch.ones(2, 3)).sum().backward()
        del model
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    if os.environ["RANK"] == "1":
        print(f"{sys.argv[1]:>10}: threads after destroy_process_group: {threads()}", flush=True)
''')


def torchrun(args, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def threads():
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(PROBE)
        for mode in ("allreduce", "ddp"):
            run = torchrun([str(probe), mode])
            print(run.stdout.strip() or run.stderr[-2000:])


def soak(n, jobs):
    def one(i):
        with tempfile.TemporaryDirectory() as tmp:
            run = torchrun([str(ROOT / "tests" / "_train_script.py"), str(Path(tmp) / "ddp"), "--batch", "8",
                            "--no-shuffle", "--dropout", "0"])
            return run.returncode, "terminate called" in run.stderr, run.stderr[-1500:]
    t0, counts, aborts = time.time(), collections.Counter(), 0
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for code, terminated, tail in pool.map(one, range(n)):
            counts[code] += 1
            aborts += terminated
            if code != 0:
                print(f"exit {code}:\n{tail}\n", flush=True)
            done = sum(counts.values())
            if done % 10 == 0:
                print(f"  {done} runs so far: exit statuses {dict(counts)}", flush=True)
    load = os.getloadavg()[0]
    print(f"{n} runs, {jobs} at a time, {time.time() - t0:.0f} s, load {load:.1f} at the end: "
          f"exit statuses {dict(counts)}, 'terminate called' in {aborts}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["threads", "soak"])
    p.add_argument("-n", type=int, default=100)
    p.add_argument("-j", type=int, default=4)
    a = p.parse_args()
    threads() if a.what == "threads" else soak(a.n, a.j)
