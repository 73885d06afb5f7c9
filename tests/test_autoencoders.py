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


# ----------------------------------------------------------------------------- the open-ended experiment
class _FakeLab:
    """A CodeLab stand-in with fixed scores: val/test accuracy per encoder, pixels at 0.80 / 0.80."""

    def __init__(self, val, test):
        self.val, self.test, self._tested, self.profile = val, test, {}, "cpu"

    def val_accuracy(self, encoder):
        return self.val[encoder.tag]

    def pixel_val_accuracy(self):
        return 0.80

    def _test_accuracy(self, encoder):
        self._tested.setdefault(ae.fingerprint(encoder), True)
        return self.test[encoder.tag], 0.80


def _encoder(tag):
    torch.manual_seed(tag)
    enc = nn.Linear(4, 2)
    enc.tag = tag
    return enc


def _trials(lab, recorded=None):
    encs = [_encoder(i) for i in range(3)]
    recorded = recorded or {}
    return [{"noise": 0.1 * i, "code_dim": 64, "encoder": e, "val_acc": recorded.get(i, lab.val[i])}
            for i, e in enumerate(encs)]


def test_experiment_honest_choice_passes_and_reports_the_margin():
    lab = _FakeLab(val={0: 0.81, 1: 0.86, 2: 0.83}, test={0: 0.80, 1: 0.83, 2: 0.85})
    result = check_experiment_quiet(lab, _trials(lab), 1)
    assert result and "+3.0 points" in result.message


def check_experiment_quiet(lab, trials, chosen, bar=0.01):
    return ae.check_experiment(lab, trials, chosen, quiet=True, bar=bar)


def test_experiment_choice_made_on_test_fails():
    lab = _FakeLab(val={0: 0.81, 1: 0.86, 2: 0.83}, test={0: 0.80, 1: 0.83, 2: 0.85})
    result = check_experiment_quiet(lab, _trials(lab), 2)          # best on test, not on validation
    assert not result and "best trial on validation" in result.message
    assert not lab._tested                                           # the test split was not even opened


def test_experiment_scores_that_are_not_validation_scores_fail():
    lab = _FakeLab(val={0: 0.81, 1: 0.86, 2: 0.83}, test={0: 0.80, 1: 0.83, 2: 0.85})
    trials = _trials(lab, recorded={2: 0.85})                         # trial 2 recorded with its test score
    assert not check_experiment_quiet(lab, trials, 2)


def test_experiment_needs_two_different_settings():
    lab = _FakeLab(val={0: 0.81, 1: 0.86, 2: 0.83}, test={0: 0.80, 1: 0.83, 2: 0.85})
    trials = _trials(lab)
    assert not check_experiment_quiet(lab, trials[1:2], 0)
    same = [dict(t, noise=0.5) for t in trials]
    assert not check_experiment_quiet(lab, same, 1)


def test_experiment_below_the_bar_fails_and_says_by_how_much():
    lab = _FakeLab(val={0: 0.81, 1: 0.86, 2: 0.83}, test={0: 0.80, 1: 0.805, 2: 0.85})
    result = check_experiment_quiet(lab, _trials(lab), 1)
    assert not result and "0.5 points short" in result.message
    assert check_experiment_quiet(lab, _trials(lab), 1, bar=0.0)     # the bar is what decides


def test_experiment_second_choice_on_the_same_test_split_fails():
    lab = _FakeLab(val={0: 0.81, 1: 0.86, 2: 0.83}, test={0: 0.80, 1: 0.83, 2: 0.85})
    trials = _trials(lab)
    assert check_experiment_quiet(lab, trials, 1)
    assert check_experiment_quiet(lab, trials, 1)                   # asking again about the same choice is fine
    lab.val[2] = 0.90                                               # "re-selecting" after having seen the test
    trials[2]["val_acc"] = 0.90
    result = check_experiment_quiet(lab, trials, 2)
    assert not result and "already scored another encoder" in result.message


@pytest.mark.slow
def test_code_lab_splits_are_disjoint_and_pixels_are_the_identity_code():
    lab = ae.CodeLab(per_class=5, n_val=100, n_test=200, pool=1_000)
    assert len(lab.x_labelled) == 50 and lab.y_labelled.bincount().tolist() == [5] * 10
    assert len(lab.x_val) == 100
    labelled = {tuple(x.flatten().tolist()) for x in lab.x_labelled}
    assert not labelled & {tuple(x.flatten().tolist()) for x in lab.x_val}
    assert lab.val_accuracy(nn.Flatten()) == pytest.approx(lab.pixel_val_accuracy())


# ----------------------------------------------------------------------------- data splits
def test_carve_validation_is_disjoint_stratified_and_seeded():
    from ptcourse.chapters.autoencoders import carve_validation, per_class_subset
    from ptcourse.data import ImageDataset
    images = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1)
    ds = ImageDataset(images, torch.arange(200) % 4, ["a", "b", "c", "d"])
    rest, val = carve_validation(ds, 40, seed=3)
    assert len(rest) == 160 and len(val) == 40
    assert not set(rest.images.flatten().tolist()) & set(val.images.flatten().tolist())
    assert val.labels.bincount().tolist() == [10] * 4
    assert torch.equal(carve_validation(ds, 40, seed=3)[1].images, val.images)
    few = per_class_subset(rest, 3, seed=0)
    assert few.labels.bincount().tolist() == [3] * 4
    assert set(few.images.flatten().tolist()) <= set(rest.images.flatten().tolist())
    with pytest.raises(ValueError):
        carve_validation(ds, 200)


# ----------------------------------------------------------------------------- the seed count's power argument
def test_interval_halfwidth_is_the_half_width_of_the_verdicts_interval():
    """The power argument and the verdicts use the same interval: for per-seed differences with
    sample sd s, ``interval_halfwidth(s, n)`` is half the width of the paired ``Difference``."""
    from ptcourse.chapters.autoencoders import interval_halfwidth
    from ptcourse.results import Difference

    rng = np.random.default_rng(0)
    for n in (2, 5, 20):
        diffs = rng.normal(0.01, 0.03, size=n)
        d = Difference(diffs, np.zeros(n), paired=True)
        assert np.isclose(interval_halfwidth(diffs.std(ddof=1), n), (d.high - d.low) / 2)
    widths = [interval_halfwidth(3.0, n) for n in (3, 5, 10, 20, 40)]
    assert all(a > b for a, b in zip(widths, widths[1:]))      # more seeds, a narrower interval
    assert interval_halfwidth(3.0, 1) == float("inf")          # one seed: no interval at all
