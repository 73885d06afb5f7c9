"""Checks for the exercises of chapter 01 (autoencoders as pretraining).

Example:
    >>> from ptcourse.checks import check_add_noise
    >>> check_add_noise(add_noise)
    ✅ check_add_noise: matches the reference on 4 random inputs.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ._common import fingerprint

__all__ = ["check_add_noise", "check_autoencoder", "check_classifier", "check_budget_loop",
           "CodeLab", "check_experiment"]


def _compare(*args, **kwargs):
    from ._common import compare
    return compare(*args, **kwargs)


# ----------------------------------------------------------------------------- exercise 1
def _ref_add_noise(x, std):
    return (x + std * torch.randn_like(x)).clamp(0, 1)


def _seeded(fn):
    def run(x, std, seed):
        torch.manual_seed(seed)
        return fn(x, std)
    return run


def check_add_noise(add_noise, quiet=False):
    """``add_noise(x, std)``: Gaussian noise of standard deviation ``std``, result clipped to [0, 1]."""
    g = torch.Generator().manual_seed(1)
    cases = [(torch.rand(4, 1, 28, 28, generator=g), 0.5, 0), (torch.rand(2, 1, 8, 8, generator=g), 0.1, 1),
             (torch.rand(3, 1, 28, 28, generator=g), 1.0, 2), (torch.rand(5, 1, 4, 4, generator=g), 0.0, 3)]
    return _compare("check_add_noise", _seeded(add_noise), _seeded(_ref_add_noise), cases,
                    hint="draw the noise with torch.randn_like(x) (one call), scale it by std, add it, "
                         "then clamp the result to [0, 1].", quiet=quiet)


# ----------------------------------------------------------------------------- exercise 2
def _summary_autoencoder(make_autoencoder, code_dim):
    torch.manual_seed(0)
    encoder, decoder = make_autoencoder(code_dim)
    x = torch.rand(6, 1, 28, 28)
    z = encoder(x)
    x_hat = decoder(z)
    loss = ((x_hat - x) ** 2).mean() if x_hat.shape == x.shape else x_hat.float().mean()
    grads = []
    if loss.requires_grad:
        loss.backward()
        grads = [p.grad for p in encoder.parameters()]
    return {"code shape": list(z.shape), "reconstruction shape": list(x_hat.shape),
            "reconstruction within [0, 1]": bool(((x_hat >= 0) & (x_hat <= 1)).all()),
            "gradient reaches the encoder": bool(grads) and all(g is not None for g in grads)}


def _ref_make_autoencoder(code_dim):
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, code_dim))
    decoder = nn.Sequential(nn.Linear(code_dim, 8 * 14 * 14), nn.ReLU(), nn.Unflatten(1, (8, 14, 14)),
                            nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid())
    return encoder, decoder


def check_autoencoder(make_autoencoder, quiet=False):
    """``make_autoencoder(code_dim) -> (encoder, decoder)``: [N,1,28,28] -> [N,code_dim] -> [N,1,28,28] in [0, 1]."""
    return _compare("check_autoencoder", lambda d: _summary_autoencoder(make_autoencoder, d),
                    lambda d: _summary_autoencoder(_ref_make_autoencoder, d), [(2,), (16,), (64,)],
                    hint="the encoder ends in nn.Linear(..., code_dim); the decoder must give back "
                         "[N, 1, 28, 28] (nn.Unflatten, ConvTranspose2d with stride 2) and end in nn.Sigmoid().",
                    quiet=quiet)


# ----------------------------------------------------------------------------- exercise 3
def _ref_make_classifier(encoder, code_dim, num_classes=10, freeze=True):
    encoder = copy.deepcopy(encoder)
    for p in encoder.parameters():
        p.requires_grad_(not freeze)
    return nn.Sequential(encoder, nn.Linear(code_dim, num_classes))


def _summary_classifier(make_classifier, code_dim, num_classes, freeze):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, code_dim))
    before = [p.detach().clone() for p in encoder.parameters()]
    model = make_classifier(encoder, code_dim, num_classes, freeze)
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    same_start = bool(torch.allclose(model[0](x), encoder(x))) if isinstance(model, nn.Sequential) else False
    shared = {id(p) for p in encoder.parameters()} & {id(p) for p in model.parameters()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    untouched = all(p.requires_grad for p in encoder.parameters()) and all(
        torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    return {"output shape": list(out.shape), "encoder copied (no shared parameters)": not shared,
            "starts from the pretrained weights": same_start, "trainable parameters": trainable,
            "original encoder left as it was": untouched}


def check_classifier(make_classifier, quiet=False):
    """``make_classifier(encoder, code_dim, num_classes, freeze)``: a copy of the encoder plus a new linear head."""
    cases = [(8, 10, True), (8, 10, False), (3, 5, True)]
    return _compare("check_classifier", lambda *a: _summary_classifier(make_classifier, *a),
                    lambda *a: _summary_classifier(_ref_make_classifier, *a), cases,
                    hint="copy.deepcopy(encoder) first (every run must start from the same pretrained "
                         "weights), set requires_grad of its parameters to (not freeze), and return "
                         "nn.Sequential(encoder_copy, nn.Linear(code_dim, num_classes)).", quiet=quiet)


# ----------------------------------------------------------------------------- exercise 4
def _fake_train_and_eval(calls):
    def train_and_eval(per_class, seed):
        calls.append((per_class, seed))
        rng = np.random.default_rng(1000 * per_class + seed)
        return float(1 - 0.5 / np.sqrt(per_class) + 0.05 * rng.standard_normal())
    return train_and_eval


def _ref_budget_loop(train_and_eval, budgets, seeds):
    means, stds = [], []
    for k in budgets:
        accs = [train_and_eval(k, seed) for seed in seeds]
        means.append(float(np.mean(accs)))
        stds.append(float(np.std(accs)))
    return means, stds


def _summary_budget_loop(fn, budgets, seeds):
    calls = []
    means, stds = fn(_fake_train_and_eval(calls), budgets, seeds)
    return ([float(m) for m in means], [float(s) for s in stds], sorted(calls))


def check_budget_loop(label_budget_loop, quiet=False):
    """``label_budget_loop(train_and_eval, budgets, seeds) -> (means, stds)`` over seeds, one entry per budget."""
    cases = [([1, 10, 100], [0, 1, 2]), ([3, 30], [5, 6]), ([2], [0, 1, 2, 3])]
    return _compare("check_budget_loop", lambda *a: _summary_budget_loop(label_budget_loop, *a),
                    lambda *a: _summary_budget_loop(_ref_budget_loop, *a), cases,
                    hint="for each budget, call train_and_eval(per_class, seed) once per seed and keep "
                         "np.mean and np.std (the population std, ddof=0) of those accuracies.",
                    quiet=quiet)


# ----------------------------------------------------------------------------- the open-ended experiment
class CodeLab:
    """The data of the open-ended experiment: labelled images, a validation split, and a sealed test split.

    A code is judged by a k-nearest-neighbour vote (cosine similarity, ``k`` neighbours) of the
    ``per_class`` labelled images per digit. The labelled images and the validation split both come
    from MNIST's *training* split and share no image. The test split is not handed out: only
    :func:`check_experiment` opens it, for the one encoder you chose on validation.

    Example:
        >>> lab = CodeLab(per_class=30, n_val=1_000, n_test=2_000)
        >>> lab.val_accuracy(encoder)          # kNN accuracy of encoder(x) codes on the validation split
        >>> lab.pixel_val_accuracy()           # the same vote on raw pixels: the baseline to beat
    """

    def __init__(self, per_class: int, n_val: int, n_test: int, pool: int = 6_000, k: int = 20, seed: int = 0):
        from ..chapters.autoencoders import carve_validation, per_class_subset
        from ..data import load
        train_pool = load("mnist", "train", limit=pool, seed=seed + 1)
        rest, val = carve_validation(train_pool, n_val, seed=seed)
        labelled = per_class_subset(rest, per_class, seed=seed)
        self.per_class, self.k, self.n_test, self._seed = per_class, k, n_test, seed
        self.x_labelled, self.y_labelled = labelled.tensors()
        self.x_val, self.y_val = val.tensors()
        self._tested = {}          # fingerprints of the encoders scored on the test split, in order
        from ..runtime import profile
        self.profile = profile().name

    def _knn(self, encoder, x, y) -> float:
        from ..probes import extract_features, knn_accuracy
        if encoder is None:
            return knn_accuracy(self.x_labelled.flatten(1), self.y_labelled, x.flatten(1), y, k=self.k)
        device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
        return knn_accuracy(extract_features(encoder, self.x_labelled, device=device), self.y_labelled,
                            extract_features(encoder, x, device=device), y, k=self.k)

    def val_accuracy(self, encoder) -> float:
        """kNN accuracy of ``encoder``'s codes on the validation split (what you select on)."""
        return self._knn(encoder, self.x_val, self.y_val)

    def pixel_val_accuracy(self) -> float:
        """kNN accuracy of raw pixels on the validation split (the baseline)."""
        return self._knn(None, self.x_val, self.y_val)

    def _test_accuracy(self, encoder) -> tuple[float, float]:
        from ..data import load
        x_test, y_test = load("mnist", "test", limit=self.n_test, seed=self._seed).tensors()
        code = self._knn(encoder, x_test, y_test)
        self._tested[fingerprint(encoder)] = code
        return code, self._knn(None, x_test, y_test)


def check_experiment(lab: CodeLab, trials: list, chosen, quiet: bool = False, bar: float = 0.01):
    """Judge the outcome of the open-ended experiment (not the code that produced it).

    ``trials`` is a list of dicts, one per pretrained encoder you tried, each with at least the key
    ``"encoder"``, the settings you varied (e.g. ``"noise"``, ``"code_dim"``) and the ``"val_acc"``
    you selected on. ``chosen`` is the index of the trial you picked. The check passes when

    * there are at least two trials with different settings (an experiment, not one run);
    * every recorded ``val_acc`` is the trial's validation accuracy (``lab.val_accuracy``);
    * ``chosen`` has the highest validation accuracy of all trials (selection on validation);
    * the test split has been used for this one choice only (no comparison of choices on test);
    * on the test split, the chosen code's kNN accuracy beats kNN on raw pixels by more than ``bar``.
    """
    from ._common import result
    name = "check_experiment"

    def done(passed, msg):
        return result(name, passed, msg, quiet=quiet)

    if not isinstance(trials, (list, tuple)) or len(trials) < 2:
        return done(False, "an experiment compares at least two settings: put one dict per pretrained encoder "
                           "in `trials`.")
    settings = [tuple(sorted((k, repr(v)) for k, v in t.items() if k not in ("encoder", "val_acc")))
                for t in trials]
    if len(set(settings)) < 2:
        return done(False, "all trials have the same settings: vary the noise level, the code size or "
                           "something else, and record it in each trial's dict.")
    val = []
    for i, t in enumerate(trials):
        if "encoder" not in t or "val_acc" not in t:
            return done(False, f"trial {i} needs the keys 'encoder' and 'val_acc'.")
        acc = lab.val_accuracy(t["encoder"])
        if abs(float(t["val_acc"]) - acc) > 1e-6:
            return done(False, f"trial {i} records val_acc {float(t['val_acc']):.4f}, but its validation "
                               f"accuracy is {acc:.4f}. Score every trial with lab.val_accuracy: selecting "
                               "on any other split (the test split above all) is not allowed.")
        val.append(acc)
    if not isinstance(chosen, int) or not 0 <= chosen < len(trials):
        return done(False, f"`chosen` must be the index (0..{len(trials) - 1}) of the trial you picked.")
    best = int(np.argmax(val))
    if val[chosen] < val[best] - 1e-9:
        return done(False, f"you chose trial {chosen} (validation accuracy {val[chosen]:.4f}), but trial {best} "
                           f"has {val[best]:.4f}. Pick the best trial on validation; the test split only "
                           "reports the one you picked.")
    code_acc, pixel_acc = lab._test_accuracy(trials[chosen]["encoder"])
    if next(iter(lab._tested)) != fingerprint(trials[chosen]["encoder"]):
        return done(False, f"the test split has already scored another encoder (your first choice). Comparing "
                           "choices on the test split turns it into a validation split, and its accuracy no "
                           "longer estimates new data: report the first choice you tested.")
    gain = code_acc - pixel_acc
    where = ", ".join(f"{k}={v}" for k, v in trials[chosen].items() if k not in ("encoder", "val_acc"))
    summary = (f"your choice ({where}, validation {val[chosen]:.4f} vs pixels {lab.pixel_val_accuracy():.4f}) "
               f"scores {code_acc:.4f} on the test split; kNN on pixels {pixel_acc:.4f}: "
               f"{100 * gain:+.1f} points")
    if gain > bar:
        return done(True, summary + (f" (bar: {100 * bar:+.1f}). Selected on validation, tested once." if bar
                                     else ". Selected on validation, tested once."))
    smoke = (" (In the smoke profile the autoencoders see too few images to reach the bar; run the cpu "
             "profile for a real result.)" if getattr(lab, "profile", None) == "smoke" else "")
    return done(False, summary + f", {100 * (bar - gain):.1f} points short of the bar ({100 * bar:+.1f}). Try "
                                 "other settings (the noise level, the code size, more pretraining) and select "
                                 "again on validation; a new CodeLab tests the new choice. (Every new look at "
                                 "the test split makes it a little less of a test: in a real project this "
                                 "result is the one you report.)" + smoke)
