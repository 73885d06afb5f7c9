"""The README's generated parts stay true: chapter links, the Colab URLs, the results table."""
from pathlib import Path

from ptcourse.tools import meta as _meta
from ptcourse.tools.sync import sync_readme

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_chapter_is_linked_with_its_colab_badge():
    chapters = sorted((ROOT / "chapters").glob("*.ipynb"))
    assert chapters
    for nb in chapters:
        rel = f"chapters/{nb.name}"
        assert f"]({rel})" in README, f"README does not link {rel}"
        assert _meta.colab_url(rel) in README, f"README has no Colab link for {rel} (from ptcourse.tools.meta)"


def test_results_tables_match_the_recorded_results():
    for doc in ("README.md", "docs/instructors.md"):
        assert sync_readme(ROOT / doc, ROOT / "results", check=True), \
            f"{doc} tables are stale: python -m ptcourse results --dir results --update-readme README.md docs/instructors.md"


def test_the_two_commands_and_ci_agree():
    """CI ends with the README's test command, verbatim; the set-up command installs no test tools."""
    ci_last = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1]
    blocks = [b.split("```")[0].strip() for b in README.split("```bash\n")[1:3]]
    setup, test = blocks
    assert test == ci_last and test.endswith("python -m pytest -n 2")
    assert 'pip install -e ".[dev]"' in test
    assert 'pip install -e ".[lab]"' in setup and "jupyter lab" in setup and "[dev]" not in setup


def test_the_library_table_lists_the_real_modules():
    import ptcourse
    pkg = ROOT / "ptcourse"
    core = sorted(p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_"))
    tree = README.split("## The library", 1)[1].split("## Contributing", 1)[0]
    for name in core:
        assert f"{name}.py" in tree, f"README's layout tree does not list ptcourse/{name}.py"
    import re
    for name in re.findall(r"([a-z_]+)\.py", tree.split("```")[1]):
        assert (pkg / f"{name}.py").exists() or name == "bert_finetuning", f"README lists ptcourse/{name}.py, which does not exist"
    for sub in ("chapters", "checks", "tools"):
        assert f"{sub}/" in tree
    for name in ptcourse.__all__:
        assert getattr(ptcourse, name) is not None


def test_colab_installs_the_release_the_notebooks_belong_to():
    """One version source: pyproject reads ptcourse.__version__; install cell and Colab links name v<version>."""
    import ptcourse
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "ptcourse.__version__"' in pyproject
    tag = f"v{ptcourse.__version__}"
    assert f"@{tag}\"" in _meta.SETUP_CELL and f"/blob/{tag}/" in _meta.colab_url("chapters/x.ipynb")
    assert "@main" not in _meta.SETUP_CELL
    import re
    assert set(re.findall(r"colab.research.google.com/github/[^)]*?/blob/([^/]+)/", README)) == {tag}
