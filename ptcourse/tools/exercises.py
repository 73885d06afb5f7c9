"""Generate ``exercises/`` from ``solutions/`` (the single source), nbgrader style.

In a solutions notebook, solution code sits between ``### BEGIN SOLUTION`` and
``### END SOLUTION``. The first line inside may be ``### HINT: <one line>``. Each region
becomes a stub in the exercise notebook::

    raise NotImplementedError("Exercise 2: <hint>")

with the indentation of the region, everything else kept. In markdown cells (review
questions) a region becomes "*Your answer here.*". Outputs and execution counts are
stripped from both. The first cell of every notebook is the standard setup cell.

Usage::

    python -m ptcourse.exercises build     # write exercises/ from solutions/
    python -m ptcourse.exercises check     # exit 1 if exercises/ is out of date (or: build --check)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .meta import SETUP_CELL

BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"
ROOT = Path(__file__).resolve().parents[2]


def _lines(cell) -> list[str]:
    src = cell["source"]
    return (src if isinstance(src, str) else "".join(src)).split("\n")


def stub_source(source: str, counter: list[int], markdown: bool = False) -> str:
    """Replace every solution region of one cell's source; ``counter[0]`` numbers the exercises."""
    out, inside, indent, hint = [], False, "", ""
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"nested {BEGIN} in:\n{source}")
            inside, indent, hint = True, line[: len(line) - len(line.lstrip())], ""
            continue
        if stripped == END:
            if not inside:
                raise ValueError(f"{END} without {BEGIN} in:\n{source}")
            inside = False
            if markdown:
                out.append(f"{indent}*Your answer here.*")
            else:
                counter[0] += 1
                msg = f"Exercise {counter[0]}: {hint or 'write your code here'}"
                out.append(f"{indent}raise NotImplementedError({json.dumps(msg, ensure_ascii=False)})")
            continue
        if inside:
            if stripped.startswith(HINT) and not hint:
                hint = stripped[len(HINT):].strip()
            continue
        out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END} in:\n{source}")
    return "\n".join(out)


def clean(nb: dict) -> dict:
    """Strip outputs, execution counts and volatile metadata from a notebook (in place)."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    return nb


def to_exercise(nb: dict) -> dict:
    nb = json.loads(json.dumps(nb))
    counter = [0]
    for cell in nb["cells"]:
        src = "\n".join(_lines(cell))
        if BEGIN in src:
            cell["source"] = stub_source(src, counter, markdown=cell["cell_type"] == "markdown")
    if counter[0] == 0:
        raise ValueError("a solutions notebook without any '### BEGIN SOLUTION' region")
    return clean(nb)


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def build(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, compare) every exercise notebook; return the stale ones."""
    stale = []
    for src in sorted((root / "solutions").glob("*.ipynb")):
        nb = json.loads(src.read_text(encoding="utf-8"))
        text = dumps(to_exercise(nb))
        dest = root / "exercises" / src.name
        if not dest.exists() or dest.read_text(encoding="utf-8") != text:
            stale.append(dest)
            if not check:
                dest.parent.mkdir(exist_ok=True)
                dest.write_text(text, encoding="utf-8")
    names = {p.name for p in (root / "solutions").glob("*.ipynb")}
    stale += [p for p in sorted((root / "exercises").glob("*.ipynb")) if p.name not in names]
    return stale


def setup_cell_problems(root: Path = ROOT) -> list[str]:
    """Notebooks whose first cell is not the standard setup cell of ``ptcourse._meta``."""
    bad = []
    for folder in ("chapters", "solutions", "exercises"):
        for path in sorted((root / folder).glob("*.ipynb")):
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
            first = next((c for c in cells if c["cell_type"] == "code"), None)
            if first is None or "\n".join(_lines(first)).strip() != SETUP_CELL.strip():
                bad.append(str(path.relative_to(root)))
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptcourse exercises", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--check", action="store_true", help="same as the 'check' command: write nothing, "
                        "exit 1 when exercises/ is out of date")
    args = parser.parse_args(argv)
    checking = args.command == "check" or args.check
    stale = build(check=checking)
    if checking:
        if stale:
            print("exercises/ is out of date for: " + ", ".join(p.name for p in stale) +
                  "\nRun: python -m ptcourse exercises build")
            return 1
        print("exercises/ is up to date.")
        return 0
    print(f"wrote {len(stale)} exercise notebook(s)" + (": " + ", ".join(p.name for p in stale) if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
