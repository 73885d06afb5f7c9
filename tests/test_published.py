"""Chapters published with their outputs: the outputs came from the code beside them, and they are readable.

A chapter that carries outputs must match its record (``results/NN.json``): the hash of its code
cells equals the record's ``code_sha256`` and its metadata's, and its metadata names the record's run.
The recording itself (``python -m ptcourse run --record``) is tested end to end on a tiny chapter
(``tests/_published.py``) in a temporary course folder.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from _published import CHAPTER, example_notebook, load, record_example
from ptcourse.runtime import pinned_cpu_kernels
from ptcourse.tools import meta, published

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _png_size(b64: str) -> tuple[int, int]:
    head = base64.b64decode(b64)[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _tiny_png() -> str:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("P", (4, 3)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------- the committed chapters
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_a_chapter_with_outputs_carries_those_of_its_recorded_run(path):
    """Every chapter is published with its outputs (the design's "Published form"), from its recorded run."""
    nb = load(path)
    assert published.carries_outputs(nb), \
        f"{path.name} carries no outputs: python -m ptcourse run --record chapters/{path.name}"
    record_path = ROOT / "results" / f"{path.stem}.json"
    record = load(record_path) if record_path.exists() else None
    assert published.provenance_problems(nb, record, path.stem) == []
    assert published.output_problems(nb, size=path.stat().st_size) == []


def test_the_code_hash_sees_code_and_not_prose_nor_the_install_address():
    nb = load(ROOT / "chapters" / "05_knowledge_distillation.ipynb")
    before = published.code_sha256(nb)
    prose = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    prose["source"] = ["A sentence rewritten.\n"] + list(prose["source"])
    assert published.code_sha256(nb) == before
    first = _code_cells(nb)[0]
    first["source"] = meta.setup_cell("https://github.com/someone/their-fork").replace("v0.2.0", "v9.9.9")
    assert published.code_sha256(nb) == before, "a fork or a release does not invalidate the recorded outputs"
    first["source"] = first["source"] + "  \n\n"            # trailing blanks: no change a kernel sees
    assert published.code_sha256(nb) == before
    cell = _code_cells(nb)[3]
    cell["source"] = "".join(cell["source"]).replace("=", " = ", 1)
    assert published.code_sha256(nb) != before


def test_provenance_problems_name_each_way_outputs_can_be_stale():
    nb = example_notebook()
    for i, cell in enumerate(_code_cells(nb)):
        cell["execution_count"] = i + 1
    code = published.code_sha256(nb)
    record = {"chapter": CHAPTER, "recorded": "2026-01-02T03:04:05+00:00", "profile": "cpu", "code_sha256": code}
    nb["metadata"]["ptcourse"] = {"record": {k: record[k] for k in ("chapter", "recorded", "profile", "code_sha256")}}
    assert published.provenance_problems(nb, record, CHAPTER) == []
    assert "does not exist" in published.provenance_problems(nb, None, CHAPTER)[0]
    later = dict(record, recorded="2026-02-02T00:00:00+00:00")   # the record of another run
    assert any("another run" in p for p in published.provenance_problems(nb, later, CHAPTER))
    _code_cells(nb)[1]["execution_count"] = None
    assert any("did not run" in p for p in published.provenance_problems(nb, record, CHAPTER))
    del nb["metadata"]["ptcourse"]
    assert "no metadata.ptcourse.record" in published.provenance_problems(nb, record, CHAPTER)[0]


def test_output_problems_find_what_a_reader_should_not_get():
    def cell(*outputs):
        return {"cell_type": "code", "execution_count": 1, "source": "", "metadata": {}, "outputs": list(outputs)}

    nb = {"cells": [
        cell({"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": []}),
        cell({"output_type": "display_data", "metadata": {}, "data": {
            published.WIDGET_VIEW: {"model_id": "x"}, "text/plain": "FloatSlider(value=1.0)"}}),
        cell({"output_type": "display_data", "metadata": {}, "data": {"image/svg+xml": "<svg/>"}}),
        cell({"output_type": "stream", "name": "stdout", "text": "saved to /home/ada/ptcourse/model.pt\n"}),
        cell({"output_type": "stream", "name": "stdout", "text": f"cache {Path.home() / 'x'}\n"}),
        cell({"output_type": "stream", "name": "stdout",
              "text": "ok: ../results/05.json, sentence-transformers/all-MiniLM-L6-v2, 12.3 steps/s, 3/4, "
                      "https://github.com/ptcourse/ptcourse/blob/v1/x.ipynb, ~/data, <tmp>/run, CUDA_HOME='/usr/local'\n"}),
    ]}
    problems = published.output_problems(nb, size=published.SIZE_BUDGET + 1)
    assert problems[0].startswith("2.00 MB, over the budget")
    text = "\n".join(problems)
    for expected in ("cell 0: an error output", "cell 1: a widget", "cell 2: a image/svg+xml image",
                     "cell 3: a path of the machine that ran it: '/home/ada/ptcourse/model.pt'", "cell 4: a path"):
        assert expected in text
    assert "cell 5" not in text, "relative paths, model ids, rates, URLs and system folders are not machine paths"


def test_a_widget_becomes_what_it_showed():
    """nbclient's record of a slider + image widget (a VBox) becomes a line naming the slider's value and a PNG."""
    png = _tiny_png()
    states = {"box": {"_model_name": "VBoxModel", "children": ["IPY_MODEL_z1", "IPY_MODEL_img"]},
              "z1": {"_model_name": "FloatSliderModel", "description": "z1", "value": 0.123456},
              "img": {"_model_name": "ImageModel", "format": "png"}}
    buffers = {"img": {("value",): {"data": png, "encoding": "base64", "path": ["value"]}}}
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "metadata": {}, "source": "display(box)", "outputs": [
        {"output_type": "display_data", "metadata": {},
         "data": {published.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "VBox(children=(...))"}}]}]}
    published.readable(nb, states, buffers, ROOT)
    note, image = nb["cells"][0]["outputs"]
    assert note["data"]["text/plain"] == "Interactive when you run the notebook: shown here at z1 = 0.1235."
    assert image["data"]["image/png"] == png
    assert published.output_problems(nb) == []


def test_figures_are_reencoded_smaller_and_exactly_the_same():
    import io

    import matplotlib
    import numpy as np
    from PIL import Image
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))                    # an image grid, as the chapters draw
    for ax, img in zip(axes.flat, np.random.default_rng(0).random((16, 28, 28))):
        ax.imshow(img, cmap="gray")
        ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=published.FIGURE_DPI)
    plt.close(fig)
    png = base64.b64encode(buffer.getvalue()).decode()
    smaller = published.smaller_png(png)
    assert len(smaller) < 0.8 * len(png)

    def pixels(b64):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    assert np.array_equal(pixels(smaller), pixels(png))


def test_progress_bars_leave_their_last_line_and_folders_are_written_in_words(tmp_path):
    bar = "\r  0%|          | 0/8\r 50%|#####     | 4/8\r100%|##########| 8/8\n"
    nb = {"cells": [{"cell_type": "code", "execution_count": 1, "metadata": {"execution": {"x": 1}}, "source": "",
                     "outputs": [{"output_type": "stream", "name": "stdout", "text": "epoch 1" + bar},
                                 {"output_type": "stream", "name": "stdout", "text": f"saved in {tmp_path}/m.pt\n"},
                                 {"output_type": "stream", "name": "stderr", "text": f"{Path.home()}/.cache\n"}]}]}
    published.readable(nb, {}, {}, ROOT)
    out, err = nb["cells"][0]["outputs"]
    assert out["text"] == f"100%|##########| 8/8\nsaved in {tmp_path}/m.pt\n".replace(tempfile.gettempdir(), "<tmp>")
    assert err["text"] == "~/.cache\n"
    assert nb["cells"][0]["metadata"] == {}


# ----------------------------------------------------------------------------- recording, end to end
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    return record_example(root), root


@pytest.mark.slow
def test_record_publishes_readable_outputs_tied_to_the_record(recorded):
    path, root = recorded
    nb, record = load(path), load(root / "results" / f"{CHAPTER}.json")
    assert published.provenance_problems(nb, record, CHAPTER) == []
    assert published.output_problems(nb, size=path.stat().st_size) == []
    assert nb["metadata"]["ptcourse"]["record"] == {
        "chapter": CHAPTER, "recorded": record["recorded"], "code_sha256": published.code_sha256(nb),
        "profile": "smoke"}
    assert nb["metadata"]["kernelspec"]["name"] == "python3"          # the notebook's own metadata is kept
    setup, figure, fit, folders, widget, report = _code_cells(nb)
    assert [c["execution_count"] for c in _code_cells(nb)] == [1, 2, 3, 4, 5, 6]
    assert "profile=smoke" in "".join(setup["outputs"][0]["text"])
    (png,) = [o["data"]["image/png"] for o in figure["outputs"] if "image/png" in o.get("data", {})]
    width, height = _png_size(png)
    # a 5 x 2.5 inch figure at FIGURE_DPI (the tight bounding box trims margins, and may add a title's pixels)
    assert 0.6 * 5 * published.FIGURE_DPI < width <= 1.1 * 5 * published.FIGURE_DPI
    assert 0.6 * 2.5 * published.FIGURE_DPI < height <= 1.1 * 2.5 * published.FIGURE_DPI
    (bar,) = ["".join(o["text"]) for o in fit["outputs"] if o["output_type"] == "stream"]
    assert "\r" not in bar and bar.count("\n") == 1 and "epoch 2/2: 100%|" in bar, bar
    text = "".join("".join(o["text"]) for o in folders["outputs"])
    assert text == "working in <course>/chapters\ntemporary files in <tmp>\n"
    note, shown = widget["outputs"]
    assert "".join(note["data"]["text/plain"]) == "Interactive when you run the notebook: shown here at k = 2."
    assert "image/png" in shown["data"]
    assert f"in ../results/{CHAPTER}.json" in "".join(report["outputs"][0]["text"])
    # the recorded kernel ran with the CPU kernels pinned where this processor allows it, and says so
    assert record["cpu_kernels"]["pinned"] == pinned_cpu_kernels()
    if pinned_cpu_kernels():
        assert record["cpu_kernels"]["capability"] == "AVX2"


@pytest.mark.slow
def test_a_changed_code_cell_breaks_provenance_and_changed_prose_does_not(recorded, tmp_path):
    path, root = recorded
    record = load(root / "results" / f"{CHAPTER}.json")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = load(copy)
    nb["cells"][0]["source"] = "# A recorded example, retitled\n"
    assert published.provenance_problems(nb, record, CHAPTER) == []
    cell = _code_cells(nb)[3]
    cell["source"] = "".join(cell["source"]).replace("print('working in'", "print('working in:'")
    problems = published.provenance_problems(nb, record, CHAPTER)
    assert len(problems) == 2 and "changed since the run recorded" in problems[0]


@pytest.mark.slow
def test_nbval_runs_a_recorded_chapter_without_writing_to_it(recorded, tmp_path):
    """The test suite executes chapters with ``--nbval-lax``: the stored outputs are not compared and the file stays as it was."""
    path, _ = recorded
    before = path.read_bytes()
    env = dict(os.environ, PTCOURSE_PROFILE="smoke", PTCOURSE_RESULTS=str(tmp_path / "results"), MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert path.read_bytes() == before


@pytest.mark.slow
def test_a_failed_run_publishes_nothing(recorded):
    """A cell that fails after ``ptcourse.report`` ran: neither the chapter nor the record changes."""
    path, root = recorded
    chapter, record_before = path.read_bytes(), (root / "results" / f"{CHAPTER}.json").read_bytes()
    failing = example_notebook()
    failing["cells"] = [nbformat.v4.new_code_cell(f"import ptcourse\nptcourse.report({CHAPTER!r}, {{'x': 1}})"),
                        nbformat.v4.new_code_cell("raise ValueError('late failure')")]
    try:
        nbformat.write(nbformat.from_dict(failing), path)
        edited = path.read_bytes()
        with pytest.raises(published.RecordError, match="ValueError: late failure"):
            published.record(path, "smoke", root=root, out_dir=root / "runs", timeout=300, echo=lambda *a: None)
        assert path.read_bytes() == edited, "the chapter is left as it was"
        assert (root / "results" / f"{CHAPTER}.json").read_bytes() == record_before, "the run's record is undone"
        assert (root / "runs" / "recorded" / path.name).exists(), "the executed copy is kept for a look"
    finally:
        path.write_bytes(chapter)
