"""The course's repository is named once (pyproject.toml); ``python -m ptcourse fork`` moves every link to a fork."""
from __future__ import annotations

import email.message
import json
import shutil
from pathlib import Path

from ptcourse.tools import cli, exercises, meta, published

ROOT = Path(__file__).resolve().parent.parent
FORK = "https://github.com/teacher/course"


def _first_code(path) -> str:
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_the_repository_is_named_in_pyproject_only():
    assert f'Repository = "{meta.REPO_URL}"' in (ROOT / "pyproject.toml").read_text()
    code = [*ROOT.joinpath("ptcourse").rglob("*.py"), ROOT / "docs" / "site" / "conf.py", ROOT / ".ci" / "run"]
    for path in code:
        assert meta.REPO not in path.read_text(encoding="utf-8"), f"{path.relative_to(ROOT)} names the repository"


def test_an_installed_copy_reads_the_address_from_its_metadata(tmp_path, monkeypatch):
    """A pip install (Colab) has no pyproject.toml beside the package: the wheel's Project-URL names it."""
    from importlib import metadata

    info = email.message.Message()
    info["Name"] = "ptcourse"
    info["Project-URL"] = f"Repository, {FORK}"
    monkeypatch.setattr(meta, "PACKAGE_ROOT", tmp_path)
    monkeypatch.setattr(metadata, "metadata", lambda name: info)
    assert meta.repository_url() == FORK


def test_fork_points_badges_install_cells_and_pyproject_at_the_fork(tmp_path):
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("docs", "chapters", "solutions", "exercises"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    notebooks = sorted(p for d in ("chapters", "solutions", "exercises") for p in (tmp_path / d).glob("*.ipynb"))
    hashes = {p: published.code_sha256(p) for p in notebooks}

    assert cli.main(["fork", "teacher/course", "--root", str(tmp_path)]) == 0

    assert meta.repository_url(tmp_path) == FORK
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    for chapter in sorted((tmp_path / "chapters").glob("*.ipynb")):
        assert meta.colab_url(f"chapters/{chapter.name}", FORK) in readme
    assert f"github/{meta.REPO}/" not in readme
    for path in notebooks:
        assert _first_code(path) == meta.setup_cell(FORK), path.name
        assert published.code_sha256(path) == hashes[path], "a recorded chapter stays valid in the fork"
    assert exercises.build(tmp_path, check=True) == [], "exercises/ is still what solutions/ generate"
    assert meta.fork("teacher/course", tmp_path) == [], "a second run changes nothing"
