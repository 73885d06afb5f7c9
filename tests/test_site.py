"""The course website in a real browser: built offline, served from 127.0.0.1, read in headless Chromium.

The site is built (``python -m ptcourse book``) from a temporary copy of the course that is pointed at
a fork (``python -m ptcourse fork``: the site's links must follow pyproject.toml) and holds one more
chapter recorded for real with ``run --record`` (``tests/_published.py``: a figure, a progress line,
a widget's snapshot, formulas), so the checks meet outputs even while no real chapter carries any.
Every chapter page must load with no request leaving 127.0.0.1, every image must decode, formulas must
be typeset by the site's own MathJax, no page may show an error or a raw widget, each chapter offers
Colab and its notebook for download, and the search must find a chapter. Screenshots go to
``$PTCOURSE_ARTIFACTS`` (default ``test-artifacts/``).

Needs ``/usr/bin/chromium`` and Playwright (as ``tests/test_browser.py``; skipped without them unless
``PTCOURSE_REQUIRE_BROWSER=1``) and the ``book`` extra.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from _jupyterlab import CHROMIUM_ARGS
from _published import CHAPTER, record_example
from ptcourse.tools import meta

ROOT = Path(__file__).resolve().parent.parent
FORK = "https://github.com/teacher/course"
BUILD_BUDGET_S = 120
# what an output must not show: a widget without its front-end, an error
BAD_TEXT = ("Error displaying widget", "Loading widget...", "VBox(children=", "HBox(children=",
            "FloatSlider(value=", "interactive(children=", "Traceback (most recent call last)")
SEARCH_TERM = "distillation"

pytestmark = pytest.mark.slow


def _missing(reason: str):
    if os.environ.get("PTCOURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"PTCOURSE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _artifacts() -> Path:
    folder = Path(os.environ.get("PTCOURSE_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site of a copy of the course (forked, plus the recorded example chapter): (folder, build seconds)."""
    chromium = os.environ.get("PTCOURSE_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        _missing(f"no Chromium at {chromium} (Debian: apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed (pip install playwright; no `playwright install`)")
    root = tmp_path_factory.mktemp("course")
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    for folder in ("chapters", "docs", "results", "exercises", "solutions"):
        shutil.copytree(ROOT / folder, root / folder)
    subprocess.run([sys.executable, "-m", "ptcourse", "fork", FORK, "--root", str(root)], check=True,
                   capture_output=True, timeout=120)
    record_example(root)
    t0 = time.monotonic()
    build = subprocess.run([sys.executable, "-m", "ptcourse", "book", "--root", str(root)],
                           capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    (_artifacts() / "site_build.log").write_text(f"{seconds:.1f} s\n{build.stdout}\n{build.stderr}")
    return root / "build" / "site", seconds


@pytest.fixture(scope="module")
def server(site):
    """The site over HTTP on 127.0.0.1 (a free port), as a static host would serve it."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site[0])))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser_page(server):
    """A headless Chromium page; every request to another host is refused and remembered in ``page.outside``."""
    from playwright.sync_api import sync_playwright

    outside, errors = [], []

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("PTCOURSE_CHROMIUM", "/usr/bin/chromium"),
                                     args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", route)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
            page.on("response", lambda r: r.status >= 400 and not r.url.endswith("favicon.ico")
                    and errors.append(f"{r.status} {r.url}"))
            page.outside, page.errors = outside, errors
            yield page
        finally:
            browser.close()


# JavaScript run in the page: wait for MathJax and the images, then report what a reader would see
_INSPECT = r"""async () => {
  if (window.MathJax && MathJax.startup) { await MathJax.startup.promise; }
  await Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)));
  const main = document.querySelector('main') || document.body;
  return {
    mathjax: !!(window.MathJax && MathJax.startup),
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    mathErrors: document.querySelectorAll('mjx-merror').length,
    broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    images: Array.from(main.querySelectorAll('.cell_output img')).length,
    text: main.innerText,
    outputs: Array.from(main.querySelectorAll('.cell_output')).map(e => e.innerText).join('\n'),
    errorOutputs: document.querySelectorAll('.output.error, .output.traceback').length,
    colab: Array.from(document.querySelectorAll('a')).map(a => a.href).filter(h => h.includes('colab.research')),
    downloads: Array.from(document.querySelectorAll('a')).map(a => a.href).filter(h => h.endsWith('.ipynb')
                                                                                       && h.includes('/_sources/')),
  };
}"""


def _chapters() -> list[str]:
    return sorted([p.stem for p in (ROOT / "chapters").glob("*.ipynb")] + [CHAPTER])


def test_the_site_builds_within_budget(site):
    _, seconds = site
    assert seconds < BUILD_BUDGET_S, f"the site took {seconds:.0f} s to build (budget {BUILD_BUDGET_S} s)"


def test_every_chapter_page_reads_offline(site, server, browser_page):
    page = browser_page
    artifacts = _artifacts()
    for stale in artifacts.glob("site_*.png"):
        stale.unlink()
    pages = ["index", "results", "docs/instructors"] + [f"chapters/{c}" for c in _chapters()]
    seen = {}
    for name in pages:
        response = page.goto(f"{server}/{name}.html", wait_until="load")
        assert response is not None and response.ok, f"{name}.html: {response and response.status}"
        seen[name] = info = page.evaluate(_INSPECT)
        assert info["mathjax"] or not info["math"], f"{name}: formulas, and MathJax did not start"
        assert not info["broken"], f"{name}: images that do not decode: {info['broken']}"
        assert info["typeset"] >= info["math"] and not info["mathErrors"], \
            f"{name}: {info['math']} formulas, {info['typeset']} typeset, {info['mathErrors']} MathJax errors"
        shown = [t for t in BAD_TEXT if t in info["outputs"]]     # (the guide's prose names some of them)
        assert not shown and not info["errorOutputs"], f"{name}: shows {shown or 'an error output'}"
        if name.startswith("chapters/"):
            notebook = name + ".ipynb"
            assert info["colab"] == [meta.colab_url(notebook, FORK)], f"{name}: Colab links {info['colab']}"
            (download,) = set(info["downloads"])
            with urllib.request.urlopen(download) as f:           # the notebook itself, outputs and all
                assert json.loads(f.read())["cells"] == json.loads((site[0].parent / "site-src" / notebook)
                                                                   .read_text(encoding="utf-8"))["cells"]
    assert not page.outside, f"requests that left the machine: {sorted(set(page.outside))[:10]}"
    assert not page.errors, f"errors in the pages: {page.errors[:10]}"
    assert sum(seen[f"chapters/{c}"]["math"] for c in _chapters()) > 20, "the chapters' formulas are on the pages"
    example = seen[f"chapters/{CHAPTER}"]
    assert example["images"] == 2 and "epoch 2/2: 100%|" in example["text"], \
        "the recorded chapter shows its figure, its widget's figure and its progress line"
    assert "Interactive when you run the notebook: shown here at k = 2." in example["text"]

    page.goto(f"{server}/chapters/{CHAPTER}.html", wait_until="load")
    page.evaluate(_INSPECT)
    page.screenshot(path=str(artifacts / "site_recorded_chapter.png"), full_page=True)
    page.goto(f"{server}/chapters/05_knowledge_distillation.html", wait_until="load")
    page.evaluate(_INSPECT)
    page.locator("mjx-container[display='true']").first.evaluate("e => e.scrollIntoView({block: 'center'})")
    page.screenshot(path=str(artifacts / "site_chapter_05.png"))


def test_search_finds_a_chapter(server, browser_page):
    page = browser_page
    page.goto(f"{server}/search.html?q={SEARCH_TERM}", wait_until="load")
    results = page.locator("#search-results ul.search li")
    results.first.wait_for(timeout=30_000)
    links = results.locator("a").evaluate_all("els => els.map(a => a.getAttribute('href'))")
    assert any("05_knowledge_distillation" in href for href in links), links
    page.screenshot(path=str(_artifacts() / "site_search.png"))
    assert not page.outside and not page.errors
