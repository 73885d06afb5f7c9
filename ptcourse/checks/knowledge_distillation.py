"""Checks for the exercises of chapter 05 (knowledge distillation).

Example:
    >>> check_softmax_t(my_softmax_t)
    >>> check_distillation_loss(my_distillation_loss)
    >>> check_latency(my_latency_ms)
    >>> lab = DistillLab(per_class=10)                       # the open-ended experiment
    >>> check_experiment(lab, trials, chosen)
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ._common import CheckResult, SealedTestLab, attempt, compare, split_trials, train_on_tensors
from ._common import result as _report

__all__ = ["check_softmax_t", "check_distillation_loss", "check_latency", "DistillLab", "check_experiment"]


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
    return _report(name, True, f"matches the reference on {len(cases)} random inputs (values and gradients), "
                               "and the teacher gets no gradient.", quiet=quiet)


def _fail(name, msg, hint, quiet):
    return _report(name, False, msg, hint, quiet)


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
    got, error = attempt(student_fn, model, torch.rand(batch, 3, 4, 4))
    if error:
        return _fail(name, error, "time `model(x)` with torch.utils.benchmark.Timer.", quiet)
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
    return _report(name, True, f"{got:.3g} ms per image for a model that takes {expected:.3g} ms per image "
                               "(eval mode, no autograd).", quiet=quiet)


# --------------------------------------------------------------------------- the open-ended experiment

class DistillLab(SealedTestLab):
    """The data of the open-ended experiment (MNIST): a trained teacher, a student's few labels,
    unlabelled transfer images, a validation split, and a sealed test split.

    * ``x_labelled, y_labelled``: ``per_class`` labelled images per digit (the student's labels);
    * ``x_transfer``: ``n_transfer`` other images, without labels;
    * ``teacher``: an MLP (784-512-10) trained here on ``teacher_images`` further labelled images,
      and its logits ``z_labelled`` / ``z_transfer`` for the two sets above (computed once);
    * ``val_accuracy(student)``: accuracy on ``n_val`` validation images (what you select on).

    The test split is not handed out: only :func:`check_experiment` opens it, for the setting
    you chose on validation and for the scratch baseline. All sets are disjoint.

    Example:
        >>> lab = DistillLab(per_class=10, n_transfer=5_000)
        >>> lab.val_accuracy(student)
    """

    def __init__(self, per_class: int = 10, n_transfer: int = 5_000, n_val: int = 1_000, n_test: int = 2_000,
                 teacher_images: int = 3_000, teacher_epochs: int = 5, seed: int = 0):
        from ..data import balanced_indices, load
        from ..runtime import profile
        data = load("mnist", "train")
        x, y = data.tensors()
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        t_idx = order[:teacher_images]
        u_idx = order[teacher_images:teacher_images + n_transfer]
        v_idx = order[teacher_images + n_transfer:teacher_images + n_transfer + n_val]
        rest = order[teacher_images + n_transfer + n_val:]
        l_idx = rest[torch.as_tensor(balanced_indices(y[rest].numpy(), per_class, seed=seed))]
        self.per_class, self.n_test, self._seed = per_class, n_test, seed
        self.x_labelled, self.y_labelled = x[l_idx], y[l_idx]
        self.x_transfer = x[u_idx]
        self.x_val, self.y_val = x[v_idx], y[v_idx]
        self.teacher = self._train_teacher(x[t_idx], y[t_idx], teacher_epochs, seed)
        with torch.no_grad():
            self.z_labelled = self.teacher(self.x_labelled)
            self.z_transfer = self.teacher(self.x_transfer)
        self.teacher_val_acc = self.val_accuracy(self.teacher)
        self._tested = {}
        self.profile = profile().name

    @staticmethod
    def _train_teacher(x, y, epochs, seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                  torch.nn.Linear(512, 10))
        return train_on_tensors(net, x, y, epochs, lr=1e-3, seed=seed).eval()

    batch_size = 1000

    def _test_split(self):
        from ..data import load
        return load("mnist", "test", limit=self.n_test, seed=self._seed).tensors()


def check_experiment(lab: DistillLab, trials: list, chosen, quiet: bool = False, bar: float = 0.01) -> CheckResult:
    """Judge the open-ended T / alpha search (its outcome, not the code that produced it).

    ``trials`` is a list of dicts, one per trained student: the distilled ones with the keys
    ``"student"``, ``"T"``, ``"alpha"`` and ``"val_acc"``; one scratch baseline (labels only, no
    teacher) with ``"student"``, ``"scratch": True`` and ``"val_acc"``. ``chosen`` is the index of
    the distilled trial you picked. The check passes when

    * there are at least four distinct (T, alpha) settings and one scratch trial;
    * every recorded ``val_acc`` is the trial's validation accuracy (``lab.val_accuracy``);
    * ``chosen`` has the best validation accuracy of the distilled trials;
    * on the sealed test split the chosen student beats the scratch student by more than ``bar``.

    It also tells you where your choice ranks on the test split among all your settings, and how far
    it is from the best one in hindsight (which no honest procedure can pick).
    """
    from ._common import result
    name = "check_experiment"
    split = split_trials(name, trials, "student", "student", quiet)
    if isinstance(split, CheckResult):
        return split
    scratch, kd = [split[0]], split[1]
    for i in kd:
        if "T" not in trials[i] or "alpha" not in trials[i]:
            return result(name, False, f"trial {i} is distilled: record its 'T' and 'alpha'.", quiet=quiet)
    settings = {(float(trials[i]["T"]), float(trials[i]["alpha"])) for i in kd}
    if len(settings) < 4:
        return result(name, False, f"a search needs at least four (T, alpha) settings; you tried {len(settings)}.",
                      hint="try several temperatures (e.g. 1 to 10) and two or more alphas.", quiet=quiet)
    val = lab._verified_val(name, trials, "student", quiet)
    if isinstance(val, CheckResult):
        return val
    if not isinstance(chosen, int) or chosen not in kd:
        return result(name, False, f"`chosen` must be the index of one of your distilled trials {kd}.", quiet=quiet)
    best = max(kd, key=lambda i: val[i])
    if val[chosen] < val[best] - 1e-9:
        return result(name, False, f"you chose trial {chosen} (validation {val[chosen]:.4f}), but trial {best} has "
                                   f"{val[best]:.4f}.",
                      hint="pick the best setting on validation; the test split only reports the one you picked.",
                      quiet=quiet)
    test = {i: lab._test_accuracy(trials[i]["student"]) for i in [chosen, scratch[0]] + kd}
    gain = test[chosen] - test[scratch[0]]
    oracle = max(kd, key=lambda i: test[i])
    rank = 1 + sum(test[i] > test[chosen] for i in kd)
    t = trials[chosen]
    where = (f"your choice T={t['T']}, alpha={t['alpha']} (validation {val[chosen]:.4f}): test {test[chosen]:.4f} vs "
             f"scratch {test[scratch[0]]:.4f} ({gain * 100:+.1f} points). On the test split it ranks {rank} of "
             f"{len(kd)} settings; the best in hindsight (T={trials[oracle]['T']}, alpha={trials[oracle]['alpha']}) "
             f"reached {test[oracle]:.4f}, {(test[oracle] - test[chosen]) * 100:.1f} points more: the price of "
             "choosing on a finite validation split.")
    if lab.profile == "smoke":
        where += " (smoke profile: tiny runs, the numbers are not meaningful)"
    if gain <= bar:
        return result(name, False, where,
                      hint=f"the chosen student must beat scratch by more than {bar * 100:.0f} point(s) on test: does "
                           "your student use the transfer images (the teacher's logits on them)? Enough steps?",
                      quiet=quiet)
    return result(name, True, where, quiet=quiet)
