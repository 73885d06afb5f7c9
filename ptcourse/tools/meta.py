"""The course's repository and the release the notebooks install, from one place: ``pyproject.toml``.

The repository is ``Repository`` under ``[project.urls]`` in ``pyproject.toml``. The README's Colab
links, the install line in the first cell of every notebook and the website's links are generated
from it here (and tested against it). The release is the git tag ``v<version>`` from
``ptcourse.__version__``, so a notebook opened on Colab installs the library it was written against.
A release bumps ``__version__`` and tags the commit; a teacher who forks the course runs
``python -m ptcourse fork OWNER/NAME`` (:func:`fork`), which points all of them at the fork.
"""
from __future__ import annotations

import re
from pathlib import Path

from .. import __version__

PACKAGE_ROOT = Path(__file__).resolve().parents[2]     # the course folder, in a source checkout
_GITHUB = re.compile(r"^https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?$")


def _pyproject_url(root: Path) -> str | None:
    path = Path(root) / "pyproject.toml"
    if not path.exists():
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            return None
    project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    return project.get("urls", {}).get("Repository") if project.get("name") == "ptcourse" else None


def _installed_url() -> str | None:
    from importlib import metadata
    try:
        entries = metadata.metadata("ptcourse").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    urls = dict(entry.split(", ", 1) for entry in entries if ", " in entry)
    return urls.get("Repository")


def repository_url(root=None) -> str:
    """The course's repository, e.g. ``https://github.com/OWNER/NAME``.

    Read from ``root/pyproject.toml`` (default: the course folder holding this package, when it is a
    source checkout: the file a fork edits), else from the installed package's metadata (a ``pip
    install`` without the source, e.g. on Colab).
    """
    url = _pyproject_url(Path(root) if root else PACKAGE_ROOT) or (None if root else _installed_url())
    if not url:
        raise RuntimeError("the course's repository is not named: add Repository = \"https://github.com/OWNER/NAME\" "
                           "under [project.urls] in pyproject.toml")
    return url.rstrip("/")


def github_repo(url: str) -> str:
    """``OWNER/NAME`` of a GitHub address (Colab opens notebooks from GitHub only).

    Example:
        >>> github_repo("https://github.com/my-university/ptcourse.git")
        'my-university/ptcourse'
    """
    m = _GITHUB.match(url)
    if not m:
        raise ValueError(f"{url!r} is not a GitHub repository address (https://github.com/OWNER/NAME)")
    return m.group(1)


def pip_spec(url: str | None = None) -> str:
    """The install line's requirement: this release of the library from the repository at ``url``."""
    return f"ptcourse @ git+{url or REPO_URL}@{REF}"


def colab_url(notebook_path: str, url: str | None = None) -> str:
    """Open-in-Colab address of a notebook at this release, e.g. ``chapters/00_getting_started.ipynb``."""
    return f"https://colab.research.google.com/github/{github_repo(url or REPO_URL)}/blob/{REF}/{notebook_path}"


def setup_cell(url: str | None = None) -> str:
    """The first code cell of every notebook: on Colab it installs this release; elsewhere it does nothing."""
    return f'''# Setup: on Colab this installs the course package (the release this notebook belongs to);
# elsewhere it does nothing.
import sys
if "google.colab" in sys.modules:
    %pip install -q "{pip_spec(url)}"
import ptcourse
P = ptcourse.profile()
print(P)'''


REPO_URL = repository_url()
REPO = github_repo(REPO_URL)
REF = f"v{__version__}"
PIP_SPEC = pip_spec(REPO_URL)
SETUP_CELL = setup_cell(REPO_URL)

# files whose text names the repository: the README's Colab badges, the guides, every notebook's install line
_NAMING_FILES = ("README.md", "docs/*.md", "chapters/*.ipynb", "solutions/*.ipynb", "exercises/*.ipynb")


def fork(new: str, root=PACKAGE_ROOT) -> list[Path]:
    """Point the course in ``root`` at the repository ``new`` (``OWNER/NAME`` or its GitHub address).

    Rewrites ``Repository`` in ``pyproject.toml``, then the old address in the README's Colab badges,
    the guides and every notebook's install line. Only the address changes in a notebook, so a
    chapter's recorded outputs stay valid (``code_sha256`` leaves the install line's address out).
    Returns the files changed.

    Example:
        >>> fork("my-university/ptcourse")        # doctest: +SKIP
    """
    root = Path(root)
    new_url = new.rstrip("/") if new.startswith("https://") else f"https://github.com/{new.strip('/')}"
    new_repo = github_repo(new_url)
    old_url = repository_url(root)
    old_repo = github_repo(old_url)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    line = re.compile(r'^(Repository\s*=\s*)"[^"]*"', re.MULTILINE)
    if not line.search(text):
        raise ValueError(f"{pyproject} has no Repository = \"...\" line under [project.urls]")
    changed = []
    if old_url != new_url:
        pyproject.write_text(line.sub(rf'\g<1>"{new_url}"', text, count=1), encoding="utf-8")
        changed.append(pyproject)
    for pattern in _NAMING_FILES:
        for path in sorted(root.glob(pattern)):
            text = path.read_text(encoding="utf-8")
            new_text = text.replace(f"git+{old_url}@", f"git+{new_url}@").replace(
                f"colab.research.google.com/github/{old_repo}/", f"colab.research.google.com/github/{new_repo}/")
            if new_text != text:
                path.write_text(new_text, encoding="utf-8")
                changed.append(path)
    return changed
