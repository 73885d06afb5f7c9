"""Checks for the exercises of chapter 05 (knowledge distillation).

Example:
    >>> check_softmax_t(my_softmax_t)
    >>> check_distillation_loss(my_distillation_loss)
    >>> check_latency(my_latency_ms)
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ._common import CheckResult, compare

__all__ = ["check_softmax_t", "check_distillation_loss", "check_latency"]


def _ref_softmax_t(logits, temperature):
    return F.softmax(logits / temperature, dim=-1)


def check_softmax_t(student_fn, quiet=False) -> CheckResult:
    """``student_fn(logits, temperature)``: softmax of ``logits / temperature`` over the last dimension."""
    g = torch.Generator().manual_seed(5)
    cases = [(3 * torch.randn(4, 10, generator=g), t) for t in (1.0, 4.0, 0.5, 10.0)]
    cases.append((torch.randn(7, generator=g), 2.0))
    return compare("check_softmax_t", student_fn, _ref_softmax_t, cases, grad=True, quiet=quiet,
                   hint="divide the logits by the temperature, then softmax over the last dimension "
                        "(dim=-1); each row must sum to 1.")


# --------------------------------------------------------------------------- distillation loss
def _ref_kd(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.9):
    from ..losses import distillation_loss
    return distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)


def _kd_variants(s, t, y, T, a):
    """Values of the usual wrong versions, to say which one a wrong answer looks like."""
    ce = F.cross_entropy(s, y)
    log_ps, log_pt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    kl_sum = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
    n, c = s.shape
    return {
        "the KL term is not multiplied by T²": a * kl_sum / n + (1 - a) * ce,
        "the KL term is averaged over every element (reduction='mean') instead of over the batch "
        "('batchmean')": a * T * T * kl_sum / (n * c) + (1 - a) * ce,
        "raw logits went into KLDivLoss (no log_softmax, no softmax, no temperature)":
            a * F.kl_div(s, t, reduction="mean") + (1 - a) * ce,
        "alpha weights the wrong term": (1 - a) * T * T * kl_sum / n + a * ce,
        "the KL is reversed, KL(student || teacher)":
            a * T * T * F.kl_div(log_pt, log_ps, reduction="batchmean", log_target=True) + (1 - a) * ce,
    }


def check_distillation_loss(student_fn, quiet=False) -> CheckResult:
    """``student_fn(student_logits, teacher_logits, labels, temperature, alpha)``: Hinton's KD loss.

    Compares values and gradients with the reference for several T and alpha, names the usual
    mistake when the value matches one, and checks that no gradient flows into the teacher logits.
    """
    name = "check_distillation_loss"
    g = torch.Generator().manual_seed(7)
    settings = [(4.0, 0.9), (1.0, 0.5), (2.0, 0.3), (10.0, 1.0), (4.0, 0.0), (3.0, 0.7)]
    cases = []
    for i, (T, a) in enumerate(settings):
        n = 5 + i
        cases.append((2 * torch.randn(n, 10, generator=g), 3 * torch.randn(n, 10, generator=g),
                      torch.randint(0, 10, (n,), generator=g), T, a))
    result = compare(name, student_fn, _ref_kd, cases, grad=True, quiet=True)
    if not result:
        hint = ("KL(softmax(teacher/T) || softmax(student/T)) from log-probabilities "
                "(F.log_softmax), reduction='batchmean', times T², then alpha * that + (1 - alpha) * CE.")
        for s, t, y, T, a in cases:
            try:
                got = float(student_fn(s.clone(), t.clone(), y.clone(), T, a))
            except Exception:  # noqa: BLE001 - compare() already reported the error
                break
            if abs(got - float(_ref_kd(s, t, y, T, a))) <= 1e-5 + 1e-4 * abs(got):
                continue
            if math.isnan(got):
                hint = ("your loss is NaN: KLDivLoss expects log-probabilities as input and probabilities "
                        "as target; raw teacher logits are negative and their log is NaN. "
                        "Use F.log_softmax(student/T) and F.log_softmax(teacher/T) with log_target=True.")
                break
            for what, value in _kd_variants(s, t, y, T, a).items():
                v = float(value)
                if abs(got - v) <= 1e-5 + 1e-4 * abs(v):
                    hint = f"your value matches the version where {what}."
                    break
            break
        msg = result.message.split("\n")[0].replace("❌ ", "")
        return _fail(name, msg.split(": ", 1)[-1], hint, quiet)
    # the teacher is a constant: no gradient may reach its logits
    s, t, y, T, a = cases[0]
    t = t.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    student_fn(s, t, y, T, a).backward()
    if t.grad is not None and t.grad.abs().max() > 0:
        return _fail(name, "a gradient flows into the teacher's logits",
                     "the teacher is a fixed target: use teacher_logits.detach() (or compute them "
                     "under torch.no_grad()).", quiet)
    text = f"✅ {name}: matches the reference on {len(cases)} random inputs (values and gradients), " \
           "and the teacher gets no gradient."
    if not quiet:
        print(text)
    return CheckResult(True, text)


def _fail(name, msg, hint, quiet):
    text = f"❌ {name}: {msg}\n   Hint: {hint}"
    if not quiet:
        print(text)
    return CheckResult(False, text)


# --------------------------------------------------------------------------- latency
class _Sleeper(torch.nn.Module):
    """A 'model' whose forward pass takes a known time; it records how it was called."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.w = seconds, torch.nn.Parameter(torch.ones(1))
        self.calls, self.train_calls, self.grad_calls = 0, 0, 0

    def forward(self, x):
        self.calls += 1
        self.train_calls += int(self.training)
        self.grad_calls += int(torch.is_grad_enabled())
        time.sleep(self.seconds)
        return x * self.w


def check_latency(student_fn, quiet=False) -> CheckResult:
    """``student_fn(model, example_batch) -> milliseconds per image`` (median, eval mode, no grad).

    Times a model whose forward pass sleeps 20 ms on a batch of 8 images, so the answer must be
    about 2.5 ms per image; it also checks that the model ran in eval mode without autograd.
    """
    name = "check_latency"
    seconds, batch = 0.02, 8
    model = _Sleeper(seconds).train()
    try:
        got = student_fn(model, torch.rand(batch, 3, 4, 4))
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001
        return _fail(name, f"raised {type(err).__name__}: {err}", "time `model(x)` with torch.utils.benchmark.Timer.",
                     quiet)
    expected = seconds * 1000 / batch
    try:
        got = float(got)
    except (TypeError, ValueError):
        return _fail(name, f"returned {type(got).__name__}, expected a number of milliseconds",
                     "return measurement.median * 1000 / batch_size as a float.", quiet)
    if model.calls == 0:
        return _fail(name, "the model was never called", "time the call `model(x)`.", quiet)
    if model.train_calls:
        return _fail(name, "the model ran in training mode",
                     "call model.eval() first: dropout and batch-norm behave differently in training.", quiet)
    if model.grad_calls:
        return _fail(name, "the forward passes recorded autograd graphs",
                     "time inside torch.inference_mode() (or torch.no_grad()): inference needs no gradients.",
                     quiet)
    if not (0.9 * expected <= got <= 2.0 * expected):
        hint = "return the median time of one call, per image, in milliseconds."
        if abs(got - expected * batch) < expected * batch:
            hint = "divide by the batch size: the answer is per image."
        elif got < expected / 100:
            hint = "the Timer reports seconds: multiply by 1000 for milliseconds."
        return _fail(name, f"a forward pass that takes {seconds * 1000:.0f} ms on {batch} images gave "
                           f"{got:.4g}, expected about {expected:.3g} ms per image", hint, quiet)
    text = f"✅ {name}: {got:.3g} ms per image for a model that takes {expected:.3g} ms per image " \
           "(eval mode, no autograd)."
    if not quiet:
        print(text)
    return CheckResult(True, text)
