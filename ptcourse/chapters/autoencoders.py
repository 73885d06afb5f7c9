"""Chapter 01's data splits and the arithmetic behind its number of seeds.

The learning rate of every classifier and the ``k`` of every nearest-neighbour vote are chosen on a
**validation** split taken from the training data (with :func:`ptcourse.compare.search`); the test
split is used once, after every choice, to report. In the chapter the denoising autoencoder's own
settings (noise level, code size, learning rate, epochs) are **fixed, not tuned**: tuning them would
cost one pretraining run per value, and the chapter compares *one* pretrained encoder against
scratch, so its verdicts name that single pretraining run among what they do not cover. (The
exercises' open experiment is where a student chooses the noise level and code size on validation.) The labelled training images
of every budget and seed come from the rest of the pool, so they never overlap the validation set.

Example:
    >>> from ptcourse import data
    >>> pool = data.load("mnist", "train", limit=6_000, seed=1)
    >>> labelled_pool, val = carve_validation(pool, 1_000)
    >>> train = per_class_subset(labelled_pool, 10, seed=0)    # 100 images, 10 per digit
    >>> len(labelled_pool), len(val), len(train)
    (5000, 1000, 100)
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import ImageDataset, balanced_indices, stratified_indices

__all__ = ["subset", "carve_validation", "per_class_subset", "interval_halfwidth"]


def subset(dataset: ImageDataset, idx) -> ImageDataset:
    """The images and labels of ``dataset`` at ``idx`` (a new :class:`ImageDataset`, same classes)."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    return ImageDataset(dataset.images[idx], dataset.labels[idx], dataset.classes, dataset.transform)


def carve_validation(dataset: ImageDataset, n_val: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split ``dataset`` into ``(rest, validation)``: a stratified, seeded validation set of ``n_val``.

    The two parts share no image. Example:
        >>> ds = ImageDataset(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20) % 2, ["a", "b"])
        >>> rest, val = carve_validation(ds, 4)
        >>> len(rest), len(val), val.labels.bincount().tolist()
        (16, 4, [2, 2])
    """
    labels = dataset.labels.numpy()
    if not 0 < n_val < len(labels):
        raise ValueError(f"n_val={n_val} must be between 1 and {len(labels) - 1} (the dataset has {len(labels)}).")
    val_idx = stratified_indices(labels, n_val, seed)
    rest_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return subset(dataset, rest_idx), subset(dataset, val_idx)


def per_class_subset(dataset: ImageDataset, per_class: int, seed: int = 0) -> ImageDataset:
    """``per_class`` seeded images of every class of ``dataset`` (a few-label training set)."""
    return subset(dataset, balanced_indices(dataset.labels.numpy(), per_class, seed))


def interval_halfwidth(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of the paired ``confidence`` interval over ``n`` seeds when the per-seed differences
    have standard deviation ``sd``: ``t(n - 1) * sd / sqrt(n)``.

    A power argument for the number of seeds, made before any result: a difference smaller than this
    half-width cannot be told from zero, so choose ``n`` with a half-width below the differences
    worth telling apart. Example (a spread of 3 points between paired seeds):
        >>> round(interval_halfwidth(3.0, 5), 2), round(interval_halfwidth(3.0, 20), 2)
        (3.72, 1.4)
    """
    from scipy import stats
    if n < 2:
        return float("inf")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n))
