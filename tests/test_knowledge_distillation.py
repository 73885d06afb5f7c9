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


def test_fold_batchnorm_keeps_the_outputs():
    torch.manual_seed(0)
    model = small_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):        # non-trivial statistics, as after training
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = compress.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded)
    x = torch.rand(8, 3, 16, 16)
    assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_quantize_weight_is_int8_per_channel_within_half_a_step():
    w = torch.randn(6, 4, 3, 3) * torch.logspace(-3, 0, 6).view(-1, 1, 1, 1)   # channels of very different size
    q, scale = compress.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().max()) == 127
    assert ((q * scale.view(-1, 1, 1, 1) - w).abs() <= scale.view(-1, 1, 1, 1) / 2 + 1e-12).all()


def test_int8_layer_sums_integers_exactly():
    """The layer's output is s_x * s_w * (integer sum) + b, with the integer sum computed exactly."""
    torch.manual_seed(0)
    lin = nn.Linear(300, 5)
    layer = compress.Int8Linear(lin, input_scale=0.01)
    x = torch.rand(4, 300)
    xq = torch.round(x / 0.01).clamp(-127, 127).long()
    exact = xq @ layer.weight_int8.long().T                     # int64 arithmetic
    expected = exact.double() * 0.01 * layer.weight_scale.double() + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_quantize_int8_is_smaller_close_and_uses_no_ao_quantization():
    import warnings
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.rand(64, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no deprecation warning, nothing filtered
        q = compress.quantize_int8(model, x)
    assert any(isinstance(m, compress.Int8Conv2d) for m in q) and isinstance(q[-1], compress.Int8Linear)
    assert compress.size_kb(q) < compress.size_kb(model)
    out, ref = q(x), model(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.01
    assert type(model[0]) is nn.Conv2d                          # the original is untouched


def test_the_library_does_not_use_the_deprecated_quantization_api():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(compress))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
               [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    attributes = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert not any(m.startswith(("torch.ao", "torch.quantization")) for m in imported)
    assert "ao" not in attributes and "quantized" not in attributes        # torch.ao..., torch.backends.quantized
    assert not {"simplefilter", "filterwarnings", "catch_warnings"} & set(attributes)   # no warning filter


# ----------------------------------------------------------------------------- augmentation
def test_random_translate_draws_one_offset_per_image():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0                                         # one bright pixel in the centre of each image
    out = compress.random_translate(x, 2)
    assert out.shape == x.shape
    where = [tuple(torch.nonzero(o[0])[0].tolist()) for o in out]
    assert all(abs(r - 4) <= 2 and abs(c - 4) <= 2 for r, c in where)
    assert len(set(where)) > 10                                 # one draw per batch would give one position


def test_random_translate_flip_and_reflect():
    g = torch.Generator().manual_seed(1)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4).repeat(16, 1, 1, 1)
    out = compress.random_translate(x, 0, flip=True, generator=g)
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x)]
    assert any(flipped) and not all(flipped)
    assert compress.random_translate(x, 1, mode="reflect").shape == x.shape


# ----------------------------------------------------------------------------- the open-ended experiment
@pytest.fixture(scope="module")
def lab():
    from ptcourse.checks.knowledge_distillation import DistillLab
    return DistillLab(per_class=10, n_transfer=1_000, n_val=300, n_test=500, teacher_images=1_000, teacher_epochs=2)


def _student(lab, T, alpha, scratch=False, steps=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    s = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(s.parameters(), lr=3e-3)
    for _ in range(steps):
        i = torch.randint(0, len(lab.y_labelled), (64,), generator=g)
        out = s(lab.x_labelled[i])
        loss = F.cross_entropy(out, lab.y_labelled[i]) if scratch else \
            distillation_loss(out, lab.z_labelled[i], lab.y_labelled[i], T, alpha)
        if not scratch:
            j = torch.randint(0, len(lab.x_transfer), (128,), generator=g)
            loss = loss + distillation_loss(s(lab.x_transfer[j]), lab.z_transfer[j], lab.z_transfer[j].argmax(1), T, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return s.eval()


@pytest.mark.slow
def test_check_experiment_judges_the_outcome(lab):
    from ptcourse.checks.knowledge_distillation import check_experiment
    scratch = _student(lab, 1, 0, scratch=True)
    trials = [{"student": scratch, "scratch": True, "val_acc": lab.val_accuracy(scratch)}]
    for T in (1.0, 4.0):
        for a in (0.5, 0.9):
            s = _student(lab, T, a)
            trials.append({"student": s, "T": T, "alpha": a, "val_acc": lab.val_accuracy(s)})
    kd = [i for i, t in enumerate(trials) if not t.get("scratch")]
    best = max(kd, key=lambda i: trials[i]["val_acc"])
    worst = min(kd, key=lambda i: trials[i]["val_acc"])
    assert check_experiment(lab, trials, best, quiet=True)
    if trials[worst]["val_acc"] < trials[best]["val_acc"]:
        assert "validation" in check_experiment(lab, trials, worst, quiet=True).message
        assert not check_experiment(lab, trials, worst, quiet=True)
    # a val_acc measured elsewhere (e.g. on the test split) is refused
    forged = [dict(t) for t in trials]
    forged[best]["val_acc"] += 0.01
    assert not check_experiment(lab, forged, best, quiet=True)
    # too few settings, or no scratch baseline
    assert not check_experiment(lab, trials[:3], 1, quiet=True)
    assert not check_experiment(lab, trials[1:], best - 1, quiet=True)
    # a "distilled" student that never saw the transfer set does not beat scratch
    lazy = [trials[0]] + [{"student": scratch, "T": T, "alpha": a, "val_acc": trials[0]["val_acc"]}
                          for T in (1.0, 2.0) for a in (0.5, 0.9)]
    result = check_experiment(lab, lazy, 1, quiet=True)
    assert not result and "scratch" in result.message


# ----------------------------------------------------------------------------- the dying kernel (issue 12, item 10)
_REPEAT_SCRIPT = r"""
import faulthandler, sys
faulthandler.enable()
import torch, torch.nn as nn
from ptcourse.chapters import knowledge_distillation as compress
threads = torch.get_num_threads()
torch.manual_seed(int(sys.argv[1]))
def cnn(widths, c=3):
    layers = []
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
x = torch.rand(512, 3, 32, 32)
for _ in range(3):                       # what section 6 of the chapter does, three times over
    student = cnn((8, 16, 32)).eval()
    q = compress.quantize_int8(student, x)
    with torch.inference_mode():
        q(x[:200]); q(x[:1]); student(x[:64])
    for m in (student, q):
        compress.latency_ms(m, x[:1], min_run_time=0.02)
        compress.latency_ms(m, x[:64], min_run_time=0.02)
assert torch.get_num_threads() == threads, "the thread setting changed"
print("ok")
"""


@pytest.mark.slow
def test_quantization_and_latency_survive_repeated_fresh_processes(tmp_path):
    """Chapter 05's kernel died in 2 of 16 smoke runs (no traceback) and a cpu run hung once.

    The suspects were native: eager-mode int8 kernels (``torch.ao.quantization``, oneDNN) and the
    thread-count changes of the latency benchmark and of a per-cell thread context. The chapter now
    uses neither. This runs what its section 6 does several times in fresh processes, each with
    faulthandler on, so a native crash shows up as a non-zero exit with a C-level stack.
    """
    import os
    import subprocess
    import sys
    script = tmp_path / "repeat.py"
    script.write_text(_REPEAT_SCRIPT)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    for seed in range(4):
        run = subprocess.run([sys.executable, str(script), str(seed)], capture_output=True, text=True,
                             timeout=300, env=env)
        assert run.returncode == 0 and "ok" in run.stdout, f"run {seed} died ({run.returncode}):\n{run.stderr[-3000:]}"


def test_a_saved_teacher_from_another_profile_or_too_weak_is_refused(tmp_path):
    """Chapter 04's saved teacher is distilled from only if it was trained in this run's profile and
    reached the accuracy chapter 05 needs; otherwise a clear refusal names the reason."""
    from ptcourse.chapters.knowledge_distillation import TeacherRefused, load_teacher
    from ptcourse.files import save_atomic
    path = tmp_path / "resnet18_cifar10.pt"
    save_atomic({"state_dict": {}, "profile": "smoke", "val_acc": 0.95}, path)
    with pytest.raises(TeacherRefused, match="smoke profile, and this run uses the cpu profile"):
        load_teacher(path, "cpu", min_accuracy=0.8)
    save_atomic({"state_dict": {}, "profile": "cpu", "val_acc": 0.41}, path)
    with pytest.raises(TeacherRefused, match="validation accuracy 0.410, below the 0.80"):
        load_teacher(path, "cpu", min_accuracy=0.8)
    save_atomic({"state_dict": {}, "profile": "cpu", "test_acc": 0.95}, path)   # an older file: no val_acc
    with pytest.raises(TeacherRefused, match="no recorded validation accuracy"):
        load_teacher(path, "cpu", min_accuracy=0.8)
    save_atomic({"state_dict": {"w": 1}, "profile": "cpu", "val_acc": 0.9}, path)
    assert load_teacher(path, "cpu", min_accuracy=0.8)["state_dict"] == {"w": 1}


# ----------------------------------------------------------------------------- choosing on validation
def test_search_axes_searches_each_axis_at_the_previous_choice_and_trains_each_setting_once():
    calls = []

    def score(lr, wd):
        calls.append((lr, wd))
        return -(lr - 0.01) ** 2 - (wd - 0.1) ** 2

    chosen, done = compress.search_axes("toy", {"lr": [0.003, 0.01, 0.03], "wd": [0.01, 0.1, 1.0]}, score,
                                        start={"lr": 0.003, "wd": 0.01})
    assert chosen == {"lr": 0.01, "wd": 0.1}
    assert [s.name for s in done] == ["lr toy", "wd toy"]
    assert [s.trials for s in done] == [3, 3]
    assert all(wd == 0.01 for _, wd in calls[:3]) and all(lr == 0.01 for lr, _ in calls[3:])
    assert len(calls) == len(set(calls)) == 5          # (0.01, 0.01) was scored in the lr search already


def test_search_axes_extends_each_axis_by_its_own_rule_and_flags_what_stays_at_an_edge():
    score = lambda T, alpha: -abs(T - 0.5) + alpha            # best T below the grid; alpha best at 1
    chosen, (t, a) = compress.search_axes("kd", {"T": [1.0, 2.0, 4.0], "alpha": [0.5, 0.7, 0.9]}, score,
                                          start={"T": 4.0, "alpha": 0.9}, max_extend=1,
                                          extend={"T": "geometric", "alpha": compress.extend_fraction})
    assert t.grid == [0.5, 1.0, 2.0, 4.0] and t.chosen == 0.5 and t.edge     # extended once, still at the edge
    assert a.grid == [0.5, 0.7, 0.9, 1.0] and a.chosen == 1.0 and a.edge
    assert chosen == {"T": 0.5, "alpha": 1.0}


def test_a_choice_at_the_end_of_alphas_range_records_the_range_not_the_budget():
    score = lambda T, alpha: -abs(T - 0.1) + alpha            # T best below the grid, alpha best at 1
    budget = "at most 1 value(s) added beyond an edge: the cpu profile's time budget"
    for alphas in ([0.5, 0.7, 0.9], [0.7, 0.9, 1.0]):         # 1.0 reached by extending, or in the grid
        for max_extend in (0, 1, 2):                           # also when no extension is allowed (smoke)
            _, (t, a) = compress.search_axes("kd", {"T": [1.0, 2.0, 4.0], "alpha": alphas}, score,
                                             start={"T": 4.0, "alpha": 0.9}, max_extend=max_extend, edge_reason=budget,
                                             extend={"T": "geometric", "alpha": compress.extend_fraction})
            if a.grid[-1] != 1.0:      # [0.5, 0.7, 0.9] without extension: 0.9 is a budget edge
                assert max_extend == 0 and a.edge.endswith(budget)
                continue
            assert a.chosen == 1.0 and "range [0, 1]" in a.edge and "budget" not in a.edge, a.edge
            assert t.chosen == t.grid[0] and t.edge.endswith(budget)    # T has no natural bound: the budget
            assert a.to_dict()["edge"] == a.edge


def test_search_axes_needs_a_start_value_for_every_axis():
    with pytest.raises(ValueError, match="no start value"):
        compress.search_axes("x", {"lr": [1, 2]}, lambda lr: lr, start={})


def test_extend_fraction_stays_within_zero_and_one():
    assert compress.extend_fraction([0.5, 0.7, 0.9], "high") == 1.0
    assert compress.extend_fraction([0.2, 0.5, 0.8], "low") == 0.0
    assert compress.extend_fraction([0.0, 0.5], "low") is None
    assert compress.extend_fraction([0.5, 1.0], "high") is None
