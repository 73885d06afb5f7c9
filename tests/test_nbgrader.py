"""The solutions notebooks work as nbgrader source notebooks: the real ``nbgrader`` generates the student
version of one and autogrades a solved and an unsolved copy with the scores they should get.

nbgrader needs cell metadata the course's notebooks do not carry; ``ptcourse.tools.exercises.nbgrader_source``
adds it (solution cells, and autograder tests made from the ``check_*`` calls). The notebook graded here is one
of the quick ones; in the smoke profile (set by conftest.py) both runs take well under a minute.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptcourse.tools import exercises

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "solutions" / "08_interview_questions.ipynb"
ASSIGNMENT = "ps08"


def _nbgrader(course: Path, *args):
    exe = shutil.which("nbgrader", path=os.path.dirname(sys.executable)) or shutil.which("nbgrader")
    proc = subprocess.run([exe, *args, "--force"], cwd=course, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _solution_body(source: str) -> str:
    """A student's answer: the solution region's code without the markers and TASK/HINT lines."""
    out, inside = [], False
    for line in source.split("\n"):
        s = line.strip()
        if s == exercises.BEGIN:
            inside = True
        elif s == exercises.END:
            inside = False
        elif not (inside and (s.startswith(exercises.TASK) or exercises.HINT_RE.match(s))):
            out.append(line)
    return "\n".join(out)


@pytest.mark.slow
def test_nbgrader_generates_the_student_version_and_autogrades(tmp_path):
    pytest.importorskip("nbgrader")
    from nbgrader.api import Gradebook

    course = tmp_path / "course"
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    (course / "nbgrader_config.py").write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(course)!r}\n"
        "c.CourseDirectory.course_id = 'ptcourse'\n"
        "c.Execute.timeout = 600\n", encoding="utf-8")
    source = exercises.nbgrader_source(json.loads(NOTEBOOK.read_text(encoding="utf-8")))
    (course / "source" / ASSIGNMENT / NOTEBOOK.name).write_text(exercises.dumps(source), encoding="utf-8")
    tests = [c for c in source["cells"] if c["metadata"].get("nbgrader", {}).get("grade") and c["cell_type"] == "code"]
    answers = [c for c in source["cells"] if c["metadata"].get("nbgrader", {}).get("solution") and c["cell_type"] == "code"]
    assert len(tests) >= 5 and len(answers) >= 5

    # 1. the student version: nbgrader's own stubs, no solution code, tests and TASK lines kept
    _nbgrader(course, "generate_assignment", ASSIGNMENT)
    release = json.loads((course / "release" / ASSIGNMENT / NOTEBOOK.name).read_text(encoding="utf-8"))
    by_id = {c["metadata"].get("nbgrader", {}).get("grade_id"): c for c in release["cells"]}
    for cell in answers:
        student = "".join(by_id[cell["metadata"]["nbgrader"]["grade_id"]]["source"])
        assert "raise NotImplementedError()" in student and "# TASK:" in student
        body = [ln.strip() for ln in _solution_body(cell["source"]).split("\n")]
        solution_only = set(body) - {ln.strip() for ln in student.split("\n")} - {""}
        assert solution_only, "the solution region was empty?"
        assert not any(ln in student for ln in solution_only if len(ln) > 12 and not ln.startswith("#"))
    for cell in tests:
        assert "".join(by_id[cell["metadata"]["nbgrader"]["grade_id"]]["source"]).startswith(("assert", "#"))

    # 2. two submissions: the release as it is, and the release with every answer filled in
    solved = json.loads(json.dumps(release))
    answer_by_id = {c["metadata"]["nbgrader"]["grade_id"]: _solution_body(c["source"]) for c in answers}
    for cell in solved["cells"]:
        gid = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if gid in answer_by_id:
            cell["source"] = answer_by_id[gid]
    for student, nb in (("unsolved", release), ("solved", solved)):
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        (folder / NOTEBOOK.name).write_text(exercises.dumps(nb), encoding="utf-8")

    # 3. autograde both, then read the scores from nbgrader's gradebook
    _nbgrader(course, "autograde", ASSIGNMENT)
    points = len(tests)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", course_id="ptcourse") as gb:
        scores = {}
        for student in ("solved", "unsolved"):
            nb = gb.find_submission_notebook(NOTEBOOK.stem, ASSIGNMENT, student)
            auto = [g for g in nb.grades if g.cell.cell_type == "code"]
            scores[student] = (sum(g.score for g in auto), sum(g.max_score for g in auto))
    assert scores["solved"] == (points, points), scores
    assert scores["unsolved"] == (0, points), scores
