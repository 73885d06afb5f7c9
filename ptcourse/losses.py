"""Losses the chapters derive and then use.

Example:
    >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    >>> nt_xent(z1, z2, temperature=0.5)          # SimCLR, chapter 02
    >>> distillation_loss(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)))  # chapter 05
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over 2N anchors.

    ``z1[i]`` and ``z2[i]`` are embeddings of two views of image ``i``. For every anchor the
    positive is the other view of the same image; the other 2N-2 embeddings are negatives.
    The loss is the cross-entropy of picking the positive among all non-self similarities,
    which is ``-log(exp(s_pos/t) / sum_{k != i} exp(s_ik/t))`` computed stably (log-sum-exp).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [N, d]; got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim.float(), positives)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE``.

    The KL term compares the softened distributions (softmax at temperature T), is computed
    from log-probabilities, summed over classes and averaged over the batch ("batchmean").
    T^2 keeps its gradients on the same scale as the cross-entropy's when T changes. The
    teacher's logits are treated as constants (detached).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)
