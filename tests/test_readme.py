"""The README's generated parts stay true: chapter links, the Colab URLs, the results table."""
from pathlib import Path

from ptcourse.tools import meta as _meta
from ptcourse.tools.readme import sync_readme

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_chapter_is_linked_with_its_colab_badge():
    chapters = sorted((ROOT / "chapters").glob("*.ipynb"))
    assert chapters
    for nb in chapters:
        rel = f"chapters/{nb.name}"
        assert f"]({rel})" in README, f"README does not link {rel}"
        assert _meta.colab_url(rel) in README, f"README has no Colab link for {rel} (from ptcourse.tools.meta)"


def test_results_table_matches_the_recorded_results():
    assert sync_readme(ROOT / "README.md", ROOT / "results", check=True), \
        "README results are stale: python -m ptcourse results --dir results --update-readme README.md"


def test_the_two_commands_and_ci_agree():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -n 2" in README and ci.rstrip().endswith("python -m pytest -n 2")
    assert 'pip install -e ".[dev]"' in README and 'pip install -q -e ".[dev]"' in ci
