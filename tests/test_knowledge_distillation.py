"""Chapter 05: the distillation loss, its exercise checks, and ptcourse.chapters.knowledge_distillation."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptcourse.chapters import knowledge_distillation as compress
from ptcourse.checks.knowledge_distillation import check_distillation_loss, check_latency, check_softmax_t
from ptcourse.losses import distillation_loss


# ----------------------------------------------------------------------------- the loss
def kd_by_formula(s, t, y, T, alpha):
    """alpha * T^2 * mean_i sum_c p_t log(p_t / p_s) + (1 - alpha) * mean_i -log softmax(s_i)[y_i], with loops."""
    n, c = s.shape
    kl, ce = 0.0, 0.0
    for i in range(n):
        zs = [math.exp(float(v) / T) for v in s[i]]
        zt = [math.exp(float(v) / T) for v in t[i]]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        kl += sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(c))
        z1 = [math.exp(float(v)) for v in s[i]]
        ce += -math.log(z1[int(y[i])] / sum(z1))
    return alpha * T * T * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.9), (4.0, 0.9), (10.0, 0.3), (4.0, 0.0), (20.0, 1.0)])
def test_distillation_loss_matches_the_formula(T, alpha):
    g = torch.Generator().manual_seed(int(T * 10 + alpha * 100))
    s, t = 2 * torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    got = float(distillation_loss(s.double(), t.double(), y, T, alpha))
    assert got == pytest.approx(kd_by_formula(s, t, y, T, alpha), rel=1e-9, abs=1e-12)


def test_distillation_loss_is_zero_kl_when_student_equals_teacher():
    s = torch.randn(4, 10)
    y = s.argmax(1)
    assert float(distillation_loss(s, s.clone(), y, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_no_gradient_flows_into_the_teacher():
    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10, requires_grad=True)
    distillation_loss(s, t, torch.randint(0, 10, (8,)), 4.0, 0.9).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_t_squared_keeps_the_soft_gradient_scale():
    """Without T^2 the soft term's gradient shrinks like 1/T^2; with it, it stays put (large T)."""
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g)
    y = torch.zeros(64, dtype=torch.long)
    norms = {}
    for T in (5.0, 20.0):
        s = s0.clone().requires_grad_(True)
        distillation_loss(s, t, y, T, 1.0).backward()
        norms[T] = float(s.grad.norm())
    assert norms[20.0] / norms[5.0] == pytest.approx(1.0, rel=0.1)


# ----------------------------------------------------------------------------- the checks
def reference_softmax_t(logits, temperature):
    return torch.softmax(logits / temperature, dim=-1)


def test_check_softmax_t():
    assert check_softmax_t(reference_softmax_t, quiet=True)
    assert not check_softmax_t(lambda z, T: torch.softmax(z * T, dim=-1), quiet=True)
    assert not check_softmax_t(lambda z, T: torch.softmax(z / T, dim=0), quiet=True)
    assert not check_softmax_t(lambda z, T: torch.softmax(z, dim=-1), quiet=True)


def kd_missing_t2(s, t, y, T=4.0, alpha=0.9):
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t.detach() / T, -1), reduction="batchmean",
                  log_target=True)
    return alpha * kl + (1 - alpha) * F.cross_entropy(s, y)


def kd_mean_reduction(s, t, y, T=4.0, alpha=0.9):
    kl = nn.KLDivLoss(reduction="mean")(F.log_softmax(s / T, -1), F.softmax(t.detach() / T, -1))
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)


def kd_raw_logits(s, t, y, T=4.0, alpha=0.9):
    return alpha * nn.KLDivLoss()(s, t.detach()) + (1 - alpha) * F.cross_entropy(s, y)


def kd_not_detached(s, t, y, T=4.0, alpha=0.9):
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)


def test_check_distillation_loss_passes_the_reference():
    assert check_distillation_loss(distillation_loss, quiet=True)


@pytest.mark.parametrize("wrong,words", [(kd_missing_t2, "T²"), (kd_mean_reduction, "batchmean"),
                                         (kd_raw_logits, "NaN"), (kd_not_detached, "teacher")])
def test_check_distillation_loss_catches(wrong, words):
    result = check_distillation_loss(wrong, quiet=True)
    assert not result
    assert words in result.message


def test_check_distillation_loss_lets_a_stub_through():
    def stub(*args):
        raise NotImplementedError("Exercise 2")
    with pytest.raises(NotImplementedError):
        check_distillation_loss(stub, quiet=True)


def latency_reference(model, x):
    return compress.latency_ms(model, x, min_run_time=0.1)


def test_check_latency():
    assert check_latency(latency_reference, quiet=True)

    def in_seconds(model, x):
        return latency_reference(model, x) / 1000

    def per_batch(model, x):
        return latency_reference(model, x) * len(x)

    def training_mode(model, x):
        t0 = __import__("time").perf_counter()
        with torch.no_grad():
            model(x)
        return (__import__("time").perf_counter() - t0) * 1000 / len(x)

    for wrong in (in_seconds, per_batch, training_mode):
        assert not check_latency(wrong, quiet=True)


# ----------------------------------------------------------------------------- compress
def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_count_parameters_and_size():
    lin = nn.Linear(100, 50)
    assert compress.count_parameters(lin) == 5050
    assert 5050 * 4 / 1000 < compress.size_kb(lin) < 5050 * 4 / 1000 + 5


def test_latency_ms_is_per_image_and_restores_mode():
    model = nn.Linear(16, 4).train()
    ms = compress.latency_ms(model, torch.rand(4, 16), min_run_time=0.05)
    assert 0 < ms < 1000 and math.isfinite(ms)
    assert model.training


def test_quantize_dynamic_is_smaller_and_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    q = compress.quantize_dynamic(model)
    x = torch.rand(16, 1, 8, 8)
    assert compress.size_kb(q) < 0.5 * compress.size_kb(model)
    assert (q(x) - model(x)).abs().max() < 0.05
    assert isinstance(model[1], nn.Linear) and type(model[1]) is nn.Linear  # the original is untouched


def test_quantize_static_is_smaller_and_close():
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.rand(64, 3, 16, 16)
    q = compress.quantize_static(model, x)
    assert compress.size_kb(q) < compress.size_kb(model)
    out, ref = q(x), model(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.02
