"""Chapter 04 library code (ptcourse.chapters.resnet_transfer) and its exercise checks."""
import copy
import socket
import threading
import urllib.request

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ptcourse.checks import resnet_transfer as checks
from ptcourse.chapters import resnet_transfer as T


# ----------------------------------------------------------------------------- pretrained weights
def _no_download(monkeypatch, tmp_path, port=9):
    """An empty TORCH_HOME and an unreachable proxy: downloading fails at once even on a machine that is online."""
    monkeypatch.setattr(urllib.request, "_opener", None)   # urlopen caches its proxy settings
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def test_cpu_profile_refuses_random_weights_with_a_clear_message(monkeypatch, tmp_path):
    """PTCOURSE_PROFILE=cpu, an empty TORCH_HOME, no network: a clear stop instead of random weights."""
    _no_download(monkeypatch, tmp_path)
    monkeypatch.setenv("PTCOURSE_PROFILE", "cpu")
    with pytest.raises(T.PretrainedWeightsUnavailable) as info:
        T.load_resnet18()
    err = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err   # where it looked
    assert "TORCH_HOME=" + str(tmp_path / "torch") in err
    assert "does not exist, and downloading it failed" in err                                  # what failed
    assert "internet" in err and "copy resnet18-f37072fd.pth" in err                           # how to fix


def test_smoke_profile_continues_from_random_weights_loudly(monkeypatch, tmp_path, capsys):
    _no_download(monkeypatch, tmp_path)
    monkeypatch.setenv("PTCOURSE_PROFILE", "smoke")
    net, pretrained = T.load_resnet18()
    assert pretrained is False and isinstance(net, torchvision.models.ResNet)
    assert "MEANINGLESS" in capsys.readouterr().out
    monkeypatch.setenv("PTCOURSE_PROFILE", "gpu")
    with pytest.raises(T.PretrainedWeightsUnavailable, match="hub/checkpoints"):
        T.load_resnet18()


def test_weights_come_from_the_torch_home_cache(monkeypatch, tmp_path):
    _no_download(monkeypatch, tmp_path)
    monkeypatch.setenv("PTCOURSE_PROFILE", "cpu")
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "resnet18-f37072fd.pth")
    net, pretrained = T.load_resnet18()
    assert pretrained is True
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    (folder / "resnet18-f37072fd.pth").write_bytes(b"truncated")       # a damaged cache file
    with pytest.raises(T.PretrainedWeightsUnavailable, match="exists but could not be read"):
        T.load_resnet18()


def test_a_silent_server_cannot_hang_the_download(monkeypatch, tmp_path):
    """A proxy that accepts the connection and never answers: the socket timeout ends the wait."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    conns = []
    stop = threading.Event()

    def accept():
        conn, _ = server.accept()
        conns.append(conn)
        stop.wait(10)                        # if the timeout did not work, the test fails after 10 s
        conn.close()

    threading.Thread(target=accept, daemon=True).start()
    _no_download(monkeypatch, tmp_path, port)
    try:
        with pytest.raises(T.PretrainedWeightsUnavailable) as info:
            T.load_resnet18(allow_random=False, timeout=0.5)
    finally:
        stop.set()
        server.close()
    assert "timed out" in str(info.value).lower()
    assert socket.getdefaulttimeout() is None            # restored


# ----------------------------------------------------------------------------- freezing
def _resnet(num_classes=10):
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def test_partly_frozen_keeps_frozen_batchnorm_in_eval_through_train():
    net = _resnet()
    model = T.PartlyFrozen(net, trainable=("layer4", "fc"))
    assert T.count_parameters(model, trainable_only=True) == T.count_parameters(net.layer4) + 5130
    model.eval()
    model.train()                                           # what fit() does every epoch
    assert not net.bn1.training and not net.layer3[1].bn2.training
    assert net.layer4[0].bn1.training and net.fc.training   # trainable parts do train
    before = net.layer1[0].bn1.running_mean.clone()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    assert torch.equal(before, net.layer1[0].bn1.running_mean)
    with pytest.raises(ValueError):
        T.PartlyFrozen(_resnet(), trainable=("layer5",))


def test_freezing_without_eval_lets_batchnorm_statistics_drift():
    """The bug the chapter shows: requires_grad=False alone does not freeze BatchNorm."""
    net = _resnet()
    for p in net.parameters():
        p.requires_grad_(False)
    net.train()
    before = net.bn1.running_mean.clone()
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
    assert not torch.equal(before, net.bn1.running_mean)


def test_preprocess_resizes_and_normalises():
    prep = T.Preprocess(8, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.full((2, 3, 4, 4), 0.75)
    y = prep(x)
    assert y.shape == (2, 3, 8, 8) and torch.allclose(y, torch.ones_like(y))
    assert prep(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)
    assert T.Preprocess(8, [0] * 3, [1] * 3, channels_last=True)(x).is_contiguous(memory_format=torch.channels_last)


def test_discriminative_groups_lr_per_stage():
    net = _resnet()
    groups = T.discriminative_groups(net, head_lr=0.1, decay=0.5)
    assert [g["name"] for g in groups] == ["conv1+bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 / 32, 0.1 / 16, 0.1 / 8, 0.1 / 4, 0.1 / 2, 0.1])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    T.PartlyFrozen(net, trainable=("layer4", "fc"))
    assert [g["name"] for g in T.discriminative_groups(net, 0.1)] == ["layer4", "fc"]
    opt = torch.optim.SGD(T.discriminative_groups(net, 0.1), lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.1]


# ----------------------------------------------------------------------------- Grad-CAM
def _gradcam_by_hand(model, layer, x, target):
    """Grad-CAM from the formula, without hooks: split the model at ``layer`` by hand."""
    feats = model[: list(model).index(layer) + 1](x).detach().requires_grad_(True)
    logits = model[list(model).index(layer) + 1:](feats)
    dA, = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), feats)
    return F.relu((dA.mean((2, 3), keepdim=True) * feats).sum(1))


def test_gradcam_matches_the_formula_and_cleans_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    cam = T.gradcam(model, model[3], x, target)
    assert cam.shape == (3, 4, 4)
    assert torch.allclose(cam, _gradcam_by_hand(model, model[3], x, target), atol=1e-6)
    assert not model[3]._forward_hooks
    assert all(p.grad is None for p in model.parameters())      # no side effect on .grad
    pred = model(x).argmax(1)
    assert torch.allclose(T.gradcam(model, model[3], x), _gradcam_by_hand(model, model[3], x, pred), atol=1e-6)


def test_gradcam_on_the_known_answer_case():
    model, layer, img, red, blue = checks.two_squares()
    cams = T.gradcam(model, layer, img.repeat(2, 1, 1, 1), torch.tensor([0, 1]))
    assert (cams[0][red] > 0).all() and (cams[0][~red] == 0).all()
    assert (cams[1][blue] > 0).all() and (cams[1][~blue] == 0).all()


def test_gradcam_on_a_resnet_layer():
    net = _resnet().eval()
    cam = T.gradcam(net, net.layer4, torch.rand(2, 3, 64, 64), torch.tensor([1, 2]))
    assert cam.shape == (2, 2, 2) and (cam >= 0).all()


# ----------------------------------------------------------------------------- checks
@pytest.mark.slow  # a few seconds: kept out of the fast tier
def test_check_replace_head_and_freeze():
    def good(net, k):
        net.fc = nn.Linear(net.fc.in_features, k)
        return T.PartlyFrozen(net, ("fc",))

    def no_freeze(net, k):
        net.fc = nn.Linear(512, k)
        return net

    def freeze_but_bn_train(net, k):
        net.fc = nn.Linear(512, k)
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith("fc."))
        return net

    def bn_eval_once(net, k):
        model = freeze_but_bn_train(net, k)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()                          # undone by the model.train() that fit() calls
        return model

    def head_frozen_too(net, k):
        net.fc = nn.Linear(512, k)
        return T.PartlyFrozen(net, ("layer4",))

    def old_head(net, k):
        return T.PartlyFrozen(net, ("fc",))

    assert checks.check_replace_head_and_freeze(good, quiet=True)
    for wrong in (no_freeze, freeze_but_bn_train, bn_eval_once, head_frozen_too, old_head):
        assert not checks.check_replace_head_and_freeze(wrong, quiet=True), wrong.__name__


@pytest.mark.slow  # a few seconds: kept out of the fast tier
def test_check_discriminative_groups():
    def good(net, head_lr, decay):
        return T.discriminative_groups(net, head_lr, decay)

    def same_lr(net, head_lr, decay):
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr": head_lr}]

    def reversed_decay(net, head_lr, decay):
        groups = T.discriminative_groups(net, head_lr, decay)
        lrs = [g["lr"] for g in groups][::-1]
        return [dict(g, lr=lr) for g, lr in zip(groups, lrs)]

    def forgets_stem(net, head_lr, decay):
        return [g for g in T.discriminative_groups(net, head_lr, decay) if g["name"] != "conv1+bn1"]

    def includes_frozen(net, head_lr, decay):
        frozen = [p for p in net.parameters() if not p.requires_grad]
        groups = T.discriminative_groups(net, head_lr, decay)
        if frozen:
            groups[0] = dict(groups[0], params=groups[0]["params"] + frozen)
        return groups

    assert checks.check_discriminative_groups(good, quiet=True)
    for wrong in (same_lr, reversed_decay, forgets_stem, includes_frozen):
        assert not checks.check_discriminative_groups(wrong, quiet=True), wrong.__name__


def _activation_and_grad(model, layer, x, target):
    """The layer's activation A and d(target logit)/dA, as a wrong Grad-CAM would start."""
    seen = {}
    h = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("A", o))
    try:
        logits = model(x)
        dA, = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), seen["A"])
    finally:
        h.remove()
    return seen["A"], dA


def test_check_gradcam():
    def no_relu(model, layer, x, target):
        A, dA = _activation_and_grad(model, layer, x, target)
        return (dA.mean((2, 3), keepdim=True) * A).sum(1).detach()

    def grad_times_activation(model, layer, x, target):
        A, dA = _activation_and_grad(model, layer, x, target)
        return F.relu((dA * A).sum(1)).detach()

    def leaves_hook(model, layer, x, target):
        seen = {}
        layer.register_forward_hook(lambda m, i, o: seen.__setitem__("A", o))
        logits = model(x)
        dA, = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), seen["A"])
        return F.relu((dA.mean((2, 3), keepdim=True) * seen["A"]).sum(1)).detach()

    assert checks.check_gradcam(T.gradcam, quiet=True)
    for wrong in (no_relu, grad_times_activation, leaves_hook):
        assert not checks.check_gradcam(wrong, quiet=True), wrong.__name__


def test_checks_let_unfinished_stubs_through():
    def stub(*args):
        raise NotImplementedError("Exercise 1: ...")

    for check in (checks.check_replace_head_and_freeze, checks.check_discriminative_groups, checks.check_gradcam,
                  checks.check_reestimate_batchnorm):
        with pytest.raises(NotImplementedError):
            check(stub, quiet=True)
    assert copy.deepcopy(checks.two_squares()[2]).shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------- the open-ended experiment
@pytest.mark.slow
def test_transfer_lab_and_check_experiment():
    lab = checks.TransferLab(per_class=10, n_source=1_000, source_epochs=1, n_val=300, n_test=500)
    net = lab.pretrained()
    assert [n for n, _ in net.named_children()][:4] == ["conv1", "bn1", "relu", "layer1"]
    assert torch.equal(net.layer1[0][0].weight, lab.pretrained().layer1[0][0].weight)   # the pretrained body
    assert not torch.equal(net.layer1[0][0].weight, lab.scratch().layer1[0][0].weight)
    assert set(lab.y_train.tolist()) == set(range(5)) and len(lab.y_train) == 50

    def tune(model, lr, decay, steps=40):
        opt = torch.optim.SGD(T.discriminative_groups(model, lr, decay), lr=lr, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            i = torch.randint(0, len(lab.y_train), (32,), generator=g)
            loss = F.cross_entropy(model(lab.x_train[i]), lab.y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()

    scratch = tune(lab.scratch(), 0.05, 1.0)
    trials = [{"model": scratch, "scratch": True, "schedule": "scratch", "val_acc": lab.val_accuracy(scratch)}]
    for decay in (1.0, 0.3, 0.1):
        m = tune(lab.pretrained(), 0.05, decay)
        trials.append({"model": m, "schedule": f"decay {decay}", "val_acc": lab.val_accuracy(m)})
    tuned = [1, 2, 3]
    best = max(tuned, key=lambda i: trials[i]["val_acc"])
    worst = min(tuned, key=lambda i: trials[i]["val_acc"])
    result = checks.check_experiment(lab, trials, best, quiet=True)
    assert ("scratch" in result.message) and ("ranks" in result.message)
    if trials[worst]["val_acc"] < trials[best]["val_acc"]:
        assert not checks.check_experiment(lab, trials, worst, quiet=True)
    forged = [dict(t) for t in trials]
    forged[best]["val_acc"] = 1.0
    assert not checks.check_experiment(lab, forged, best, quiet=True)
    assert not checks.check_experiment(lab, trials[:3], best if best < 3 else 1, quiet=True)   # two schedules only
    assert not checks.check_experiment(lab, trials[1:], best - 1, quiet=True)                  # no scratch baseline
    # a "fine-tuned" model that is the scratch model itself cannot beat scratch
    copies = [trials[0]] + [{"model": scratch, "schedule": f"fake {k}", "val_acc": trials[0]["val_acc"]} for k in range(3)]
    assert not checks.check_experiment(lab, copies, 1, quiet=True)


# ----------------------------------------------------------------------------- sources the chapter pretrains itself
TARGET, NEAR = (3, 4, 5, 6, 7), (0, 1, 2, 8, 9)


def test_take_classes_relabels_in_the_given_order_and_keeps_positions():
    labels = torch.tensor([9, 3, 7, 3, 0, 7])
    images = torch.arange(6).view(6, 1, 1, 1)
    x, y, pos = T.take_classes(images, labels, (7, 3))
    assert pos.tolist() == [1, 2, 3, 5] and y.tolist() == [1, 0, 1, 0]
    assert x.flatten().tolist() == pos.tolist()


def test_source_and_target_share_no_image_and_no_class():
    """The chapter's class split of one CIFAR-10-like array: disjoint positions, disjoint classes, all kept."""
    labels = torch.arange(200) % 10
    images = torch.arange(200).view(200, 1, 1, 1)
    xs, ys, ps = T.take_classes(images, labels, NEAR)
    xt, yt, pt = T.take_classes(images, labels, TARGET)
    assert not set(ps.tolist()) & set(pt.tolist())
    assert not set(labels[ps].tolist()) & set(labels[pt].tolist())
    assert len(ps) + len(pt) == len(labels) and ys.unique().tolist() == yt.unique().tolist() == [0, 1, 2, 3, 4]


def test_split_per_class_draws_disjoint_balanced_parts_by_seed():
    labels = torch.arange(100) % 5
    a, b = T.split_per_class(labels, 3, seed=1)
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(a) + len(b) == 100
    assert torch.bincount(labels[a]).tolist() == [3] * 5
    assert torch.equal(a, T.split_per_class(labels, 3, seed=1)[0])
    assert not torch.equal(a, T.split_per_class(labels, 3, seed=2)[0])


def test_gray_to_rgb_copies_the_channel_at_the_new_size():
    g = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    rgb = T.gray_to_rgb(g, 32)
    assert rgb.shape == (4, 3, 32, 32) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    assert torch.equal(T.gray_to_rgb(g.unsqueeze(1), 28)[:, 0], g)          # no resize: the same pixels
    with pytest.raises(ValueError):
        T.gray_to_rgb(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), 32)


def test_far_source_has_the_near_sources_size_and_shape():
    """Sampled as the chapter does: the same number of images per class, the same number of classes, 32 px RGB."""
    cifar_labels = torch.arange(400) % 10
    cifar = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    mnist_labels = torch.arange(300) % 10
    mnist = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    xn, yn, _ = T.take_classes(cifar, cifar_labels, NEAR)
    xf, yf, _ = T.take_classes(mnist, mnist_labels, (0, 1, 2, 3, 4))
    xf = T.gray_to_rgb(xf, 32)
    near, far = T.split_per_class(yn, 12)[0], T.split_per_class(yf, 12)[0]
    assert len(near) == len(far) == 60 and xn[near].shape == xf[far].shape
    assert torch.bincount(yn[near]).tolist() == torch.bincount(yf[far]).tolist()


def test_pretrain_learns_a_separable_source_task():
    """Two classes told apart by brightness: after a few epochs the source validation accuracy is high."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = (torch.rand(64, 3, 16, 16, generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    prep = T.Preprocess(16, [0.5] * 3, [0.25] * 3)
    history = T.pretrain(net, prep, x[:48], y[:48], x[48:], y[48:], epochs=4, lr=0.05, batch=16)
    assert len(history["val_acc"]) == 4 and history["val_acc"][-1] >= 0.9, history["val_acc"]


def test_reestimate_batchnorm_holds_the_new_images_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.rand(32, 3, 6, 6) * 4 + 2
    weights = [p.detach().clone() for p in net.parameters()]
    T.reestimate_batchnorm(net, x, batch=32)
    inputs = net[0](x).detach()
    bn = net[1]
    assert torch.allclose(bn.running_mean, inputs.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, inputs.transpose(0, 1).reshape(4, -1).var(1), atol=1e-4)
    assert not net.training and bn.momentum == 0.1
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, net.parameters()))


def test_check_reestimate_batchnorm():
    assert checks.check_reestimate_batchnorm(T.reestimate_batchnorm, quiet=True)

    def exponential(model, images, batch):                  # forgets momentum=None: mixes in the old statistics
        model.train()
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model(images[i:i + batch])
        return model.eval()

    def left_in_train(model, images, batch):
        T.reestimate_batchnorm(model, images, batch)
        return model.train()

    def momentum_lost(model, images, batch):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        with torch.no_grad():
            for i in range(0, len(images), batch):
                model(images[i:i + batch])
        return model.eval()

    for wrong in (exponential, left_in_train, momentum_lost):
        assert not checks.check_reestimate_batchnorm(wrong, quiet=True), wrong.__name__


def test_run_if_cell_magic_runs_or_skips_visibly(capsys):
    """The ``%%run_if`` magic: a true flag runs the cell in the notebook's namespace (errors propagate), a false
    one prints which flag skipped it and runs nothing."""
    class Shell:
        def __init__(self):
            self.user_ns = {"IMAGENET": False, "ran": 0}

        def transform_cell(self, cell):
            return cell

    shell = Shell()
    assert T.run_if("IMAGENET", "ran = 1", shell) is False and shell.user_ns["ran"] == 0
    assert "skipped: IMAGENET is False" in capsys.readouterr().out
    shell.user_ns["IMAGENET"] = True
    assert T.run_if("IMAGENET", "ran = 1", shell) is True and shell.user_ns["ran"] == 1
    with pytest.raises(ZeroDivisionError):
        T.run_if("IMAGENET", "1 / 0", shell)
    with pytest.raises(ValueError):
        T.run_if("  ", "ran = 2", shell)


def test_run_if_magic_in_ipython(capsys):
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.run_line_magic("load_ext", "ptcourse.chapters.resnet_transfer")
    ip.user_ns.update(FLAG=False, hits=0)
    ip.run_cell_magic("run_if", "FLAG", "hits += 1")
    assert ip.user_ns["hits"] == 0 and "skipped: FLAG is False" in capsys.readouterr().out
    ip.user_ns["FLAG"] = True
    ip.run_cell_magic("run_if", "FLAG", "hits += 1")
    assert ip.user_ns["hits"] == 1
    with pytest.raises(NameError, match="not_defined"):               # errors reach the notebook
        ip.run_cell_magic("run_if", "FLAG", "hits += 1\nnot_defined")
