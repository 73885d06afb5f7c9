"""Chapter 02: the NT-Xent loss, batched SimCLR augmentation, and the exercise checks."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptcourse import probes
from ptcourse.chapters import contrastive_learning as augment
from ptcourse.checks import contrastive_learning as checks
from ptcourse.losses import nt_xent


def nt_xent_loop(z1, z2, t):
    """NT-Xent written from the definition, one anchor at a time, in float64."""
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sim = [float(F.cosine_similarity(z[i], z[k], dim=0)) / t for k in range(n2)]
        denom = sum(math.exp(sim[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim[pos]) / denom)
    return total / n2


def nt_xent_loop_torch(z1, z2, t):
    """The same loop with torch ops (for gradients)."""
    z = torch.cat([z1, z2])
    n2, n = len(z), len(z) // 2
    losses = []
    for i in range(n2):
        pos = (i + n) % n2
        sims = torch.stack([F.cosine_similarity(z[i], z[k], dim=0) / t for k in range(n2)])
        others = torch.cat([sims[:i], sims[i + 1:]])
        losses.append(-(sims[pos] - torch.logsumexp(others, 0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (4, 8, 0.5), (8, 16, 0.1), (16, 32, 0.05), (5, 2, 1.0), (12, 64, 0.2)])
def test_nt_xent_matches_loop(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
    # math.exp(sim / t) stays finite for |sim| <= 1 and t >= 0.05
    assert float(nt_xent(z1, z2, t)) == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("t", [0.5, 0.05])
def test_nt_xent_gradient_matches_loop(t):
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ga = torch.autograd.grad(nt_xent(z1, z2, t), (z1, z2))
    gb = torch.autograd.grad(nt_xent_loop_torch(z1, z2, t), (z1, z2))
    for a, b in zip(ga, gb):
        assert torch.allclose(a, b, atol=1e-6)


def test_nt_xent_properties():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    base = nt_xent(z1, z2, 0.5)
    assert torch.allclose(nt_xent(z2, z1, 0.5), base, atol=1e-6)           # symmetric in the views
    assert torch.allclose(nt_xent(5 * z1, 0.1 * z2, 0.5), base, atol=1e-5)  # scale-free (cosine)
    # identical views and orthogonal images: the loss tends to 0 as t -> 0 ...
    e = torch.eye(8)
    assert float(nt_xent(e, e, 0.05)) < 1e-6
    # ... and stays finite (no overflow) at tiny temperatures
    assert torch.isfinite(nt_xent(z1, z2, 0.001))
    # random embeddings at t = infinity-ish: every one of the 2N-1 candidates is equally likely
    assert float(nt_xent(z1, z2, 1e6)) == pytest.approx(math.log(15), rel=1e-4)


# --------------------------------------------------------------------- typical wrong answers
def wrong_no_normalise(z1, z2, t):
    z = torch.cat([z1, z2]); n = len(z1)
    sim = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def wrong_no_mask(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1); n = len(z1)
    return F.cross_entropy(z @ z.T / t, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def wrong_n_anchors(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1); n = len(z1)
    sim = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(sim[:n], torch.arange(n, 2 * n))


def wrong_cross_view_only(z1, z2, t):   # negatives only from the other view (CLIP-style), one direction
    s = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / t
    return F.cross_entropy(s, torch.arange(len(z1)))


def wrong_no_temperature(z1, z2, t):
    return nt_xent(z1, z2, 1.0)


def wrong_detached(z1, z2, t):
    return nt_xent(z1.detach(), z2.detach(), t)


def test_check_nt_xent_passes_reference():
    assert checks.check_nt_xent(nt_xent, quiet=True)


@pytest.mark.parametrize("wrong", [wrong_no_normalise, wrong_no_mask, wrong_n_anchors, wrong_cross_view_only,
                                   wrong_no_temperature, wrong_detached])
def test_check_nt_xent_fails_wrong(wrong):
    assert not checks.check_nt_xent(wrong, quiet=True)


# --------------------------------------------------------------------- two views
class TwoViewsRef(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, _ = self.dataset[i]
        return self.transform(x), self.transform(x)


class SameViewTwice(TwoViewsRef):
    def __getitem__(self, i):
        v = self.transform(self.dataset[i][0])
        return v, v


class WithLabel(TwoViewsRef):
    def __getitem__(self, i):
        x, y = self.dataset[i]
        return self.transform(x), self.transform(x), y


class NoTransform(TwoViewsRef):
    def __getitem__(self, i):
        x, _ = self.dataset[i]
        return x, x


class WrongLength(TwoViewsRef):
    def __len__(self):
        return 2 * len(self.dataset)


def test_check_two_views():
    assert checks.check_two_views(TwoViewsRef, quiet=True)
    for wrong in (SameViewTwice, WithLabel, NoTransform, WrongLength):
        assert not checks.check_two_views(wrong, quiet=True), wrong.__name__


# --------------------------------------------------------------------- kNN
def knn_unweighted(xtr, ytr, xq, k, t):
    sim = F.normalize(xq, dim=1) @ F.normalize(xtr, dim=1).T
    idx = sim.topk(k, dim=1).indices
    return torch.mode(ytr[idx], dim=1).values


def knn_not_normalised(xtr, ytr, xq, k, t):
    sim = xq @ xtr.T
    s, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(xq), int(ytr.max()) + 1).scatter_add_(1, ytr[idx], torch.softmax(s / t, 1))
    return votes.argmax(1)


def knn_sim_weights(xtr, ytr, xq, k, t):  # weights sim instead of exp(sim / t)
    s, idx = (F.normalize(xq, dim=1) @ F.normalize(xtr, dim=1).T).topk(k, dim=1)
    return torch.zeros(len(xq), int(ytr.max()) + 1).scatter_add_(1, ytr[idx], s).argmax(1)


def test_check_knn_predict():
    assert checks.check_knn_predict(probes.knn_predict, quiet=True)
    for wrong in (knn_unweighted, knn_not_normalised, knn_sim_weights):
        assert not checks.check_knn_predict(wrong, quiet=True), wrong.__name__


# --------------------------------------------------------------------- augmentation
def test_v2_transform_on_a_batch_draws_one_crop():
    """The pitfall the chapter shows: a v2 transform on a batch uses ONE set of random parameters."""
    from torchvision.transforms import v2
    x = torch.rand(4, 3, 16, 16)
    t = v2.RandomResizedCrop(16, scale=(0.1, 0.5))
    torch.manual_seed(0)
    batched = t(x)
    for i in range(4):
        torch.manual_seed(0)
        assert torch.allclose(t(x[i]), batched[i])


def test_batch_augment_identity_and_flip():
    x = torch.rand(5, 3, 8, 8)
    ident = augment.BatchAugment(size=8, scale=(1, 1), ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=0)
    assert torch.allclose(ident(x), x, atol=1e-5)
    flip = augment.BatchAugment(size=8, scale=(1, 1), ratio=(1, 1), flip_p=1, jitter_p=0, gray_p=0)
    assert torch.allclose(flip(x), x.flip(-1), atol=1e-5)
    gray = augment.BatchAugment(size=8, scale=(1, 1), ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=1)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 0], gray[:, 2])
    assert torch.allclose(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-5)


def test_batch_augment_per_image_randomness():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = augment.BatchAugment()(img.expand(16, -1, -1, -1))
    assert out.dtype == torch.float32 and out.shape == (16, 3, 32, 32)
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    # the same image 16 times gives 16 different views
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e3).min() > 1e-3
    v1, v2 = augment.two_views(img.expand(4, -1, -1, -1), augment.BatchAugment())
    assert not torch.allclose(v1, v2)


def test_colour_jitter_zero_strength_is_identity():
    x = torch.rand(3, 3, 8, 8)
    aug = augment.BatchAugment(size=8, strength=0.0)
    assert torch.allclose(aug.colour(x), x, atol=1e-5)


def test_simclr_transform_and_resnet():
    view = augment.simclr_transform(32)(torch.rand(3, 32, 32))
    assert view.shape == (3, 32, 32)
    net = augment.cifar_resnet18()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 512)


# --------------------------------------------------------------------- the temperature-sweep experiment
class _Scale(torch.nn.Module):
    """A fixed 'encoder' for the check's tests: features = x @ w (no training needed)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return x @ self.w


def _sweep_setup():
    g = torch.Generator().manual_seed(5)
    means = 3 * torch.randn(4, 8, generator=g)

    def split(n):
        y = torch.arange(n) % 4
        return means[y] + torch.randn(n, 8, generator=g), y

    bank, val, test = split(80), split(120), split(200)
    noise = torch.randn(8, 8, generator=g)
    encoders = {0.1: _Scale(torch.eye(8) + 0.3 * noise), 0.5: _Scale(torch.eye(8)),
                1.0: _Scale(torch.eye(8) + 1.5 * noise)}
    random_encoder = _Scale(noise[:, :1] @ torch.ones(1, 8))   # rank 1: cosine similarity is only +-1
    knn = lambda enc, s: probes.knn_accuracy(enc(bank[0]), bank[1], enc(s[0]), s[1], k=10)  # noqa: E731
    val_scores = {t: knn(e, val) for t, e in encoders.items()}
    test_scores = {t: knn(e, test) for t, e in encoders.items()}
    return encoders, random_encoder, bank, val, test, val_scores, test_scores


def test_check_temperature_sweep_passes_honest_choice():
    enc, rnd, bank, val, test, vs, _ = _sweep_setup()
    chosen = max(vs, key=vs.get)
    res = checks.check_temperature_sweep(vs, chosen, enc, rnd, bank, val, test, k=10, margin=0.05, quiet=True)
    assert res, res.message
    assert "test kNN" in res.message and "random features" in res.message


def test_check_temperature_sweep_fails_dishonest_or_weak_sweeps():
    enc, rnd, bank, val, test, vs, ts = _sweep_setup()
    best = max(vs, key=vs.get)
    worst = min(vs, key=vs.get)
    assert vs[worst] < vs[best]
    run = lambda scores, chosen, encs=enc, **kw: checks.check_temperature_sweep(  # noqa: E731
        scores, chosen, encs, rnd, bank, val, test, k=10, quiet=True, **kw)
    assert not run(vs, worst)                                          # not the best on validation
    res = run(ts, max(ts, key=ts.get))                                 # test accuracies reported as validation
    assert not res and "TEST" in res.message
    assert not run({t: vs[t] for t in (0.1, 0.5)}, best, {t: enc[t] for t in (0.1, 0.5)})   # two temperatures
    narrow = {0.4: enc[0.1], 0.5: enc[0.5], 0.6: enc[1.0]}
    assert not run({0.4: vs[0.1], 0.5: vs[0.5], 0.6: vs[1.0]}, 0.5, narrow)                 # span < 4x
    assert not run({t: v + 0.05 for t, v in vs.items()}, best)         # numbers that no encoder gives
    assert not run(vs, best, margin=1.0)                               # does not beat random by the margin


# --------------------------------------------------------------------- the chapter's helpers
def test_small_cnn_and_autoencoder_costs():
    from torch.utils.flop_counter import FlopCounterMode
    enc, dim = augment.small_cnn()
    ae = augment.ConvAutoencoder(enc, dim)
    x = torch.rand(2, 3, 32, 32)
    assert enc(x).shape == (2, dim) and ae(x).shape == x.shape
    assert 0 <= float(ae(x).min()) and float(ae(x).max()) <= 1
    with FlopCounterMode(display=False) as f_enc:
        enc(x)
    with FlopCounterMode(display=False) as f_ae:
        ae(x)
    # one image through encoder + decoder costs about two views through the encoder (fair compute)
    assert 1.6 < f_ae.get_total_flops() / f_enc.get_total_flops() < 2.5
    head = augment.SimCLRNet(enc, dim, proj_dim=16)
    assert head(x).shape == (2, 16)


def test_label_splits_are_disjoint_balanced_and_seeded():
    import numpy as np
    y = np.repeat(np.arange(4), 30)
    val, lab = augment.label_splits(y, 5, budgets=[2, 10], seeds=[0, 1])
    assert np.bincount(y[val]).tolist() == [5] * 4
    for (b, s), idx in lab.items():
        assert np.bincount(y[idx]).tolist() == [b] * 4
        assert not set(idx) & set(val)
    assert set(lab[(10, 0)]) != set(lab[(10, 1)])
    val2, lab2 = augment.label_splits(y, 5, budgets=[2, 10], seeds=[0, 1])
    assert (val == val2).all() and (lab[(2, 1)] == lab2[(2, 1)]).all()


@pytest.mark.slow  # a few seconds of logistic regressions: kept out of the fast tier
def test_fit_logistic_probe_runs_with_one_blas_thread_and_learns():
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info
    g = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(3, 6, generator=g)
    make = lambda n: (means[torch.arange(n) % 3] + torch.randn(n, 6, generator=g), torch.arange(n) % 3)  # noqa: E731
    (x, y), (xv, yv) = make(60), make(90)
    blas = lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]  # noqa: E731
    before, seen, fit = blas(), [], LogisticRegression.fit
    with pytest.MonkeyPatch.context() as mp:            # record the BLAS threads while the fit runs
        mp.setattr(LogisticRegression, "fit", lambda self, *a, **k: (seen.append(blas()), fit(self, *a, **k))[1])
        probe = probes.fit_logistic_probe(x, y, C=1.0)
    assert seen and all(n == 1 for n in seen[0])
    assert blas() == before                          # the limit is lifted afterwards
    assert (probe.predict(xv.numpy()) == yv.numpy()).mean() > 0.6


@pytest.mark.slow  # a few seconds of logistic regressions: kept out of the fast tier
def test_linear_probe_chooses_c_as_sklearns_cross_validation_does():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, 6, generator=g)           # overlapping classes: C matters
    make = lambda n: (means[torch.arange(n) % 3] + torch.randn(n, 6, generator=g), torch.arange(n) % 3)  # noqa: E731
    (x, y), (xt, yt) = make(45), make(300)
    x64, y64 = x.numpy().astype(np.float64), y.numpy()
    ref = lambda c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))  # noqa: E731
    c_ref = max((0.01, 0.1, 1.0, 10.0), key=lambda c: cross_val_score(ref(c), x64, y64, cv=3).mean())
    want = (ref(c_ref).fit(x64, y64).predict(xt.numpy()) == yt.numpy()).mean()
    assert probes.linear_probe(x, y, xt, yt) == pytest.approx(want, abs=1 / 300)
    assert probes.linear_probe(x, y, xt, yt, C=c_ref) == probes.linear_probe(x, y, xt, yt)


def test_train_classifier_runs_exact_steps_and_does_not_touch_the_encoder():
    enc, dim = augment.small_cnn((4, 4, 8, 8))
    before = [p.clone() for p in enc.parameters()]
    x, y = torch.rand(20, 3, 32, 32), torch.arange(20) % 10
    calls = []
    net = augment.train_classifier(enc, dim, x, y, lr=1e-2, steps=3, batch=8,
                                   augment=lambda b: calls.append(len(b)) or b, device="cpu")
    assert calls == [8, 8, 8]                        # exactly `steps` batches, drawn with replacement
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))   # a copy was trained
    acc = augment.classifier_accuracy(net, x, y, device="cpu")
    assert 0 <= acc <= 1


def test_interleaved_timings_alternate():
    order = []
    out = augment.interleaved_timings({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3)
    assert order == ["a", "b"] * 3 and len(out["a"]) == len(out["b"]) == 3


# --------------------------------------------------------------------- the chapter's searches
def test_lr_then_steps_search_reuses_the_middle_run_and_returns_the_chosen_model():
    # validation score peaks at lr 1e-3 and 400 steps; each (lr, steps) is trained at most once
    calls = []

    def run(lr, n):
        calls.append((lr, n))
        return -abs(lr - 1e-3) * 100 - abs(n - 400) / 1000, ("model", lr, n)

    s_lr, s_n, model = augment.lr_then_steps_search("x", [5e-4, 1e-3, 2e-3], [100, 200, 400], run,
                                                    search_kw={"extend": "geometric", "max_extend": 2})
    assert s_lr.chosen == 1e-3 and s_lr.edge is None
    assert s_lr.name == "lr x" and s_n.name == "steps x"
    # 400 sat at the top, so 800 was tried; 400 stays best and lies inside the extended grid
    assert s_n.grid == [100, 200, 400, 800] and s_n.chosen == 400 and s_n.edge is None
    assert model == ("model", 1e-3, 400)
    assert len(calls) == len(set(calls))                     # the middle value (1e-3, 200) was not retrained
    assert calls.count((1e-3, 200)) == 1


@pytest.mark.slow  # a few seconds of logistic regressions: kept out of the fast tier
def test_probe_search_chooses_c_on_the_mean_over_draws_and_returns_their_probes():
    g = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(3, 6, generator=g)
    make = lambda n: (means[torch.arange(n) % 3] + torch.randn(n, 6, generator=g), torch.arange(n) % 3)  # noqa: E731
    draws = {0: make(30), 1: make(30), 2: make(30)}
    fv, yv = make(90)
    s, fitted = augment.probe_search("C", [1e-3, 1e-2, 1.0], draws, (fv, yv))
    assert s.trials == 3 * 3 and set(fitted) == {0, 1, 2}
    # each score is the mean validation accuracy over the three draws, recomputed here probe by probe
    acc = lambda p: (p.predict(fv.numpy().astype("float64")) == yv.numpy()).mean()  # noqa: E731
    mean_val = {c: np.mean([acc(probes.fit_logistic_probe(x, y, c, seed=k)) for k, (x, y) in draws.items()])
                for c in s.grid}
    assert s.val == pytest.approx(mean_val)
    assert mean_val[s.chosen] == max(mean_val.values())
    assert [acc(fitted[k]) for k in draws] == [acc(probes.fit_logistic_probe(x, y, s.chosen, seed=k))
                                               for k, (x, y) in draws.items()]
