"""The chapter-01 checks pass the reference answers and fail typical wrong ones."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from ptcourse.checks import autoencoders as ae
from ptcourse.checks.autoencoders import check_add_noise, check_autoencoder, check_budget_loop, check_classifier


# ----------------------------------------------------------------------------- add_noise
def test_add_noise_reference_passes():
    assert check_add_noise(ae._ref_add_noise, quiet=True)


def test_add_noise_reference_is_clipped_gaussian():
    torch.manual_seed(0)
    x = torch.full((20000,), 0.5)
    y = ae._ref_add_noise(x, 0.1)
    assert y.min() >= 0 and y.max() <= 1
    assert abs(float(y.std()) - 0.1) < 0.005 and abs(float(y.mean()) - 0.5) < 0.005
    assert torch.equal(ae._ref_add_noise(x, 0.0), x)


def test_add_noise_wrong_answers_fail():
    wrong = [lambda x, std: x + std * torch.randn_like(x),                       # not clipped
             lambda x, std: (x + std * torch.rand_like(x)).clamp(0, 1),          # uniform noise
             lambda x, std: (x * (1 + std * torch.randn_like(x))).clamp(0, 1),   # multiplicative
             lambda x, std: (x + torch.randn_like(x)).clamp(0, 1)]               # std ignored
    for fn in wrong:
        assert not check_add_noise(fn, quiet=True)


# ----------------------------------------------------------------------------- autoencoder
def test_autoencoder_reference_passes():
    assert check_autoencoder(ae._ref_make_autoencoder, quiet=True)


def test_autoencoder_wrong_answers_fail():
    def flat_decoder(d):  # decoder output [N, 784], not an image
        enc, dec = ae._ref_make_autoencoder(d)
        return enc, nn.Sequential(*dec, nn.Flatten())

    def no_sigmoid(d):
        enc, dec = ae._ref_make_autoencoder(d)
        return enc, nn.Sequential(*list(dec)[:-1])

    def fixed_code(d):  # ignores code_dim
        return ae._ref_make_autoencoder(64)

    def detached(d):
        enc, dec = ae._ref_make_autoencoder(d)
        class Detach(nn.Module):
            def forward(self, z):
                return z.detach()
        return nn.Sequential(enc, Detach()), dec

    for fn in (flat_decoder, no_sigmoid, fixed_code, detached):
        assert not check_autoencoder(fn, quiet=True), fn.__name__


# ----------------------------------------------------------------------------- classifier
def test_classifier_reference_passes():
    assert check_classifier(ae._ref_make_classifier, quiet=True)


def test_classifier_wrong_answers_fail():
    def no_copy(encoder, code_dim, num_classes=10, freeze=True):
        for p in encoder.parameters():
            p.requires_grad_(not freeze)
        return nn.Sequential(encoder, nn.Linear(code_dim, num_classes))

    def never_frozen(encoder, code_dim, num_classes=10, freeze=True):
        return nn.Sequential(copy.deepcopy(encoder), nn.Linear(code_dim, num_classes))

    def fresh_encoder(encoder, code_dim, num_classes=10, freeze=True):
        enc = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, code_dim))
        for p in enc.parameters():
            p.requires_grad_(not freeze)
        return nn.Sequential(enc, nn.Linear(code_dim, num_classes))

    def wrong_head(encoder, code_dim, num_classes=10, freeze=True):
        return ae._ref_make_classifier(encoder, code_dim, 10, freeze)

    for fn in (no_copy, never_frozen, fresh_encoder, wrong_head):
        assert not check_classifier(fn, quiet=True), fn.__name__


def test_classifier_trainable_count():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 8))
    frozen = ae._ref_make_classifier(enc, 8, 10, True)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 8 * 10 + 10
    assert all(p.requires_grad for p in enc.parameters())


# ----------------------------------------------------------------------------- budget loop
def test_budget_loop_reference_passes():
    assert check_budget_loop(ae._ref_budget_loop, quiet=True)


def test_budget_loop_reference_matches_a_formula():
    means, stds = ae._ref_budget_loop(lambda k, s: k + s, [1, 10], [0, 1, 2])
    assert means == [2.0, 11.0]
    assert np.allclose(stds, [np.sqrt(2 / 3)] * 2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_budget_loop_wrong_answers_fail():
    def sample_std(fn, budgets, seeds):
        accs = [[fn(k, s) for s in seeds] for k in budgets]
        return [float(np.mean(a)) for a in accs], [float(np.std(a, ddof=1)) for a in accs]

    def swapped_args(fn, budgets, seeds):
        accs = [[fn(s, k) for s in seeds] for k in budgets]
        return [float(np.mean(a)) for a in accs], [float(np.std(a)) for a in accs]

    def one_seed(fn, budgets, seeds):
        accs = [fn(k, seeds[0]) for k in budgets]
        return accs, [0.0] * len(budgets)

    def mean_over_budgets(fn, budgets, seeds):
        accs = np.array([[fn(k, s) for s in seeds] for k in budgets])
        return accs.mean(0).tolist()[:len(budgets)], accs.std(0).tolist()[:len(budgets)]

    for fn in (sample_std, swapped_args, one_seed, mean_over_budgets):
        assert not check_budget_loop(fn, quiet=True), fn.__name__
