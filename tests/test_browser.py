"""A real browser test: JupyterLab + headless Chromium + chapter 01's ipywidgets latent-space explorer.

It starts a private JupyterLab on localhost serving a temporary copy of ``chapters/``, opens
``01_autoencoders.ipynb`` in headless Chromium (Debian's ``chromium`` package, driven by Playwright),
runs all cells in the smoke profile, checks that the explorer (two ``FloatSlider``s ``z1``/``z2`` and
an ``Image``) is rendered by the ipywidgets front-end (not "Error displaying widget", not the text
fallback), moves a slider and checks that the decoded image changes. Screenshots and the server log
go to ``$PTCOURSE_ARTIFACTS`` (default ``test-artifacts/``).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and ``pip install playwright``; never run
``playwright install``. Without them the test is skipped, unless ``PTCOURSE_REQUIRE_BROWSER=1``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from _jupyterlab import CHROMIUM_ARGS, running_jupyterlab

ROOT = Path(__file__).resolve().parent.parent
# another notebook with the same explorer can be tried with PTCOURSE_BROWSER_NOTEBOOK=path
NOTEBOOK = Path(os.environ.get("PTCOURSE_BROWSER_NOTEBOOK") or ROOT / "chapters" / "01_autoencoders.ipynb")
SLIDERS = ("z1", "z2")
RUN_TIMEOUT_S = 420  # smoke run of the whole chapter in a browser, on a loaded 2-core machine
# what the page shows when the widget front-end is missing or broken
BAD_TEXT = ("Error displaying widget", "Loading widget...", "model not found",
            "VBox(children=", "HBox(children=", "FloatSlider(value=", "Image(value=")

pytestmark = pytest.mark.slow


def _missing(reason: str):
    if os.environ.get("PTCOURSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"PTCOURSE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str:
    path = os.environ.get("PTCOURSE_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        _missing(f"no Chromium at {path} (Debian: apt-get install chromium)")
    return path


def _artifacts() -> Path:
    folder = Path(os.environ.get("PTCOURSE_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab serving a temporary copy of chapters/ (kernels inherit os.environ: smoke profile)."""
    _chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed (pip install playwright; no `playwright install`)")
    if not NOTEBOOK.exists():
        pytest.fail(f"{NOTEBOOK} does not exist", pytrace=False)
    root = tmp_path / "chapters"
    shutil.copytree(NOTEBOOK.parent, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    # a chapter may carry the outputs of its recorded run: the copy starts without them, so that what
    # the checks below find was made in this browser
    copy = root / NOTEBOOK.name
    nb = json.loads(copy.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    copy.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    env = dict(os.environ)
    env.setdefault("PTCOURSE_PROFILE", "smoke")  # conftest.py sets it; be explicit anyway
    with running_jupyterlab(root, tmp_path / "jupyter", env=env,
                            log_path=_artifacts() / "browser_jupyterlab.log") as server:
        yield server


@pytest.fixture
def page(lab):
    """A headless Chromium page that can reach nothing but the local JupyterLab."""
    from playwright.sync_api import sync_playwright

    artifacts = _artifacts()
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.route(re.compile(r"^(?!https?://127\.0\.0\.1[:/]|data:|blob:).*"),
                          lambda route: route.abort())
            pg = context.new_page()
            pg.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            yield pg
        finally:
            (artifacts / "browser_console.log").write_text("\n".join(console) + "\n")
            browser.close()


# ---------------------------------------------------------------------------------------------
# JavaScript run in the page (window.jupyterapp exists because the server sets expose_app_in_browser)

_OPENED = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return !!(w && w.context && w.sessionContext && w.context.path.endsWith(%r)); }"""

_READY = """async () => { const w = window.jupyterapp.shell.currentWidget;
  const timeout = new Promise((_, reject) => setTimeout(
      () => reject(new Error('the notebook or its kernel was not ready after 180 s')), 180000));
  await Promise.race([Promise.all([w.context.ready, w.sessionContext.ready]), timeout]);
  return {kernel: w.sessionContext.session && w.sessionContext.session.kernel
                  && w.sessionContext.session.kernel.name,
          runAll: window.jupyterapp.commands.hasCommand('notebook:run-all-cells'),
          version: window.jupyterapp.version}; }"""

_RUN_ALL = """() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }"""

_PROGRESS = """() => { const w = window.jupyterapp.shell.currentWidget; const cells = w.content.model.cells;
  let code = 0, pending = 0; const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i); if (c.type !== 'code') continue; code++;
    if (c.executionCount === null || c.executionState === 'running') pending++;
    for (let j = 0; j < c.outputs.length; j++) {
      const o = c.outputs.get(j).toJSON();
      if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
  }
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return {code, pending, errors, status: k ? k.status : 'no kernel'}; }"""

# bytes of the image the <img> shows (ipywidgets 8 uses blob: URLs), so we compare pictures, not URLs
_IMAGE = """async (img) => { const r = await fetch(img.src); const b = new Uint8Array(await r.arrayBuffer());
  return {src: img.src, bytes: Array.from(b), width: img.naturalWidth, height: img.naturalHeight,
          complete: img.complete}; }"""


def _wait_for_run(page, timeout_s: float) -> tuple[dict, float]:
    start = time.monotonic()
    while True:
        state = page.evaluate(_PROGRESS)
        if state["errors"]:
            pytest.fail("the notebook raised in the browser: " + "; ".join(state["errors"]), pytrace=False)
        if state["pending"] == 0 and state["status"] == "idle":
            return state, time.monotonic() - start
        if state["status"] == "dead":
            pytest.fail(f"kernel is {state['status']!r} while running the notebook", pytrace=False)
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"notebook still running after {timeout_s:.0f} s: {state}", pytrace=False)
        page.wait_for_timeout(1000)


def _pixels(data: list[int]):
    """The decoded picture as a grey-level array (None if Pillow/numpy are missing)."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return None
    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("L"), dtype=np.int16)


def _slider(scope, name: str):
    page = getattr(scope, "page", scope)
    return scope.locator(".widget-slider").filter(
        has=page.locator("label.widget-label", has_text=re.compile(rf"^\s*{name}\s*$")))


def test_latent_explorer_renders_and_responds(lab, page):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    artifacts = _artifacts()
    for stale in [*artifacts.glob("browser_01_*.png"), *artifacts.glob("browser_01_*.json")]:
        stale.unlink()
    timings = {}
    t0 = time.monotonic()
    try:
        page.goto(lab.url(f"lab/tree/{NOTEBOOK.name}"), wait_until="domcontentloaded")
        page.wait_for_function(_OPENED % NOTEBOOK.name, timeout=180_000)
        info = page.evaluate(_READY)
        assert info["runAll"], f"JupyterLab {info['version']} has no 'notebook:run-all-cells' command"
        assert info["kernel"], f"no kernel started for the notebook: {info}"
        timings["open"] = time.monotonic() - t0
        page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")

        page.evaluate(_RUN_ALL)
        state, timings["run_all"] = _wait_for_run(page, RUN_TIMEOUT_S)

        # the explorer: one output holding both sliders and an image, rendered by the widget manager
        outputs_text = page.locator(".jp-OutputArea").evaluate_all("els => els.map(e => e.textContent).join('\\n')")
        bad = [t for t in BAD_TEXT if t in outputs_text]
        assert not bad, f"the widget front-end did not render the widgets: {bad} in the outputs"
        explorer = page.locator(".jp-OutputArea-output").filter(has=page.locator("img.widget-image"))
        for name in SLIDERS:
            explorer = explorer.filter(has=_slider(page, name))
        assert explorer.count() == 1, f"expected one explorer output with sliders {SLIDERS} and an image, " \
                                      f"found {explorer.count()}"
        explorer.evaluate("e => e.scrollIntoView({block: 'center'})")
        sliders = {name: _slider(explorer, name) for name in SLIDERS}
        for name, slider in sliders.items():
            assert slider.count() == 1 and slider.is_visible(), f"slider {name} not rendered"
            assert slider.locator(".noUi-handle").count() == 1, f"slider {name} has no handle"
        image = explorer.locator("img.widget-image")
        assert image.count() == 1 and image.is_visible(), "the explorer's image is not shown"

        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                               timeout=30_000)
        before = image.evaluate(_IMAGE)
        readout_before = sliders["z1"].locator(".widget-readout").inner_text()
        page.screenshot(path=str(artifacts / "browser_01_before.png"))
        explorer.screenshot(path=str(artifacts / "browser_01_explorer_before.png"))

        # move z1 with the keyboard, as a user would (noUiSlider handles arrow keys)
        t1 = time.monotonic()
        handle = sliders["z1"].locator(".noUi-handle")
        handle.focus()
        for _ in range(8):
            handle.press("ArrowRight")
        readout_after = sliders["z1"].locator(".widget-readout").inner_text()
        if readout_after == readout_before:  # keyboard did nothing: drag the handle instead
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2, steps=6)
            page.mouse.up()
            readout_after = sliders["z1"].locator(".widget-readout").inner_text()
        assert readout_after != readout_before, f"slider z1 did not move (readout {readout_before!r})"

        try:
            page.wait_for_function("([img, src]) => img.src !== src && img.complete && img.naturalWidth > 0",
                                   arg=[image.element_handle(), before["src"]], timeout=60_000)
        except PlaywrightTimeout:
            pytest.fail(f"moving z1 from {readout_before} to {readout_after} did not change the image "
                        "within 60 s (is the slider observed? does the callback raise? see the kernel log)",
                        pytrace=False)
        _wait_for_run(page, 60)  # the kernel has handled every slider change
        page.wait_for_timeout(500)
        after = image.evaluate(_IMAGE)
        timings["slider_to_image"] = time.monotonic() - t1
        page.screenshot(path=str(artifacts / "browser_01_after.png"))
        explorer.screenshot(path=str(artifacts / "browser_01_explorer_after.png"))

        (artifacts / "browser_01_image_before.png").write_bytes(bytes(before["bytes"]))
        (artifacts / "browser_01_image_after.png").write_bytes(bytes(after["bytes"]))
        assert before["width"] > 0 and after["width"] > 0, "the explorer image is not a decodable picture"
        assert after["src"] != before["src"], "the <img> src did not change after moving the slider"
        assert after["bytes"] != before["bytes"], "the image changed its src but not its picture"
        px_before, px_after = _pixels(before["bytes"]), _pixels(after["bytes"])
        if px_before is not None:
            changed = px_before.shape != px_after.shape or bool((px_before != px_after).any())
            assert changed, "the image's PNG bytes changed but its pixels did not"
            if px_before.shape == px_after.shape:
                diff = abs(px_after - px_before)
                timings["pixels_changed_%"] = 100.0 * float((diff > 0).mean())
                timings["mean_abs_pixel_change"] = float(diff.mean())
            timings["grey_range_before"] = f"{px_before.min()}-{px_before.max()}"
            timings["grey_range_after"] = f"{px_after.min()}-{px_after.max()}"
        timings["z1"] = f"{readout_before} -> {readout_after}"
        bad = [t for t in BAD_TEXT if t in page.locator(".jp-OutputArea").evaluate_all(
            "els => els.map(e => e.textContent).join('\\n')")]
        assert not bad, f"after moving the slider the outputs show {bad}"
    except BaseException:
        try:
            page.screenshot(path=str(artifacts / "browser_01_failure.png"))
        except Exception:  # noqa: BLE001 (the page may be gone)
            pass
        print(f"server log tail:\n{lab.log_tail()}")
        raise
    finally:
        timings["total"] = time.monotonic() - t0
        summary = {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}
        (artifacts / "browser_01_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"browser test (times in s): {summary}")
