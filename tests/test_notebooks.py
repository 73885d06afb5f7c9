"""Properties of the committed notebooks themselves (not of running them: nbval does that)."""
import json
from pathlib import Path

import pytest

from ptcourse.tools import exercises

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for d in ("chapters", "solutions", "exercises") for p in (ROOT / d).glob("*.ipynb"))


def test_there_are_notebooks():
    assert (ROOT / "chapters" / "00_getting_started.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.parent.name != "chapters"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_exercises_and_solutions_are_committed_without_outputs(path):
    """A student fills these in; chapters carry the outputs of their recorded run (tests/test_published.py)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them"


def test_first_cell_is_the_setup_cell():
    assert exercises.setup_cell_problems(ROOT) == []


def test_exercises_are_up_to_date():
    stale = exercises.build(ROOT, check=True)
    assert not stale, "run `python -m ptcourse exercises build`: stale " + ", ".join(p.name for p in stale)


def test_every_solutions_notebook_has_an_exercise_and_a_chapter():
    for sol in (ROOT / "solutions").glob("*.ipynb"):
        assert (ROOT / "exercises" / sol.name).exists()
        assert (ROOT / "chapters" / sol.name).exists(), f"no chapter for {sol.name}"
