"""Plots the chapters share, so notebook cells stay short.

Every function returns the matplotlib ``Figure`` (Jupyter shows it; ``fig.savefig`` saves it).

Example:
    >>> fig = image_grid(images[:16], titles=[str(y) for y in labels[:16]])
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch


def _hwc(img):
    """A CHW/HW tensor or array in [0, 1] as an HWC (or HW) numpy array for imshow."""
    img = img.detach().float().cpu().numpy() if torch.is_tensor(img) else np.asarray(img, dtype=float)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    return np.clip(img, 0, 1)


def image_grid(images, titles=None, ncols=8, size=1.3, suptitle=None):
    """Show images (tensor [N, C, H, W] or list) in a grid, optional title per image."""
    n = len(images)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        img = _hwc(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def image_rows(rows: dict, size=1.2):
    """Rows of images with a label on the left, e.g. ``{"original": x, "reconstruction": x_hat}``."""
    names = list(rows)
    ncols = len(rows[names[0]])
    fig, axes = plt.subplots(len(names), ncols, figsize=(ncols * size, len(names) * size), squeeze=False)
    for r, name in enumerate(names):
        for c in range(ncols):
            ax = axes[r, c]
            img = _hwc(rows[name][c])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([]); ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def _smooth(values, k):
    if k <= 1 or len(values) < k:
        return np.asarray(values)
    return np.convolve(values, np.ones(k) / k, mode="valid")


def history_figure(history, smooth=20):
    """Left: training loss per step (raw and smoothed). Right: per-epoch validation columns."""
    val_cols = [k for k in (history.epochs[0] if history.epochs else {}) if k.startswith("val_")]
    fig, axes = plt.subplots(1, 2 if val_cols else 1, figsize=(10 if val_cols else 5.5, 3.2), squeeze=False)
    ax = axes[0, 0]
    steps = np.asarray(history.steps)
    ax.plot(steps, alpha=0.3, label="per step")
    sm = _smooth(steps, smooth)
    ax.plot(np.arange(len(sm)) + (len(steps) - len(sm)), sm, label=f"mean of {smooth}")
    ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.legend(); ax.grid(alpha=0.3)
    if val_cols:
        ax = axes[0, 1]
        epochs = history["epoch"]
        for col in val_cols:
            ax.plot(epochs, history[col], marker="o", label=col)
        ax.set_xlabel("epoch"); ax.legend(); ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


class LivePlot:
    """``fit(..., live_plot=True)``: redraws a History's figure in place in Jupyter after each epoch
    (does nothing outside IPython)."""

    def __init__(self):
        self.handle = None

    def update(self, history) -> None:
        try:
            from IPython.display import display
        except ImportError:
            return
        fig = history_figure(history)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def curves(series: dict, xlabel="epoch", ylabel="", title=None, x=None):
    """Several named lines on one axis, e.g. ``{"MSE": losses_a, "BCE": losses_b}``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, ys in series.items():
        ax.plot(x if x is not None else np.arange(1, len(ys) + 1), ys, marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel); ax.set_ylabel(ylabel); ax.grid(alpha=0.3); ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def accuracy_vs_labels(budgets, results: dict, title="accuracy vs labels per class"):
    """Mean +- sample standard deviation (ddof=1, as in the chapters' tables) over seeds per method.

    ``results = {"scratch": [[seed accs] per budget], ...}``; a budget with one seed gets no error bar, and
    ``None`` in place of a budget's scores means the method was not trained there (no point is drawn).

    Example:
        >>> accuracy_vs_labels([4, 128], {"LoRA": [[0.55, 0.6], [0.73, 0.74]], "IA3": [None, [0.7, 0.72]]})
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, per_budget in results.items():
        xs = [b for b, v in zip(budgets, per_budget) if v is not None]
        arr = [np.asarray(v, dtype=float) for v in per_budget if v is not None]
        mean = np.array([a.mean() for a in arr])
        std = np.array([a.std(ddof=1) if a.size > 1 else 0.0 for a in arr])
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xscale("log"); ax.set_xticks(budgets); ax.set_xticklabels([str(b) for b in budgets])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # no stray "6x10^0" labels between budgets
    ax.set_xlabel("labelled examples per class"); ax.set_ylabel("test accuracy")
    ax.set_title(title); ax.grid(alpha=0.3); ax.legend()
    fig.tight_layout()
    return fig


def embedding(points, labels, classes=None, title=None, s=6):
    """A 2-D scatter of points (e.g. t-SNE or a 2-D latent code) coloured by class."""
    points = points.detach().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    cmap = plt.get_cmap("tab10")
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(points[m, 0], points[m, 1], s=s, color=cmap(int(c) % 10),
                   label=classes[c] if classes is not None else str(c))
    ax.legend(markerscale=2, fontsize=7, loc="best", ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def confusion(y_true, y_pred, classes=None, normalize=None, title=None):
    """A confusion matrix (scikit-learn's display)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.5 if classes is None or len(classes) < 4 else 7, 4.5))
    ConfusionMatrixDisplay.from_predictions(np.asarray(y_true), np.asarray(y_pred), display_labels=classes,
                                            normalize=normalize, ax=ax, colorbar=False,
                                            values_format=".2f" if normalize else "d")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap(matrix, xlabels=None, ylabels=None, title=None, ax=None, cmap="viridis"):
    """A matrix as an image with optional tick labels (attention weights, similarities, ...)."""
    matrix = matrix.detach().float().cpu().numpy() if torch.is_tensor(matrix) else np.asarray(matrix)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * matrix.shape[1] + 1.5), max(3.5, 0.35 * matrix.shape[0] + 1)))
    else:
        fig = ax.figure
    im = ax.imshow(matrix, cmap=cmap)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels))); ax.set_xticklabels(xlabels, rotation=90, fontsize=8)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels))); ax.set_yticklabels(ylabels, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def bars(values: dict, ylabel="", title=None, errors: dict | None = None):
    """A bar chart of named values, optionally with error bars."""
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(values)), 3.2))
    names = list(values)
    ax.bar(names, [values[n] for n in names],
           yerr=[errors[n] for n in names] if errors else None, capsize=4, color="tab:blue")
    ax.set_ylabel(ylabel); ax.grid(alpha=0.3, axis="y")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def grouped_bars(values: dict, ylabel="", title=None, chance=None):
    """Bars grouped along x, one colour per series: ``{group: {series: [score per seed]}}``, each bar the mean
    with the sample standard deviation (ddof=1) as its error bar and the seeds as dots; ``chance`` draws a
    dashed line. Example:
        >>> grouped_bars({"probe": {"near": [0.5, 0.6], "none": [0.3, 0.4]}}, ylabel="test accuracy")
    """
    groups = list(values)
    series = list(dict.fromkeys(k for g in groups for k in values[g]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(groups) * len(series) / 2 + 2), 3.4))
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(series):
        xs = np.arange(len(groups)) + (j - (len(series) - 1) / 2) * width
        scores = [np.asarray(values[g].get(name, [np.nan]), dtype=float) for g in groups]
        mean = [a.mean() for a in scores]
        std = [a.std(ddof=1) if a.size > 1 else 0.0 for a in scores]
        ax.bar(xs, mean, width * 0.9, yerr=std, capsize=3, color=cmap(j), alpha=0.8, label=name)
        for x, a in zip(xs, scores):
            ax.plot(np.full(a.size, x), a, "k.", ms=3)
    if chance is not None:
        ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel); ax.grid(alpha=0.3, axis="y"); ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def stacked_bars(rows: dict, parts=None, xlabel="", title=None, scale=1.0):
    """Horizontal stacked bars: one bar per row name, one coloured segment per part.

    ``rows`` is ``{name: {part: value}}`` (e.g. the training memory of each method, by part);
    ``parts`` picks and orders the segments (default: the keys of the first row); every value is
    multiplied by ``scale`` (e.g. ``1 / 2**20`` for MiB). Each bar's total is written at its end.

    Example:
        >>> fig = stacked_bars({"full": {"weights": 86, "gradients": 86}, "LoRA": {"weights": 86, "gradients": 1}},
        ...                    xlabel="MiB")
    """
    names = list(rows)
    parts = list(parts or rows[names[0]])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.4))
    left = np.zeros(len(names))
    for part in parts:
        width = np.array([scale * rows[n].get(part, 0) for n in names], dtype=float)
        ax.barh(names, width, left=left, label=part)
        left += width
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis(); ax.set_xlabel(xlabel); ax.grid(alpha=0.3, axis="x")
    ax.set_xlim(0, 1.12 * left.max() if left.max() > 0 else 1)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def pretrain_finetune_diagram(title="Pretraining, then fine-tuning"):
    """The course's one idea as a picture: pretrain on cheap unlabelled data, fine-tune on few labels.

    Top row: unlabelled data -> pretraining -> a pretrained encoder (a representation).
    Bottom row: the encoder plus a small head, fine-tuned on a few labelled examples, beside
    the baseline that trains the same network from random weights on the same labels.

    Example:
        >>> fig = pretrain_finetune_diagram()
        >>> fig.savefig("pipeline.png")
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10, 4.4))
    ax.set_xlim(0, 10); ax.set_ylim(0, 4.4); ax.axis("off")
    colours = {"data": "#dbe9f6", "step": "#fde2c8", "model": "#d5efd5", "base": "#eeeeee"}

    def box(x, y, text, kind, w=2.3, h=1.0):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                    facecolor=colours[kind], edgecolor="0.35"))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    def arrow(x0, y0, x1, y1, text=None, dashed=False):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14,
                                     color="0.3", linestyle="--" if dashed else "-"))
        if text:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, text, ha="center", va="bottom", fontsize=8,
                    color="0.25")

    ax.text(0.05, 4.2, "1. pretraining: lots of cheap data, no labels", fontsize=10, weight="bold")
    box(1.4, 3.3, "many unlabelled\nexamples\n(images, sentences)", "data")
    box(5.0, 3.3, "pretext task\nreconstruct / contrast /\npredict masked words", "step", w=2.6)
    box(8.6, 3.3, "pretrained encoder\n(a representation)", "model")
    arrow(2.6, 3.3, 3.65, 3.3)
    arrow(6.35, 3.3, 7.4, 3.3, "learn weights")

    ax.text(0.05, 2.05, "2. fine-tuning: the task, with few labels", fontsize=10, weight="bold")
    box(1.4, 1.2, "a few labelled\nexamples\n(e.g. 10 per class)", "data")
    box(5.0, 1.2, "encoder + new head\ntrain (all or part)\nwith fit(...)", "step", w=2.6)
    box(8.6, 1.2, "task model\n(accuracy with\nfew labels)", "model")
    arrow(2.6, 1.2, 3.65, 1.2)
    arrow(6.35, 1.2, 7.4, 1.2)
    arrow(8.6, 2.75, 5.6, 1.75)
    ax.text(6.75, 1.86, "copy the weights", fontsize=8, color="0.25", rotation=18)
    ax.text(5.0, 0.25, "baseline: the same network from random weights on the same labels ('scratch').\n"
            "Every chapter measures task accuracy: pretrained + fine-tuned vs scratch.",
            ha="center", va="center", fontsize=8.5, style="italic", color="0.25")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def generation_speed(new_tokens, seconds: dict, title="Generation time against length"):
    """Time to generate against the number of new tokens, one line per way of generating
    (``seconds = {"without cache": [...], "with cache": [...]}``, log-log), and the speed-up of the
    last line over the first.

    Example:
        >>> fig = generation_speed([32, 64, 128], {"without cache": [0.2, 0.5, 1.6], "with cache": [0.1, 0.2, 0.4]})
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    for name, s in seconds.items():
        axes[0].plot(new_tokens, s, marker="o", label=name)
    axes[0].set_xscale("log", base=2); axes[0].set_yscale("log")
    axes[0].set_xlabel("new tokens"); axes[0].set_ylabel("seconds"); axes[0].legend()
    (first, a), (last, b) = list(seconds.items())[0], list(seconds.items())[-1]
    axes[1].plot(new_tokens, np.asarray(a) / np.asarray(b), marker="o", color="tab:green")
    axes[1].axhline(1, color="gray", ls=":")
    axes[1].set_xscale("log", base=2); axes[1].set_xlabel("new tokens")
    axes[1].set_ylabel(f"speed-up ({first} / {last})")
    for ax in axes:
        ax.set_xticks(new_tokens); ax.set_xticklabels([str(n) for n in new_tokens]); ax.grid(alpha=0.3)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    fig.suptitle(title); fig.tight_layout()
    return fig


def attention_grid(weights, tokens, ncols=6, size=1.9, title=None):
    """Every head's attention matrix of one layer: ``weights`` [heads, n, n], rows = queries.

    Example:
        >>> out = model(**enc, output_attentions=True)      # model loaded with attn_implementation="eager"
        >>> fig = attention_grid(out.attentions[0][0], tokenizer.convert_ids_to_tokens(enc["input_ids"][0]))
    """
    weights = weights.detach().float().cpu().numpy() if torch.is_tensor(weights) else np.asarray(weights)
    heads, n = weights.shape[0], weights.shape[-1]
    nrows = math.ceil(heads / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    show_ticks = n <= 16
    for h, ax in enumerate(axes.flat[:heads]):
        ax.imshow(weights[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=8)
        if show_ticks and h % ncols == 0:
            ax.axis("on"); ax.set_xticks([])
            ax.set_yticks(range(n)); ax.set_yticklabels(tokens, fontsize=5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cam_overlay(images, cams, titles=None, ncols=8, size=1.4, suptitle=None, alpha=0.5):
    """Class-activation maps (e.g. Grad-CAM, [N, h, w]) upsampled onto their images [N, C, H, W] in [0, 1].

    Each map is scaled to [0, 1] by its own maximum, so colours compare places within one image only.
    """
    import torch.nn.functional as F

    cams = torch.as_tensor(cams).detach().float().cpu()
    up = F.interpolate(cams[:, None], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    up = up / up.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    n = len(images)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, min(n, ncols), figsize=(min(n, ncols) * size, nrows * size * 1.15), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        img = _hwc(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.imshow(up[i].numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def soft_targets(images, probs: dict, classes, labels=None, size=1.6):
    """One row per image: the image, then its class probabilities at each temperature.

    ``probs`` maps a temperature to a [N, C] tensor of probabilities, e.g.
    ``{1: softmax(z), 4: softmax(z / 4)}`` (chapter 05). The true class bar is drawn darker.
    """
    temps = list(probs)
    n, c = len(images), len(classes)
    fig, axes = plt.subplots(n, 1 + len(temps), figsize=(size * (1 + 2.2 * len(temps)), size * n),
                             squeeze=False, gridspec_kw={"width_ratios": [1] + [2.2] * len(temps)})
    for i in range(n):
        img = _hwc(images[i])
        axes[i, 0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        axes[i, 0].axis("off")
        if labels is not None:
            axes[i, 0].set_title(classes[int(labels[i])], fontsize=8)
        for j, t in enumerate(temps):
            ax = axes[i, 1 + j]
            p = probs[t][i].detach().float().cpu().numpy() if torch.is_tensor(probs[t]) else np.asarray(probs[t][i])
            colours = ["tab:blue"] * c
            if labels is not None:
                colours[int(labels[i])] = "navy"
            ax.bar(range(c), p, color=colours)
            ax.set_ylim(0, 1); ax.set_yticks([0, 0.5, 1]); ax.tick_params(labelsize=7)
            ax.set_xticks(range(c))
            ax.set_xticklabels(classes if i == n - 1 else [], rotation=90, fontsize=7)
            if i == 0:
                ax.set_title(f"T = {t:g}", fontsize=9)
    fig.tight_layout()
    return fig
