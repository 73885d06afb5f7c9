"""Checks for chapter 04 (ResNet transfer): head + freeze, discriminative LR groups, Grad-CAM, BatchNorm
statistics re-estimated on the target, and the open-ended fine-tuning experiment (:class:`TransferLab`,
:func:`check_experiment`)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ._common import CheckResult, SealedTestLab, attempt, compare, result, split_trials, train_on_tensors

__all__ = ["check_replace_head_and_freeze", "check_discriminative_groups", "check_gradcam", "two_squares",
           "check_reestimate_batchnorm", "TransferLab", "check_experiment"]


def _result(name, problem, ok_text, hint, quiet):
    return result(name, problem is None, problem or ok_text, hint, quiet)


def _norms(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_replace_head_and_freeze(student_fn, quiet=False) -> CheckResult:
    """``student_fn(net, num_classes)`` must give a new ``net.fc`` for ``num_classes`` classes, freeze
    every other parameter, and keep every frozen BatchNorm layer in eval mode even after ``.train()``."""
    import torchvision

    name = "check_replace_head_and_freeze"
    hint = ("replace net.fc by nn.Linear(net.fc.in_features, num_classes); set requires_grad=False on all "
            "other parameters; and override train() (e.g. in a small wrapper module) so that it puts the "
            "frozen BatchNorm layers back in eval mode: fit() calls model.train() every epoch.")
    problem = None
    for num_classes in (7, 3):
        torch.manual_seed(num_classes)
        net = torchvision.models.resnet18(weights=None)
        model, problem = attempt(student_fn, net, num_classes)
        if problem:
            break
        if not isinstance(model, nn.Module):
            problem = f"should return an nn.Module, got {type(model).__name__}"
            break
        head = net.fc
        want = 512 * num_classes + num_classes
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not (isinstance(head, nn.Linear) and head.out_features == num_classes):
            problem = f"net.fc should be a new nn.Linear(512, {num_classes}), it is {head}"
        elif n_trainable != want:
            problem = (f"{n_trainable:,} trainable parameters with num_classes={num_classes}; only the new "
                       f"head should train ({want:,} parameters)")
        elif trainable != {id(p) for p in head.parameters()}:
            problem = "the trainable parameters are not those of the new head net.fc"
        if problem:
            break
        before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in _norms(net)}
        model.train()
        with torch.no_grad():
            out = model(torch.rand(4, 3, 32, 32) * 3)
        if tuple(out.shape) != (4, num_classes):
            problem = f"the model outputs shape {list(out.shape)} for 4 images, expected [4, {num_classes}]"
            break
        in_train = [n for n, m in _norms(net) if m.training]
        moved = [n for n, m in _norms(net) if not (torch.equal(m.running_mean, before[n][0])
                                                    and torch.equal(m.running_var, before[n][1]))]
        if in_train or moved:
            which = (in_train or moved)[:3]
            problem = (f"after model.train() and one forward pass, {len(in_train)} frozen BatchNorm layers are in "
                       f"train mode and {len(moved)} changed their running statistics (e.g. {which})")
            break
    ok = "only the new head trains, and frozen BatchNorm stays in eval mode through model.train()."
    return _result(name, problem, ok, hint, quiet)


def _bn_net(seed):
    """A small CNN with two BatchNorm layers whose running statistics are far from those of new images."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(9.0)
    return net.eval()


def check_reestimate_batchnorm(student_fn, quiet=False) -> CheckResult:
    """``student_fn(model, images, batch)`` must set every BatchNorm layer's running statistics to those of
    ``images`` (an exact average over the batches, not an exponential one from the old statistics), change
    no parameter, restore each layer's ``momentum`` and return the model in eval mode. The expected statistics
    come from :func:`ptcourse.chapters.resnet_transfer.reestimate_batchnorm` on a copy of the same model."""
    from ..chapters.resnet_transfer import reestimate_batchnorm

    name = "check_reestimate_batchnorm"
    hint = ("reset each BatchNorm layer's running statistics (m.reset_running_stats()) and set m.momentum = None "
            "(a cumulative average); run the images through the model in train mode under torch.no_grad(), "
            "batch by batch; then put every momentum back and call model.eval().")
    problem = None
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 8, 8, generator=g) * 2 + 1        # far from the layers' old statistics
    for batch in (40, 16):
        net = _bn_net(batch)
        params = {n: p.detach().clone() for n, p in net.named_parameters()}
        reference = reestimate_batchnorm(copy.deepcopy(net), images, batch)
        want = [(m.running_mean, m.running_var) for m in reference if isinstance(m, nn.BatchNorm2d)]
        out, problem = attempt(student_fn, net, images.clone(), batch)
        if problem:
            break
        model = out if isinstance(out, nn.Module) else net
        norms = [m for m in net if isinstance(m, nn.BatchNorm2d)]
        changed = [n for n, p in net.named_parameters() if not torch.equal(p.detach(), params[n])]
        if changed:
            problem = f"parameters changed ({changed[:3]}); only the running statistics may"
        elif any(m.training for m in model.modules()):
            problem = "the model is left in train mode; return it in eval mode, ready to extract features"
        elif any(m.momentum != 0.1 for m in norms):
            problem = f"momentum is {[m.momentum for m in norms]} afterwards; put each layer's momentum back (0.1 here)"
        else:
            for i, (m, (mean, var)) in enumerate(zip(norms, want)):
                if not torch.allclose(m.running_mean, mean, atol=1e-4, rtol=1e-4):
                    problem = (f"BatchNorm layer {i}: running_mean {m.running_mean[:3].tolist()} ..., expected the average "
                               f"batch mean of its inputs over the {len(images)} images {mean[:3].tolist()} ... (batch {batch})")
                elif not torch.allclose(m.running_var, var, atol=1e-3, rtol=1e-3):
                    problem = (f"BatchNorm layer {i}: running_var {m.running_var[:3].tolist()} ..., expected the "
                               f"average batch variance of its inputs over the {len(images)} images {var[:3].tolist()} ... (batch {batch})")
                if problem:
                    break
        if problem:
            break
    ok = "every BatchNorm layer now holds the statistics of the new images, and nothing else changed."
    return _result(name, problem, ok, hint, quiet)


def _groups_summary(groups, names):
    out = []
    for g in groups:
        params = list(g["params"])
        if params:
            out.append((float(g["lr"]), sorted(names.get(id(p), "?") for p in params)))
    return out


def check_discriminative_groups(student_fn, quiet=False) -> CheckResult:
    """``student_fn(net, head_lr, decay)`` must return one parameter group per ResNet stage (stem, layer1..4, fc),
    in that order, with LR ``head_lr * decay**depth`` (the head at depth 0), trainable parameters only."""
    import torchvision

    from ..chapters.resnet_transfer import PartlyFrozen, discriminative_groups

    name = "check_discriminative_groups"
    hint = ("stages are (conv1, bn1), layer1, layer2, layer3, layer4, fc; the group of the fc head gets head_lr, "
            "layer4 head_lr*decay, layer3 head_lr*decay**2, ...; leave out frozen parameters and empty stages.")
    torch.manual_seed(0)
    cases = []
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    cases.append((net, 0.01, 0.5))
    net2 = copy.deepcopy(net)
    PartlyFrozen(net2, trainable=("layer3", "layer4", "fc"))  # freezes the rest in place
    cases.append((net2, 0.1, 0.3))
    problem = None
    for i, (net, head_lr, decay) in enumerate(cases):
        names = {id(p): n for n, p in net.named_parameters()}
        got, problem = attempt(student_fn, net, head_lr, decay)
        if problem:
            break
        try:
            got = _groups_summary(got, names)
        except (TypeError, KeyError) as err:
            problem = f"should return a list of dicts with 'params' and 'lr' ({type(err).__name__}: {err})"
            break
        want = _groups_summary(discriminative_groups(net, head_lr, decay), names)
        frozen = "" if i == 0 else " (layers below layer3 frozen)"
        if len(got) != len(want):
            problem = f"{len(got)} non-empty groups{frozen}, expected {len(want)}"
        else:
            for (lr_g, p_g), (lr_w, p_w) in zip(got, want):
                stage = p_w[0].split(".")[0]
                if p_g != p_w:
                    extra = sorted(set(p_g) - set(p_w))[:2]
                    missing = sorted(set(p_w) - set(p_g))[:2]
                    problem = (f"the group for stage {stage!r}{frozen} has the wrong parameters "
                               f"(unexpected {extra}, missing {missing})")
                elif abs(lr_g - lr_w) > 1e-9 * max(1.0, abs(lr_w)):
                    problem = f"stage {stage!r}{frozen} has lr {lr_g:.3g}, expected {lr_w:.3g} (head_lr={head_lr}, decay={decay})"
                if problem:
                    break
        if problem:
            break
    return _result(name, problem, "one group per stage, learning rates decaying from the head down.", hint, quiet)


class _TwoChannels(nn.Module):
    """A known-answer network: channel 0 sees 'red minus blue', channel 1 'blue minus red'; logits = spatial means."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([[1.0, 0, -1], [-1, 0, 1]]).view(2, 3, 1, 1))
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.act(self.features(x))).flatten(1)


def two_squares(size: int = 16):
    """A case where the answer is known: a red square top-left, a blue square bottom-right.

    Returns ``(model, layer, image [1, 3, size, size], red_mask, blue_mask)``: class 0 ("red") can only
    come from the red square, class 1 ("blue") only from the blue one.
    """
    img = torch.zeros(1, 3, size, size)
    q = size // 4
    red = torch.zeros(size, size, dtype=torch.bool)
    blue = torch.zeros(size, size, dtype=torch.bool)
    red[q:2 * q, q:2 * q] = True
    blue[2 * q + 1:3 * q + 1, 2 * q + 1:3 * q + 1] = True
    img[0, 0][red] = 1.0
    img[0, 2][blue] = 1.0
    model = _TwoChannels()
    return model, model.act, img, red, blue


def _small_cnn(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))
    return model.eval()


def check_gradcam(student_fn, quiet=False) -> CheckResult:
    """``student_fn(model, layer, x, target)`` must return the Grad-CAM map [N, h, w] of ``layer`` for the
    classes ``target`` [N], and remove its hooks."""
    from ..chapters.resnet_transfer import gradcam

    name = "check_gradcam"
    hint = ("A = layer output (forward hook), dA = its gradient (backward hook on A, or torch.autograd.grad); "
            "alpha = dA.mean over (h, w); cam = relu((alpha * A).sum over channels); remove the hooks in a finally:.")
    cases = []
    for seed in range(3):
        model = _small_cnn(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2 + seed, 3, 8, 8, generator=g)
        target = torch.randint(0, 4, (2 + seed,), generator=g)
        cases.append((model, model[3 if seed % 2 else 2], x, target))
    model, layer, img, red, blue = two_squares()
    cases.append((model, layer, img.repeat(2, 1, 1, 1), torch.tensor([0, 1])))
    result = compare(name, student_fn, gradcam, cases, hint=hint, atol=1e-5, quiet=True)
    if not result:
        if not quiet:
            print(result.message)
        return result
    problem = None
    for model, layer, x, target in cases:
        student_fn(model, layer, x, target)
        if layer._forward_hooks or layer._backward_hooks or getattr(layer, "_forward_pre_hooks", None):
            problem = "your function left a hook on the layer; keep the handle and call handle.remove() (in a finally:)"
            break
    if problem is None:
        cam = student_fn(model, layer, img, torch.tensor([0]))[0]
        if not (cam[red] > 0).all() or (cam[~red] != 0).any():
            problem = "on the two-squares image the map for 'red' should be positive exactly on the red square"
    return _result(name, problem, f"matches the reference on {len(cases)} inputs, including the two-squares "
                   "case, and leaves no hooks behind.", hint, quiet)


# ----------------------------------------------------------------------------- the open-ended experiment
class LabNet(nn.Module):
    """A small CNN for 28 x 28 digits whose stages are named like torchvision's ResNet
    (``conv1``, ``bn1``, ``layer1`` ... ``layer3``, ``fc``), so ResNet code (parameter groups,
    freezing by stage name) works on it unchanged."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        block = lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(c_out), nn.ReLU())
        self.conv1, self.bn1, self.relu = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.layer1 = nn.Sequential(block(8, 16), nn.MaxPool2d(2))           # 14 x 14
        self.layer2 = nn.Sequential(block(16, 32), nn.MaxPool2d(2))          # 7 x 7
        self.layer3 = nn.Sequential(block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))))



class TransferLab(SealedTestLab):
    """The data of the open-ended experiment: transfer from MNIST digits 0-4 to digits 5-9.

    * **source task** (pretraining, done here once): :class:`LabNet` trained on ``n_source`` labelled
      images of the digits 0-4;
    * **target task**: the digits 5-9 (labels 0-4 stand for 5-9), with only ``per_class`` labelled
      training images per digit (``x_train, y_train``) and a validation split (``val_accuracy``);
    * ``pretrained()``: a fresh copy of the pretrained network with a new, random 5-class head;
      ``scratch()``: the same network with random weights.

    The test split (digits 5-9 of MNIST's test set) is not handed out: only :func:`check_experiment`
    opens it, for your choice and your scratch baseline.

    Example:
        >>> lab = TransferLab(per_class=10)
        >>> model = lab.pretrained()
        >>> lab.val_accuracy(model)
    """

    def __init__(self, per_class: int = 10, n_source: int = 5_000, source_epochs: int = 2, n_val: int = 500,
                 n_test: int = 1_000, seed: int = 0):
        import numpy as np
        import torch.nn.functional as F
        from ..data import load
        from ..runtime import profile
        x, y = load("mnist", "train").tensors()
        rng = np.random.default_rng(seed)
        order = torch.from_numpy(rng.permutation(len(y)))
        src = order[y[order] < 5][:n_source]
        tgt = order[y[order] >= 5]
        val, rest = tgt[:n_val], tgt[n_val:]
        train = torch.cat([rest[y[rest] == d][:per_class] for d in range(5, 10)])
        self.x_train, self.y_train = x[train], y[train] - 5
        self.x_val, self.y_val = x[val], y[val] - 5
        self.per_class, self.n_test, self._seed, self._tested = per_class, n_test, seed, {}
        self.profile = profile().name
        torch.manual_seed(seed)
        net = train_on_tensors(LabNet(5), x[src], y[src], source_epochs, lr=2e-3, seed=seed)
        self.source_state = copy.deepcopy(net.state_dict())

    def pretrained(self, seed: int = 0) -> LabNet:
        """The network pretrained on digits 0-4, with a new random head for digits 5-9."""
        net = LabNet(5)
        net.load_state_dict(self.source_state)
        torch.manual_seed(seed)
        net.fc = nn.Linear(net.fc.in_features, 5)
        return net

    def scratch(self, seed: int = 0) -> LabNet:
        """The same network, randomly initialised."""
        torch.manual_seed(seed)
        return LabNet(5)

    def _test_split(self):
        from ..data import load
        x, y = load("mnist", "test").tensors()
        keep = torch.nonzero(y >= 5).flatten()[:self.n_test]
        return x[keep], y[keep] - 5


def check_experiment(lab: TransferLab, trials: list, chosen, quiet: bool = False, bar: float = 0.0) -> CheckResult:
    """Judge the open-ended fine-tuning experiment (its outcome, not the code).

    ``trials``: one dict per trained model with the keys ``"model"``, ``"val_acc"`` and
    ``"schedule"`` (a short description of the setting, e.g. ``"decay 0.3, head lr 0.05"`` or
    ``"unfreeze one stage every 50 steps"``); exactly one of them is the scratch baseline, marked
    ``"scratch": True``. ``chosen`` is the index of the fine-tuning trial you picked. Passes when

    * there are at least three distinct fine-tuning schedules and one scratch trial;
    * every ``val_acc`` is the trial's validation accuracy (``lab.val_accuracy``);
    * ``chosen`` is the best fine-tuning trial on validation;
    * on the sealed test split the chosen model beats the scratch baseline by more than ``bar``.

    It also says where your choice ranks on the test split among your schedules.
    """
    from ._common import result
    name = "check_experiment"
    split = split_trials(name, trials, "model", "model", quiet)
    if isinstance(split, CheckResult):
        return split
    scratch, tuned = [split[0]], split[1]
    schedules = {str(trials[i].get("schedule")) for i in tuned if trials[i].get("schedule")}
    if len(schedules) < 3 or any(not trials[i].get("schedule") for i in tuned):
        return result(name, False, f"compare at least three fine-tuning schedules, each described in its 'schedule' "
                                   f"key (found {len(schedules)} distinct).", quiet=quiet)
    val = lab._verified_val(name, trials, "model", quiet)
    if isinstance(val, CheckResult):
        return val
    if not isinstance(chosen, int) or chosen not in tuned:
        return result(name, False, f"`chosen` must be the index of one of your fine-tuning trials {tuned}.",
                      quiet=quiet)
    best = max(tuned, key=lambda i: val[i])
    if val[chosen] < val[best] - 1e-9:
        return result(name, False, f"you chose trial {chosen} (validation {val[chosen]:.4f}), but trial {best} has "
                                   f"{val[best]:.4f}.", hint="pick the best schedule on validation.", quiet=quiet)
    test = {i: lab._test_accuracy(trials[i]["model"]) for i in [chosen, scratch[0]] + tuned}
    gain = test[chosen] - test[scratch[0]]
    oracle = max(tuned, key=lambda i: test[i])
    rank = 1 + sum(test[i] > test[chosen] for i in tuned)
    msg = (f"your choice '{trials[chosen]['schedule']}' (validation {val[chosen]:.4f}): test {test[chosen]:.4f} vs "
           f"scratch {test[scratch[0]]:.4f} ({gain * 100:+.1f} points); it ranks {rank} of {len(tuned)} schedules on "
           f"test, where the best in hindsight ('{trials[oracle]['schedule']}') reached {test[oracle]:.4f}.")
    if lab.profile == "smoke":
        msg += " (smoke profile: tiny runs, the numbers are not meaningful)"
    if gain <= bar:
        return result(name, False, msg, hint="the chosen fine-tuned model must beat scratch on test: does it start "
                                             "from lab.pretrained()? Are the learning rates sensible?", quiet=quiet)
    return result(name, True, msg, quiet=quiet)
