"""Judging a representation without fine-tuning it: frozen features, kNN and a linear probe.

Example:
    >>> train_f = extract_features(encoder, train_set)          # [N, d], encoder frozen
    >>> test_f = extract_features(encoder, test_set)
    >>> knn_accuracy(train_f, train_set.labels, test_f, test_set.labels, k=20)
    >>> linear_probe(train_f, train_set.labels, test_f, test_set.labels)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .runtime import best_device


@torch.no_grad()
def extract_features(model, data, batch_size: int = 256, device=None) -> torch.Tensor:
    """Run ``model`` in eval mode over images and return the outputs, on the CPU, in order.

    ``data`` is a tensor of inputs [N, ...], a Dataset of ``(x, y)`` pairs, or a DataLoader.
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else best_device()
    if torch.is_tensor(data):
        batches = (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    else:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
        batches = (b[0] if isinstance(b, (list, tuple)) else b for b in loader)
    was_training = model.training
    model.eval().to(device)
    feats = [model(x.to(device)).flatten(1).float().cpu() for x in batches]
    model.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, k: int = 200, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-nearest-neighbour vote with cosine similarity (Wu et al. 2018, as used for SimCLR/MoCo).

    Each of the ``k`` most similar training examples votes for its class with weight
    ``exp(similarity / temperature)``; the class with the largest total wins.
    """
    train_labels = torch.as_tensor(train_labels)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    preds = []
    for start in range(0, len(query_feats), chunk):
        q = F.normalize(query_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 200,
                 temperature: float = 0.07) -> float:
    """Accuracy of :func:`knn_predict` on the test features."""
    pred = knn_predict(train_feats, train_labels, test_feats, k, temperature)
    return float((pred == torch.as_tensor(test_labels)).float().mean())


def logistic_probe(C: float = 1.0, seed: int = 0):
    """The course's linear probe, unfitted: standardisation, then a scikit-learn logistic regression.

    Example:
        >>> logistic_probe(C=0.1).fit(f_train, y_train).predict(f_val)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def fit_logistic_probe(x, y, C: float = 1.0, seed: int = 0):
    """Fit :func:`logistic_probe` on frozen features, with one BLAS thread.

    Returns the fitted pipeline; score it with ``(probe.predict(f) == y).mean()``. One thread is
    the fast choice here: once PyTorch has run in the process, its OpenMP threads and OpenBLAS's
    compete for the same cores: on the course's 2-core machine five probes on 1,000 x 192 CIFAR
    features (chapter 02's largest budget) took 12.8 s with two BLAS threads and 1.06 s with one, 10
    to 12 times faster over its values of C (``benchmarks/probe_threads.py``). The fit is the same
    up to lbfgs's tolerance (4 of 5,000 validation predictions differed at C = 1, none at smaller C).

    Example:
        >>> probe = fit_logistic_probe(f_train, y_train, C=0.1); (probe.predict(f_val) == y_val).mean()
    """
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        return logistic_probe(C, seed).fit(np.asarray(x, dtype=np.float64), np.asarray(y))


def linear_probe(train_feats, train_labels, test_feats, test_labels, C: float | None = None,
                 seed: int = 0) -> float:
    """Test accuracy of a logistic regression on frozen, standardised features (scikit-learn).

    ``C`` (inverse regularisation) is chosen by 3-fold cross-validation on the training
    features when not given and every class has at least 3 examples; else 1.0. Every fit runs
    with one BLAS thread, as in :func:`fit_logistic_probe`.
    """
    from sklearn.model_selection import cross_val_score
    from threadpoolctl import threadpool_limits

    xtr, ytr = np.asarray(train_feats, dtype=np.float64), np.asarray(train_labels)
    xte, yte = np.asarray(test_feats, dtype=np.float64), np.asarray(test_labels)
    with threadpool_limits(limits=1, user_api="blas"):
        if C is None:
            C = 1.0
            if np.bincount(ytr).min() >= 3:
                C = max((0.01, 0.1, 1.0, 10.0),
                        key=lambda c: cross_val_score(logistic_probe(c, seed), xtr, ytr, cv=3).mean())
        return float((logistic_probe(C, seed).fit(xtr, ytr).predict(xte) == yte).mean())
