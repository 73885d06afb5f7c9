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

__all__ = ["check_add_noise", "check_autoencoder", "check_classifier", "check_budget_loop"]


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
