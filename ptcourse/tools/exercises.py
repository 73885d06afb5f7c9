"""Generate ``exercises/`` from ``solutions/`` (the single source), nbgrader style.

In a solutions notebook, solution code sits between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nbgrader's markers). Lines inside a region that start with

* ``### TASK: <what to do>`` give the stub's message: say *what* to write, never *how*;
* ``### HINT 1: <a nudge>``, ``### HINT 2: <a stronger hint>`` (more numbers allowed) become
  collapsed ``<details>`` blocks in a markdown cell generated right after the task's cell, so
  the student chooses when to open them. The old ``### HINT: <text>`` still works: it is Hint 1.

Each code region becomes a stub with the indentation of the region, everything else kept::

    raise NotImplementedError("<the TASK text>")      # or "Task N: write this part" without one

In markdown cells (review questions) a region becomes "*Your answer here.*". Outputs and
execution counts are stripped. The first cell of every notebook is the standard setup cell.
The hint text never becomes the stub's message, and :func:`answer_leak` finds a message that
repeats solution code (a test runs it on every solutions notebook). :func:`review_questions`
recognises a notebook's review questions and their answers (a test checks that each one is
answered). :func:`nbgrader_source` turns a solutions notebook into an nbgrader *source* notebook
(cell metadata for the solution cells, autograder tests made from the ``check_*`` calls).

Usage::

    python -m ptcourse exercises build     # write exercises/ from solutions/
    python -m ptcourse exercises check     # exit 1 if exercises/ is out of date
    python -m ptcourse.tools.exercises nbgrader solutions/08_interview_questions.ipynb --out course/source/ps08
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .meta import SETUP_CELL

BEGIN, END, TASK = "### BEGIN SOLUTION", "### END SOLUTION", "### TASK:"
HINT_RE = re.compile(r"^### HINT(?:\s+(\d+))?\s*:\s*(.*)$")
HINT_LABELS = {1: "Hint 1 (a nudge)", 2: "Hint 2 (stronger)"}
ANSWER_STUB = "*Your answer here.*"
ROOT = Path(__file__).resolve().parents[2]


def _lines(cell) -> list[str]:
    src = cell["source"]
    return (src if isinstance(src, str) else "".join(src)).split("\n")


@dataclass
class Region:
    """One ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region of a cell."""
    number: int                       # counts the code regions of a notebook (0 for markdown)
    indent: str
    task: str = ""
    hints: dict = field(default_factory=dict)      # {1: "a nudge", 2: "stronger", ...}
    body: list = field(default_factory=list)       # the solution's lines (without TASK/HINT lines)

    def message(self) -> str:
        """The stub's ``NotImplementedError`` message: the task, never the answer."""
        return self.task or f"Task {self.number}: write this part"


def parse_regions(source: str, counter: list[int], markdown: bool = False) -> tuple[list, list[Region]]:
    """Split one cell's source into kept lines and solution regions.

    Returns ``(pieces, regions)`` where ``pieces`` holds the lines outside the regions and, in
    place of each region, the :class:`Region` itself. ``counter[0]`` numbers the code regions.
    """
    pieces, regions, region = [], [], None
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped == BEGIN:
            if region is not None:
                raise ValueError(f"nested {BEGIN} in:\n{source}")
            if not markdown:
                counter[0] += 1
            region = Region(0 if markdown else counter[0], line[: len(line) - len(line.lstrip())])
            continue
        if stripped == END:
            if region is None:
                raise ValueError(f"{END} without {BEGIN} in:\n{source}")
            pieces.append(region)
            regions.append(region)
            region = None
            continue
        if region is None:
            pieces.append(line)
            continue
        hint = HINT_RE.match(stripped)
        if stripped.startswith(TASK):
            if region.task:
                raise ValueError(f"two {TASK} lines in one region:\n{source}")
            region.task = stripped[len(TASK):].strip()
        elif hint:
            n = int(hint.group(1) or 1)
            if n in region.hints:
                raise ValueError(f"hint {n} given twice in one region:\n{source}")
            region.hints[n] = hint.group(2).strip()
        else:
            region.body.append(line)
    if region is not None:
        raise ValueError(f"{BEGIN} without {END} in:\n{source}")
    return pieces, regions


def _render(pieces, markdown: bool) -> str:
    out = []
    for piece in pieces:
        if isinstance(piece, Region):
            stub = ANSWER_STUB if markdown else f"raise NotImplementedError({json.dumps(piece.message(), ensure_ascii=False)})"
            out.append(piece.indent + stub)
        else:
            out.append(piece)
    return "\n".join(out)


def stub_source(source: str, counter: list[int], markdown: bool = False) -> str:
    """Replace every solution region of one cell's source; ``counter[0]`` numbers the exercises."""
    pieces, _ = parse_regions(source, counter, markdown)
    return _render(pieces, markdown)


def hint_label(n: int) -> str:
    return HINT_LABELS.get(n, f"Hint {n}")


def hints_markdown(regions: list[Region]) -> str | None:
    """The collapsed hint blocks of one cell's regions (None when they have no hints)."""
    with_hints = [r for r in regions if r.hints]
    if not with_hints:
        return None
    parts = []
    for r in with_hints:
        if len(with_hints) > 1:
            parts.append(f"**{r.message()}**\n")
        for n in sorted(r.hints):
            parts.append(f"<details><summary>{hint_label(n)}</summary>\n\n{r.hints[n]}\n\n</details>")
    return "\n".join(parts)


def clean(nb: dict) -> dict:
    """Strip outputs, execution counts and volatile metadata from a notebook (in place)."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    return nb


def _hint_cell(cell: dict, text: str) -> dict:
    new = {"cell_type": "markdown", "metadata": {"tags": ["hints"]}, "source": text}
    if "id" in cell:
        new["id"] = (str(cell["id"])[:58] + "-hints")
    return new


def to_exercise(nb: dict) -> dict:
    """The exercise notebook of a solutions notebook: stubs, hint cells, no outputs."""
    nb = json.loads(json.dumps(nb))
    counter, cells, found = [0], [], False
    for cell in nb["cells"]:
        cells.append(cell)
        src = "\n".join(_lines(cell))
        if BEGIN not in src:
            continue
        found = True
        markdown = cell["cell_type"] == "markdown"
        pieces, regions = parse_regions(src, counter, markdown)
        cell["source"] = _render(pieces, markdown)
        hints = hints_markdown(regions)
        if hints:
            cells.append(_hint_cell(cell, hints))
    if not found:
        raise ValueError("a solutions notebook without any '### BEGIN SOLUTION' region")
    nb["cells"] = cells
    return clean(nb)


def stubs(nb: dict) -> list[tuple[Region, str]]:
    """Every code region of a solutions notebook with the stub message it gets."""
    counter, out = [0], []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            _, regions = parse_regions("\n".join(_lines(cell)), counter)
            out += [(r, r.message()) for r in regions]
    return out


# --------------------------------------------------------------------------- review questions
REVIEW_HEADING = re.compile(r"^#{2,6}\s+Review questions", re.I | re.M)
QUESTION = re.compile(r"^(?:\*\*(?:Question\s+)?(\d+)\.\*\*|(\d+)\.\s)")
DETAILS = re.compile(r"<details>.*?</details>", re.S | re.I)


def review_questions(nb: dict) -> tuple[dict[int, str], dict[int, str]]:
    """The review questions a notebook asks and the answers it holds.

    A notebook's review questions are the numbered items after its ``## Review questions``
    heading, up to the next heading of the same or a higher level: lines that start with
    ``1. ``, ``**1.**`` or ``**Question 1.**`` (not indented, outside ``<details>`` blocks and
    solution regions). An answer is a non-empty solution region (``### BEGIN SOLUTION`` ...) that
    follows a question before the next one, or, in a chapter, a ``<details>`` block whose
    numbered items (``1. ...``) answer the questions by number.

    Returns ``(asked, answers)``: ``{number: question text}`` in order and ``{number: answer text}``.
    """
    asked, answers, current, on, level = {}, {}, None, False, 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        src = "\n".join(_lines(cell))
        if not on:
            m = REVIEW_HEADING.search(src)
            if not m:
                continue
            on, level = True, len(m.group(0).split()[0])
            src = src[m.end():]
        head = re.search(r"^(#{1,%d})\s" % level, src, re.M)
        stop = head is not None
        if stop:
            src = src[: head.start()]
        for block in DETAILS.findall(src):
            for line in block.split("\n"):
                q = re.match(r"^\s*(?:<[^>]+>\s*)*(\d+)\.\s+(\S.*)$", line)
                if q:
                    answers.setdefault(int(q.group(1)), q.group(2))
        inside, body, reading = False, [], False
        for line in DETAILS.sub("", src).split("\n"):
            stripped = line.strip()
            if reading and stripped and stripped != BEGIN and not QUESTION.match(line):
                asked[current] += " " + stripped
                continue
            reading = False
            if stripped == BEGIN:
                inside, body = True, []
            elif stripped == END:
                inside = False
                text = "\n".join(b for b in body if not b.strip().startswith(("### TASK:", "### HINT"))).strip()
                if current is not None and text:
                    answers[current] = text
            elif inside:
                body.append(line)
            else:
                q = QUESTION.match(line)
                if q:
                    current = int(q.group(1) or q.group(2))
                    reading = current not in asked
                    if reading:
                        asked[current] = line[q.end():].strip()
        if stop:
            break
    return asked, answers


# --------------------------------------------------------------------------- nbgrader
CHECK_CALL = re.compile(r"^(?:[A-Za-z_]\w*\.)?check_\w+\(.*\);?$")


def _only_checks(lines) -> bool:
    """Whether ``lines`` hold one or more one-line ``check_*(...)`` calls and nothing else but comments."""
    code = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return bool(code) and all(CHECK_CALL.match(ln) for ln in code)


def _nbgrader_meta(grade_id: str, *, solution: bool, grade: bool, locked: bool, points=None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return meta


def nbgrader_source(nb: dict, points: int = 1) -> dict:
    """An nbgrader *source* notebook made from a solutions notebook (the input is not changed).

    nbgrader needs cell metadata that the course's notebooks do not carry; this adds the least
    that makes them gradable, and changes no solution:

    * a code cell with a solution region becomes an "autograded answer" cell (its ``### TASK``
      text is kept as a ``# TASK:`` comment above the region, since nbgrader's own stub is a bare
      ``raise NotImplementedError()``); the hint cells follow it, as in ``exercises/``;
    * a markdown cell with a region (a review answer) becomes a "manually graded answer" worth
      ``points``;
    * a code cell made only of one-line ``check_*(...)`` calls becomes a locked "autograder tests"
      cell worth ``points``, each call turned into ``assert check_*(...)`` (a check returns a
      :class:`~ptcourse.checks.CheckResult` that is falsy when it fails); such calls at the end of a
      solution cell, after its last region, are moved into a test cell of their own (``<id>-test``);
    * everything else is left as it is.

    Cells without an ``id`` get ``cell-<index>`` as their nbgrader ``grade_id``.
    """
    nb = clean(json.loads(json.dumps(nb)))
    cells, counter = [], [0]
    for i, cell in enumerate(nb["cells"]):
        cells.append(cell)
        grade_id = str(cell.get("id") or f"cell-{i}")
        src = "\n".join(_lines(cell))
        markdown = cell["cell_type"] == "markdown"
        meta = cell.setdefault("metadata", {})
        if BEGIN in src:
            _, regions = parse_regions(src, counter, markdown)
            test = None
            if not markdown:
                # check_* calls after the last region go to a test cell of their own
                lines = src.split("\n")
                last_end = max(j for j, ln in enumerate(lines) if ln.strip() == END)
                tail = lines[last_end + 1:]
                if _only_checks(tail):
                    src = "\n".join(lines[: last_end + 1]).rstrip("\n")
                    test = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                            "source": "\n".join(tail).strip("\n")}
                    if "id" in cell:
                        test["id"] = str(cell["id"])[:59] + "-test"
                lines, k = [], 0
                for line in src.split("\n"):
                    if line.strip() == BEGIN:
                        if regions[k].task:
                            lines.append(f"{regions[k].indent}# TASK: {regions[k].task}")
                        k += 1
                    lines.append(line)
                cell["source"] = "\n".join(lines)
            meta["nbgrader"] = _nbgrader_meta(grade_id, solution=True, grade=markdown, locked=False,
                                              points=points)
            hints = hints_markdown(regions)
            if hints:
                cells.append(_hint_cell(cell, hints))
            if test is None:
                continue
            cell = test
            cells.append(cell)
            grade_id, src, meta = str(cell.get("id") or f"cell-{i}-test"), cell["source"], cell["metadata"]
        if not markdown and _only_checks(src.split("\n")):
            cell["source"] = "\n".join(f"assert {ln.strip()}" if CHECK_CALL.match(ln.strip()) else ln
                                       for ln in src.split("\n"))
            meta["nbgrader"] = _nbgrader_meta(grade_id, solution=False, grade=True, locked=True, points=points)
    nb["cells"] = cells
    return nb


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


CODE_MARKS = set("=+-*/@%<>&|~([")


def _structure(fragment: str) -> int:
    """How much code structure a fragment holds: operators, calls and indexing (not bare names)."""
    return sum(ch in CODE_MARKS for ch in fragment)


def answer_leak(region: Region, min_fragment: int = 12) -> str | None:
    """The piece of solution code a stub's message gives away, or None.

    Whitespace is ignored. A leak is a solution line (at least 8 characters) inside the message, or
    a fragment of ``min_fragment`` characters or more that the message and the solution share; in
    both cases only when it has code structure: at least two operators, calls or indexings
    (``x + std * torch.randn_like(x)``, ``z = F.normalize(...)``). Naming a function or an API the
    task should use (``lab.val_accuracy``, ``train_and_eval(k, seed)``) is not a leak, nor are
    signature and import lines (``def``, ``class``, ``import``, ``from``, decorators). The fallback
    message never leaks.
    """
    message = _squeeze(region.message())
    skip = ("def ", "async def ", "class ", "import ", "from ", "@")
    code = [_squeeze(ln.split("#", 1)[0]) for ln in region.body if not ln.strip().startswith(skip)]
    code = [c for c in code if c]
    for line in code:
        if len(line) >= 8 and line in message and _structure(line) >= 2:
            return line
    joined = "\n".join(code)
    match = difflib.SequenceMatcher(None, message, joined, autojunk=False)
    for block in match.get_matching_blocks():
        fragment = message[block.a: block.a + block.size]
        if block.size >= min_fragment and _structure(fragment) >= 2:
            return fragment
    return None


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
    parser.add_argument("command", choices=["build", "check", "nbgrader"],
                        help="build: write exercises/; check: fail if stale; nbgrader: write nbgrader source "
                             "notebooks made from solutions notebooks")
    parser.add_argument("notebooks", nargs="*", help="nbgrader: the solutions notebooks to convert")
    parser.add_argument("--out", default=None, help="nbgrader: the folder to write them to "
                        "(e.g. <course>/source/<assignment>)")
    parser.add_argument("--check", action="store_true", help="same as the 'check' command: write nothing, "
                        "exit 1 when exercises/ is out of date")
    args = parser.parse_args(argv)
    if args.command == "nbgrader":
        if not args.notebooks or not args.out:
            parser.error("nbgrader needs one or more solutions notebooks and --out")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in map(Path, args.notebooks):
            nb = nbgrader_source(json.loads(path.read_text(encoding="utf-8")))
            (out / path.name).write_text(dumps(nb), encoding="utf-8")
            print(f"wrote {out / path.name}")
        return 0
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
