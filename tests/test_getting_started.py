"""Chapter 00's library code: the pretraining/fine-tuning diagram."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ptcourse import plots  # noqa: E402


def test_pretrain_finetune_diagram_returns_a_figure_with_both_stages():
    fig = plots.pretrain_finetune_diagram()
    try:
        assert isinstance(fig, Figure)
        texts = " ".join(t.get_text() for t in fig.axes[0].texts)
        assert "pretraining" in texts and "fine-tuning" in texts
        assert len(fig.axes[0].patches) >= 6          # six boxes (plus arrows)
    finally:
        plt.close(fig)


def test_course_map_has_a_row_for_every_chapter_notebook():
    import json
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cells = json.loads((root / "chapters" / "00_getting_started.ipynb").read_text(encoding="utf-8"))["cells"]
    course_map = next("".join(c["source"]) for c in cells if "### The course map" in "".join(c["source"]))
    rows = set(re.findall(r"^\| (\d\d) \|", course_map, re.M))
    notebooks = {p.name[:2] for p in (root / "chapters").glob("[0-9][0-9]_*.ipynb")}
    assert notebooks <= rows, f"chapters without a row in chapter 00's course map: {sorted(notebooks - rows)}"
