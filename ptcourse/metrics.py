"""Numbers about predictions and models: ``accuracy`` (a metric for ``fit`` and ``evaluate``) and
``count_parameters``.

Example:
    >>> history = ptcourse.fit(model, loader, epochs=2, val_loader=val, metrics={"acc": accuracy})
    >>> count_parameters(model, trainable_only=True)
"""
from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max equals the target.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item()
        0.5
    """
    return (logits.argmax(dim=-1) == targets).float().mean()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (a tensor shared by two layers counts once); ``trainable_only``: those
    that require gradients.

    Example:
        >>> count_parameters(torch.nn.Linear(512, 10))
        5130
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
