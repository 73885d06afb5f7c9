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
