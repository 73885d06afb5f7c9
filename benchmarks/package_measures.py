"""How big is the library a student reads, how long is ``fit``, and what does ``import ptcourse`` cost?

    python benchmarks/package_measures.py

Prints: lines of the student-facing package (the core plus the chapter helpers, without the
exercise checks and the tooling), lines of ``fit``, and the seconds that ``import ptcourse`` (and
the first ``ptcourse.profile()``) add to ``import torch`` (median of interleaved fresh processes).
"""
from __future__ import annotations

import ast
import statistics
import subprocess
import sys
import time
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ptcourse"


def lines(paths) -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in paths)


def fit_lines() -> int:
    tree = ast.parse((PKG / "loop.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    return node.end_lineno - node.lineno + 1


def seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main(rounds: int = 7) -> None:
    core = sorted(PKG.glob("*.py"))
    chapters = sorted((PKG / "chapters").glob("*.py"))
    print(f"core ({len(core)} files, ptcourse/*.py)          {lines(core):6d} lines")
    print(f"chapter helpers (ptcourse/chapters/)      {lines(chapters):6d} lines")
    print(f"student-facing package (core + chapters)  {lines(core + chapters):6d} lines")
    print(f"checks (ptcourse/checks/)                 {lines(sorted((PKG / 'checks').glob('*.py'))):6d} lines")
    print(f"tooling (ptcourse/tools/)                 {lines(sorted((PKG / 'tools').glob('*.py'))):6d} lines")
    print(f"fit                                       {fit_lines():6d} lines")
    codes = {"torch": "import torch", "torch + ptcourse": "import torch, ptcourse",
             "torch + ptcourse + profile()": "import torch, ptcourse; ptcourse.profile()"}
    times = {k: [] for k in codes}
    seconds("import torch")  # warm the file cache
    for _ in range(rounds):
        for k, code in codes.items():
            times[k].append(seconds(code))
    base = statistics.median(times["torch"])
    for k, ts in times.items():
        med = statistics.median(ts)
        extra = "" if k == "torch" else f"  (+{med - base:.3f} s over import torch)"
        print(f"{k:30s} {med:.3f} s median of {rounds}{extra}")


if __name__ == "__main__":
    main()
