"""The course's website: ``python -m ptcourse book`` builds it into ``build/site/`` (needs the ``book`` extra).

The site shows the README's introduction, chapters 00-08 with the outputs they carry (nothing is
executed: a chapter's outputs are those of its recorded run, see :mod:`ptcourse.tools.published`),
the instructor guide and the results table, with navigation, search, and on each chapter an
"open in Colab" and a "download notebook" button. It builds offline and needs nothing from the
internet to be read: MathJax is copied into the site.

The Sphinx sources are small (``docs/site/``: ``conf.py``, ``index.md``, ``results.md``); the build
stages them with the chapters, the guides and the README into ``build/site-src/``, where links from
the README to files that are not pages (``results/``, ``exercises/``) become links into the repository.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from . import meta

_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def _link_outside(text: str, root: Path, pages: set[str]) -> str:
    """Relative Markdown links to files that are not pages of the site, as links into the repository."""
    def repl(m):
        target = m.group(1)
        path = target.split("#")[0]
        if path in pages or not (root / path).exists():
            return m.group(0)
        kind = "tree" if (root / path).is_dir() else "blob"
        return f"]({meta.repository_url(root)}/{kind}/{meta.REF}/{path.rstrip('/')})"
    return _LINK.sub(repl, text)


def stage(root, src) -> Path:
    """Copy the site's sources into ``src``: ``docs/site/*.md``, the chapters, the guides, the README."""
    root, src = Path(root), Path(src)
    shutil.rmtree(src, ignore_errors=True)
    (src / "chapters").mkdir(parents=True)
    (src / "docs").mkdir()
    for page in (root / "docs" / "site").glob("*.md"):
        shutil.copy2(page, src / page.name)
    for notebook in sorted((root / "chapters").glob("*.ipynb")):
        shutil.copy2(notebook, src / "chapters" / notebook.name)
    for guide in (root / "docs").glob("*.md"):
        shutil.copy2(guide, src / "docs" / guide.name)
    pages = {f"chapters/{p.name}" for p in (src / "chapters").iterdir()} | {f"docs/{p.name}" for p in (src / "docs").iterdir()}
    (src / "README.md").write_text(_link_outside((root / "README.md").read_text(encoding="utf-8"), root, pages),
                                   encoding="utf-8")
    return src


def build(root=meta.PACKAGE_ROOT, out=None, echo=print) -> Path:
    """Build the website of the course in ``root`` into ``out`` (default ``root/build/site``); return
    the path of its ``index.html``. Warnings fail the build (a broken link, a formula that does not parse)."""
    try:
        from sphinx.cmd.build import build_main
    except ImportError as err:
        raise SystemExit("the website needs the book extra: pip install -e \".[book]\"") from err
    root = Path(root).resolve()
    out = Path(out).resolve() if out else root / "build" / "site"
    src = stage(root, out.parent / f"{out.name}-src")
    t0 = time.time()
    before = os.environ.get("PTCOURSE_BOOK_ROOT")
    os.environ["PTCOURSE_BOOK_ROOT"] = str(root)      # conf.py names this course's repository
    try:
        code = build_main(["-b", "html", "-q", "-W", "--keep-going", "-E",
                           "-c", str(root / "docs" / "site"), "-d", str(out.parent / f"{out.name}-doctrees"),
                           str(src), str(out)])
    finally:
        if before is None:
            os.environ.pop("PTCOURSE_BOOK_ROOT")
        else:
            os.environ["PTCOURSE_BOOK_ROOT"] = before
    if code:
        raise SystemExit(f"the website did not build (sphinx-build exited {code}; its messages are above)")
    echo(f"built {out / 'index.html'} in {time.time() - t0:.0f} s")
    return out / "index.html"
