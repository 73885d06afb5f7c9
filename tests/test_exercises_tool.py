"""The exercise generator (``ptcourse.tools.exercises``) and the properties it keeps for every notebook:
stubs name the task and never give the answer, hints come as collapsed steps, every review question has
an answer, and the nbgrader source notebooks it makes carry the metadata nbgrader needs."""
import json
from pathlib import Path

import pytest

from ptcourse.tools import exercises

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def _nb(*cells):
    return {"cells": [dict(c, metadata=c.get("metadata", {})) for c in cells], "metadata": {},
            "nbformat": 4, "nbformat_minor": 5}


def _code(source, id=None, **extra):
    cell = {"cell_type": "code", "source": source, "outputs": [], "execution_count": None, **extra}
    return dict(cell, id=id) if id else cell


def _md(source, id=None):
    cell = {"cell_type": "markdown", "source": source}
    return dict(cell, id=id) if id else cell


# --------------------------------------------------------------------------- stubs (moved from test_core.py)
SOLUTION_CELL = """def f(x):
    ### BEGIN SOLUTION
    ### HINT: double it
    return 2 * x
    ### END SOLUTION

y = 1
### BEGIN SOLUTION
### TASK: compute y for the input 3, with your function
y = f(3)
### END SOLUTION"""


def test_stubs_name_the_task_and_never_the_old_hint():
    out = exercises.stub_source(SOLUTION_CELL, [0])
    assert out == ('def f(x):\n    raise NotImplementedError("Task 1: write this part")\n\ny = 1\n'
                   'raise NotImplementedError("compute y for the input 3, with your function")')
    assert "double it" not in out
    md = exercises.stub_source("Q1. Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", [0], markdown=True)
    assert md == "Q1. Why?\n\n*Your answer here.*"


def test_unbalanced_or_repeated_markers_are_errors():
    with pytest.raises(ValueError, match="without"):
        exercises.stub_source("### BEGIN SOLUTION\nx = 1", [0])
    with pytest.raises(ValueError, match="without"):
        exercises.stub_source("x = 1\n### END SOLUTION", [0])
    with pytest.raises(ValueError, match="nested"):
        exercises.stub_source("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", [0])
    with pytest.raises(ValueError, match="hint 1 given twice"):
        exercises.stub_source("### BEGIN SOLUTION\n### HINT: a\n### HINT 1: b\nx = 1\n### END SOLUTION", [0])
    with pytest.raises(ValueError, match="two ### TASK"):
        exercises.stub_source("### BEGIN SOLUTION\n### TASK: a\n### TASK: b\nx = 1\n### END SOLUTION", [0])


def test_build_and_check_detect_stale_exercises(tmp_path):
    (tmp_path / "solutions").mkdir()
    nb = _nb(dict(_code(SOLUTION_CELL), outputs=[1], execution_count=3))
    (tmp_path / "solutions" / "01_x.ipynb").write_text(json.dumps(nb))
    assert [p.name for p in exercises.build(tmp_path, check=True)] == ["01_x.ipynb"]
    exercises.build(tmp_path)
    built = json.loads((tmp_path / "exercises" / "01_x.ipynb").read_text())
    assert built["cells"][0]["outputs"] == [] and built["cells"][0]["execution_count"] is None
    assert "NotImplementedError" in built["cells"][0]["source"]
    assert exercises.build(tmp_path, check=True) == []
    (tmp_path / "exercises" / "01_x.ipynb").write_text("{}")
    assert exercises.build(tmp_path, check=True)


def test_a_notebook_without_regions_is_an_error():
    with pytest.raises(ValueError, match="without any"):
        exercises.to_exercise(_nb(_code("x = 1")))


# --------------------------------------------------------------------------- hints
HINTED = """def g(x):
    ### BEGIN SOLUTION
    ### TASK: return the square of x
    ### HINT 1: multiply x by something
    ### HINT 2: by itself
    return x * x
    ### END SOLUTION"""


def test_hints_become_collapsed_blocks_right_after_the_task_cell():
    nb = _nb(_md("Intro", id="intro"), _code(HINTED, id="task-g"), _code("check_g(g)", id="chk"))
    ex = exercises.to_exercise(nb)
    kinds = [(c["cell_type"], c.get("id")) for c in ex["cells"]]
    assert kinds == [("markdown", "intro"), ("code", "task-g"), ("markdown", "task-g-hints"), ("code", "chk")]
    assert ex["cells"][1]["source"] == 'def g(x):\n    raise NotImplementedError("return the square of x")'
    hints = ex["cells"][2]["source"]
    assert hints == ("<details><summary>Hint 1 (a nudge)</summary>\n\nmultiply x by something\n\n</details>\n"
                     "<details><summary>Hint 2 (stronger)</summary>\n\nby itself\n\n</details>")
    assert "x * x" not in json.dumps(ex)


def test_old_single_hint_is_hint_1_and_regions_of_one_cell_share_a_hint_cell():
    ex = exercises.to_exercise(_nb(_code(SOLUTION_CELL + "\n" + HINTED.replace("g(x)", "h(x)"), id="c")))
    assert [c["cell_type"] for c in ex["cells"]] == ["code", "markdown"]
    hints = ex["cells"][1]["source"]
    # several hinted regions in one cell: each group is headed by its task
    assert "**Task 1: write this part**" in hints and "**return the square of x**" in hints
    assert hints.count("Hint 1 (a nudge)") == 2 and hints.count("Hint 2 (stronger)") == 1
    assert "double it" in hints


def test_hint_cell_ids_are_valid_nbformat_ids():
    ex = exercises.to_exercise(_nb(_code(HINTED, id="x" * 64)))
    cid = ex["cells"][1]["id"]
    assert len(cid) <= 64 and cid.endswith("-hints")


# --------------------------------------------------------------------------- no stub gives its answer
def test_leak_detector_catches_a_stub_that_gives_code_away():
    counter = [0]
    _, (region,) = exercises.parse_regions(
        "### BEGIN SOLUTION\n### TASK: x + std * torch.randn_like(x), clipped\n"
        "return (x + std * torch.randn_like(x)).clamp(0, 1)\n### END SOLUTION", counter)
    assert exercises.answer_leak(region) == "x+std*torch.randn_like(x)"
    _, (whole_line,) = exercises.parse_regions("### BEGIN SOLUTION\n### TASK: do total = f(3) + f(4)\ntotal = f(3) + f(4)\n### END SOLUTION",
                                               counter)
    assert exercises.answer_leak(whole_line) == "total=f(3)+f(4)"
    _, (fine,) = exercises.parse_regions(
        "### BEGIN SOLUTION\n### TASK: write add_noise(x, std): Gaussian noise, then a valid image again\n"
        "def add_noise(x, std):\n    return (x + std * torch.randn_like(x)).clamp(0, 1)\n### END SOLUTION", counter)
    assert exercises.answer_leak(fine) is None


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_no_stub_message_contains_solution_code(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    leaks = [f"task {r.number} ({msg!r}) gives away {exercises.answer_leak(r)!r}"
             for r, msg in exercises.stubs(nb) if exercises.answer_leak(r)]
    assert not leaks, f"{path.name}: " + "; ".join(leaks)


# --------------------------------------------------------------------------- review questions
def test_review_questions_are_recognised_in_all_three_styles():
    chapter = _nb(_md("## Review questions\n\n1. Why A?\n2. Why B,\n   and C?\n\n"
                      "<details><summary>Answers</summary>\n\n1. Because A.\n2. Because B.\n</details>"),
                  _md("## Further reading\n\n1. not a question"))
    asked, answers = exercises.review_questions(chapter)
    assert asked == {1: "Why A?", 2: "Why B, and C?"} and sorted(answers) == [1, 2]
    sols = _nb(_md("## Review questions\n\n**1.** Why A?\n\n### BEGIN SOLUTION\nBecause A.\n### END SOLUTION\n\n"
                   "**Question 2.** Why B?\n\n### BEGIN SOLUTION\n\n### END SOLUTION"),
               _md("**3.** Why C?\n\n### BEGIN SOLUTION\n### HINT 1: think\nBecause C.\n### END SOLUTION"))
    asked, answers = exercises.review_questions(sols)
    assert list(asked) == [1, 2, 3]
    assert answers == {1: "Because A.", 3: "Because C."}        # an empty region is no answer
    assert exercises.review_questions(_nb(_md("1. no heading, no questions"))) == ({}, {})


def _similar(a: str, b: str) -> float:
    import difflib
    import re
    norm = lambda t: re.sub(r"[^a-z0-9 ]", "", t.lower())  # noqa: E731
    return difflib.SequenceMatcher(None, norm(a), norm(b)).ratio()


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_review_question_has_an_answer_in_the_solutions(chapter):
    """Each review question of a chapter, and of its solutions notebook, is answered in the solutions notebook
    (the same number, a similar wording, a non-empty solution region). A chapter without a solutions notebook
    (00) must answer its own questions in a ``<details>`` block."""
    asked, answers = exercises.review_questions(json.loads(chapter.read_text(encoding="utf-8")))
    solutions = ROOT / "solutions" / chapter.name
    if not solutions.exists():
        missing = [n for n in asked if n not in answers]
        assert not missing, f"{chapter.name} has no solutions notebook and no <details> answer for {missing}"
        return
    sol_asked, sol_answers = exercises.review_questions(json.loads(solutions.read_text(encoding="utf-8")))
    problems = [] if sol_asked else [f"no review questions recognised in solutions/{chapter.name} (a "
                                     "'## Review questions' heading, then **1.** ... with a solution region)"]
    for n, text in asked.items():
        if n not in sol_asked:
            problems.append(f"chapter question {n} is not in the solutions notebook")
        elif _similar(text, sol_asked[n]) < 0.5:
            problems.append(f"chapter question {n} ({text[:60]!r}) is a different question in the solutions "
                            f"({sol_asked[n][:60]!r})")
    problems += [f"solutions question {n} has no answer" for n in sol_asked if n not in sol_answers]
    assert asked, f"{chapter.name}: no review questions recognised (a '## Review questions' heading, then 1. ...)"
    assert not problems, f"{chapter.name}: " + "; ".join(problems)


# --------------------------------------------------------------------------- nbgrader source notebooks
def test_nbgrader_source_marks_solutions_tests_and_answers():
    nb = _nb(_md("# Title", id="t"), _code(HINTED, id="task"), _code("# check it\ncheck_g(g)\n", id="chk"),
             _code("print(g(2))", id="use"),
             _md("## Review questions\n\n**1.** Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", id="q1"))
    src = exercises.nbgrader_source(nb)
    cells = {c.get("id"): c for c in src["cells"]}
    assert [c.get("id") for c in src["cells"]] == ["t", "task", "task-hints", "chk", "use", "q1"]
    task = cells["task"]
    assert task["metadata"]["nbgrader"] == {"grade": False, "grade_id": "task", "locked": False,
                                            "schema_version": 3, "solution": True, "task": False}
    assert "    # TASK: return the square of x\n    ### BEGIN SOLUTION" in task["source"]
    assert "return x * x" in task["source"]                  # the solution stays (nbgrader removes it)
    test = cells["chk"]
    assert test["source"] == "# check it\nassert check_g(g)\n"
    assert test["metadata"]["nbgrader"]["grade"] and test["metadata"]["nbgrader"]["locked"]
    assert test["metadata"]["nbgrader"]["points"] == 1
    assert cells["q1"]["metadata"]["nbgrader"]["solution"] and cells["q1"]["metadata"]["nbgrader"]["grade"]
    assert "nbgrader" not in cells["use"]["metadata"] and "nbgrader" not in cells["task-hints"]["metadata"]
    assert "nbgrader" not in nb["cells"][1]["metadata"], "the input notebook must not change"


@pytest.mark.slow  # a few seconds: kept out of the fast tier
def test_nbgrader_source_passes_nbgraders_own_validation():
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbgrader")
    from nbgrader.nbgraderformat import MetadataValidator
    for path in SOLUTIONS:
        nb = nbformat.from_dict(exercises.nbgrader_source(json.loads(path.read_text(encoding="utf-8"))))
        MetadataValidator().validate_nb(nb)          # raises on missing points, duplicate ids, ...
        assert any(c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code" for c in nb.cells), \
            f"{path.name}: no check_* cell became an autograder test"
