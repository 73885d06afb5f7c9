"""A tiny chapter that has everything a published chapter's outputs hold, recorded for real.

It stands in for a real chapter (those take minutes even in the smoke profile): the setup cell,
a formula, a matplotlib figure, a ``ptcourse.fit`` progress bar, printed machine folders (which the
runner must write in words), a slider widget with its figure, and the ``ptcourse.report`` call that
writes the record. ``record_example(root)`` runs it with ``python -m ptcourse run --record``'s code
(smoke profile) inside a course folder ``root``.
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat

from ptcourse.tools import meta

CHAPTER = "99_recorded_example"

CELLS = [
    ("markdown", "# A recorded example\n\nThe softmax with temperature $T$ is "
                 "$p_i = \\frac{e^{z_i / T}}{\\sum_j e^{z_j / T}}$, and the loss\n\n"
                 "$$\\mathcal{L} = -\\sum_i y_i \\log p_i$$"),
    ("code", meta.SETUP_CELL),
    ("code", "import matplotlib.pyplot as plt\nimport numpy as np\n\n"
             "fig, ax = plt.subplots(figsize=(5, 2.5))\nax.plot(np.sin(np.linspace(0, 6, 50)))\n"
             "ax.set_title('a sine')\nplt.show()"),
    ("markdown", "A short training run: its progress bar must leave one line of text."),
    ("code", "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\n\n"
             "ptcourse.seed_everything(0)\nx = torch.randn(64, 3)\ny = (x[:, 0] > 0).long()\n"
             "history = ptcourse.fit(torch.nn.Linear(3, 2), DataLoader(TensorDataset(x, y), batch_size=8),"
             " epochs=2, lr=0.1)"),
    ("code", "import os, tempfile\nprint('working in', os.getcwd())\nprint('temporary files in', tempfile.gettempdir())"),
    ("code", "import ipywidgets as widgets\n\n\ndef show(k=2.0):\n    fig, ax = plt.subplots(figsize=(3, 2))\n"
             "    ax.plot(np.linspace(0, 1, 20) ** k)\n    plt.show()\n\n\n"
             "widgets.interact(show, k=widgets.FloatSlider(value=2.0, min=0.5, max=4.0, description='k'));"),
    ("code", f"ptcourse.report({CHAPTER!r}, {{'final_loss': history.last['train_loss']}})"),
]


def example_notebook() -> dict:
    cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
             for kind, src in CELLS]
    return nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


def record_example(root) -> Path:
    """Write the example into ``root/chapters/`` and record it as ``python -m ptcourse run --record --profile
    smoke`` does; return its path."""
    from ptcourse.tools import cli

    root = Path(root)
    path = root / "chapters" / f"{CHAPTER}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    (root / "results").mkdir(exist_ok=True)
    nbformat.write(nbformat.from_dict(example_notebook()), path)
    code = cli.main(["run", "--record", str(path), "--profile", "smoke", "--root", str(root),
                     "--out", str(root / "runs"), "--timeout", "300"])
    assert code == 0, f"recording {path.name} failed (its messages are above)"
    return path


def load(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
