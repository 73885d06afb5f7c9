"""Transfer learning with a torchvision ResNet: pretrained weights, freezing, LR groups, Grad-CAM, and
transfer from source tasks the chapter pretrains itself (class-split subsets, grayscale to RGB, pretraining,
BatchNorm statistics re-estimated on the target).

Example:
    >>> net, pretrained = load_resnet18()            # ImageNet weights via torchvision's cache
    >>> net.fc = torch.nn.Linear(512, 10)
    >>> model = PartlyFrozen(net, trainable=("fc",))   # frozen BatchNorm stays in eval mode
    >>> count_parameters(model, trainable_only=True)   # 5130 trainable parameters
"""
from __future__ import annotations

import contextlib
import math
import os
import socket

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import count_parameters  # noqa: F401  (used in the chapter as T.count_parameters)

RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",), ("fc",))


class PretrainedWeightsUnavailable(RuntimeError):
    """The pretrained weights are neither in torchvision's cache nor downloadable."""


@contextlib.contextmanager
def _socket_timeout(seconds):
    """torch.hub's download calls urlopen without a timeout; this bounds every socket wait."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def load_resnet18(pretrained: bool = True, *, allow_random: bool | None = None, timeout: float = 10.0):
    """``(ResNet-18, loaded)`` with ImageNet weights from torchvision's cache (``$TORCH_HOME/hub/checkpoints``),
    downloaded on first use (no socket waits longer than ``timeout`` s). If they cannot be had: with
    ``allow_random`` (default: smoke profile only) a loud warning and random weights (``loaded=False``),
    else :class:`PretrainedWeightsUnavailable` saying where torchvision looked and how to fix it.

    Example:
        >>> net, loaded = load_resnet18()
    """
    from torchvision.models import ResNet18_Weights, resnet18

    if not pretrained:
        return resnet18(weights=None), False
    if allow_random is None:
        from ..runtime import profile
        allow_random = profile().name == "smoke"
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        with _socket_timeout(timeout):
            return resnet18(weights=weights), True
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear message
        message = weights_help(weights, err)
        if not allow_random:
            raise PretrainedWeightsUnavailable(message) from None   # the message names the cause
        print("!" * 78 + "\n" + message + "\nCONTINUING FROM RANDOM WEIGHTS (allowed in the smoke profile "
              "only): every 'pretrained' number below is MEANINGLESS.\n" + "!" * 78)
        return resnet18(weights=None), False


def weights_help(weights, err=None) -> str:
    """What failed, where torchvision looked for ``weights`` and how to get them there."""
    hub = torch.hub.get_dir()
    name = os.path.basename(weights.url)
    path = os.path.join(hub, "checkpoints", name)
    home = os.environ.get("TORCH_HOME")
    why = f" ({type(err).__name__}: {str(err)[:200]})" if err is not None else ""
    state = ("exists but could not be read: delete it and run again" if os.path.exists(path)
             else "does not exist, and downloading it failed")
    return (f"Could not load the pretrained weights {weights}{why}.\n"
            f"torchvision looked for {path}: it {state}.\n"
            f"(hub dir {hub}; TORCH_HOME={home or 'not set (default $XDG_CACHE_HOME/torch or ~/.cache/torch)'}; URL {weights.url})\n"
            f"To fix: run this once with internet access (the file is then cached for good), or copy "
            f"{name} from a machine that has it into {os.path.join(hub, 'checkpoints')}/ "
            f"(or set TORCH_HOME to a folder whose hub/checkpoints/ holds it).")


class Preprocess(nn.Module):
    """Resize a batch of [0, 1] images to ``size`` x ``size`` and normalise it, on the model's device. Example:
        >>> prep = Preprocess(64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        >>> prep(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, size: int, mean, std, channels_last: bool = False):
        super().__init__()
        self.size, self.channels_last = int(size), channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class PartlyFrozen(nn.Module):
    """``net`` with every parameter frozen except those under the ``trainable`` submodules.

    Frozen BatchNorm layers (no trainable parameter) stay in eval mode: they use their pretrained running
    statistics and never update them. ``fit`` calls ``model.train()`` every epoch, which would switch them
    back, so ``train()``, the one method every mode change goes through, is overridden.

    Example:
        >>> model = PartlyFrozen(torchvision.models.resnet18(), trainable=("layer4", "fc"))
        >>> model.train().net.bn1.training
        False
    """

    def __init__(self, net: nn.Module, trainable=("fc",)):
        super().__init__()
        self.net, self.trainable = net, tuple(trainable)
        names = dict(net.named_modules())
        missing = [t for t in self.trainable if t not in names]
        if missing:
            raise ValueError(f"no submodule named {missing} in {type(net).__name__}")
        for name, p in net.named_parameters():
            p.requires_grad_(any(name.startswith(t + ".") for t in self.trainable))
        self.train()

    def frozen_norms(self) -> list[nn.Module]:
        return [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and not any(p.requires_grad for p in m.parameters())]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_norms():
            m.eval()
        return self

    def forward(self, x):
        return self.net(x)


def discriminative_groups(net: nn.Module, head_lr: float, decay: float = 0.5, stages=RESNET_STAGES) -> list[dict]:
    """Optimizer parameter groups, one per stage (trainable parameters only, empty stages left out): the head
    gets ``head_lr``, each stage below it ``decay`` times less. Example:
        >>> groups = discriminative_groups(resnet, head_lr=0.01, decay=0.5)   # fc 0.01, layer4 0.005, ...
        >>> optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    """
    groups, n = [], len(stages)
    for i, prefixes in enumerate(stages):
        params = [p for name, p in net.named_parameters() if p.requires_grad and name.split(".")[0] in prefixes]
        if params:
            groups.append({"params": params, "lr": head_lr * decay ** (n - 1 - i), "name": "+".join(prefixes)})
    covered = {id(p) for g in groups for p in g["params"]}
    left = [name for name, p in net.named_parameters() if p.requires_grad and id(p) not in covered]
    if left:
        raise ValueError(f"trainable parameters in no stage: {left[:5]}")
    return groups


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) of ``layer`` for class ``target`` (default: the predicted class).

    With ``A`` the layer's output [N, K, h, w] and ``y`` the target's logit:
    ``cam = ReLU(sum_k alpha_k A_k)`` where ``alpha_k`` is the spatial mean of ``dy/dA_k``.
    A forward hook keeps ``A``, a backward hook on it its gradient. Returns [N, h, w] at the layer's
    resolution. Call ``model.eval()`` first. Example:
        >>> cam = gradcam(model.eval(), model.layer4, images, target=labels)   # [N, 7, 7] at 224 px
    """
    seen = {}

    def forward_hook(module, inputs, output):
        seen["A"] = output
        output.register_hook(lambda grad: seen.__setitem__("dA", grad))

    handle = layer.register_forward_hook(forward_hook)
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            logits = model(x)
            target = logits.argmax(1) if target is None else torch.as_tensor(target, device=logits.device)
            score = logits.gather(1, target.view(-1, 1)).sum()
            torch.autograd.grad(score, x)        # runs the backward hook; leaves every .grad untouched
    finally:
        handle.remove()
    alpha = seen["dA"].mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * seen["A"]).sum(1)).detach()


# ----------------------------------------------------------------------------- training recipe
def smooth_ce(logits, y):
    """Cross-entropy with label smoothing 0.1 (the chapter's loss for every trained network)."""
    return F.cross_entropy(logits, y, label_smoothing=0.1)


def warmup_cosine(total_steps: int):
    """A scheduler factory for ``fit``: linear warm-up over the first tenth of ``total_steps``, then cosine decay.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        >>> sched = warmup_cosine(100)(opt)    # lr 0.01 at step 0, 0.1 at step 9, ~0 at step 100
    """
    warm = max(1, total_steps // 10)
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


def sgd(groups, lr: float):
    """The chapter's optimizer: SGD, Nesterov momentum 0.9, weight decay 5e-4, over parameter ``groups``."""
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def train_head(xtr, ytr, wd: float, steps: int, lr: float = 0.05, n_classes: int | None = None, device=None):
    """A multinomial logistic-regression head on standardised features (full-batch AdamW, L2 penalty ``wd``);
    returns ``predict(features) -> labels`` on the CPU. Seeded: the same call gives the same head.

    Example:
        >>> predict = train_head(torch.randn(40, 8), torch.arange(40) % 4, wd=1e-3, steps=50)
        >>> predict(torch.randn(5, 8)).shape
        torch.Size([5])
    """
    torch.manual_seed(0)
    device = device or xtr.device
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    x, y = ((xtr - mu) / sd).to(device), ytr.to(device)
    head = nn.Linear(x.shape[1], n_classes or int(ytr.max()) + 1).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0)
    for _ in range(steps):
        loss = F.cross_entropy(head(x), y) + wd * head.weight.pow(2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    return lambda f: head(((f - mu) / sd).to(device)).argmax(1).cpu()


def head_acc(predict, features, labels) -> float:
    """Accuracy of a head from :func:`train_head` on ``features``."""
    return float((predict(features) == labels).float().mean())


# ----------------------------------------------------------------------------- sources and targets
def take_classes(images, labels, classes):
    """The examples whose label is in ``classes``, relabelled 0..len(classes)-1 in the order given.

    Returns ``(images, new_labels, positions)``; ``positions`` index the input, so that two subsets can be
    shown to share no image. Example:
        >>> x, y = torch.zeros(6, 3, 2, 2), torch.tensor([0, 3, 5, 3, 0, 1])
        >>> _, new, pos = take_classes(x, y, (3, 5))
        >>> new.tolist(), pos.tolist()
        ([0, 1, 0], [1, 2, 3])
    """
    labels = torch.as_tensor(labels)
    classes = torch.as_tensor(list(classes))
    pos = torch.nonzero(torch.isin(labels, classes)).flatten()
    new = (labels[pos].unsqueeze(1) == classes.unsqueeze(0)).int().argmax(1)
    return images[pos], new, pos


def gray_to_rgb(images, size: int):
    """uint8 grayscale images [N, 1, H, W] (or [N, H, W]) -> uint8 RGB [N, 3, size, size]: resized (bilinear,
    antialiased) and the one channel copied to all three, so an RGB network reads them like colour images.

    Example:
        >>> gray_to_rgb(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 32).shape
        torch.Size([2, 3, 32, 32])
    """
    x = images.unsqueeze(1) if images.ndim == 3 else images
    if x.shape[1] != 1:
        raise ValueError(f"expected one channel, got {x.shape[1]}")
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def split_per_class(labels, n_first: int, seed: int = 0):
    """Split positions into ``n_first`` random examples of every class and the rest (both sorted).

    Example:
        >>> a, b = split_per_class(torch.tensor([0, 0, 0, 1, 1, 1]), 1)
        >>> len(a), len(b), set(a.tolist()) & set(b.tolist())
        (2, 4, set())
    """
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    first = []
    for c in labels.unique():
        pos = torch.nonzero(labels == c).flatten()
        first.append(pos[torch.randperm(len(pos), generator=g)[:n_first]])
    first = torch.cat(first).sort().values
    rest = torch.nonzero(~torch.isin(torch.arange(len(labels)), first)).flatten()
    return first, rest


def pretrain(net: nn.Module, prep: nn.Module, images, labels, val_images, val_labels, *, epochs: int,
             lr: float, batch: int, seed: int = 0, progress: bool = False):
    """Supervised pretraining of ``net`` (its ``fc`` sized for the source's classes) on uint8 images with the
    chapter's recipe (SGD with Nesterov momentum, label smoothing, warm-up then cosine decay, random crop
    and flip per image). Returns the :class:`~ptcourse.history.History`; ``history["val_acc"]`` is the
    source validation accuracy after each epoch, the evidence that pretraining learned something.

    Example:
        >>> net = torchvision.models.resnet18(num_classes=5)
        >>> h = pretrain(net, prep, x_src, y_src, x_val, y_val, epochs=4, lr=0.05, batch=128)
        >>> h["val_acc"][-1]      # well above 1/5 if the source task was learned
    """
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from ..data import ImageDataset
    from ..loop import fit
    from ..metrics import accuracy
    from ..runtime import seed_everything

    augment = v2.Compose([v2.RandomCrop(images.shape[-1], padding=4, padding_mode="reflect"),
                          v2.RandomHorizontalFlip()])
    names = [str(c) for c in range(int(labels.max()) + 1)]
    seed_everything(seed)
    train = DataLoader(ImageDataset(images, labels, names, transform=augment), batch_size=batch, shuffle=True)
    val = DataLoader(ImageDataset(val_images, val_labels, names), batch_size=256)
    model = nn.Sequential(prep, net)
    return fit(model, train, epochs=epochs, optimizer=sgd(net.parameters(), lr), loss_fn=smooth_ce,
               scheduler=warmup_cosine(epochs * len(train)), val_loader=val, metrics={"acc": accuracy},
               progress=progress)


def reestimate_batchnorm(model: nn.Module, images, batch: int = 128) -> nn.Module:
    """Replace every BatchNorm layer's running statistics by those of ``images`` (AdaBN, Li et al. 2016).

    The source's statistics describe the source's images; on other images a layer's inputs can have another
    mean and scale. PyTorch's ``torch.optim.swa_utils.update_bn`` does exactly this re-estimation: it resets
    each layer's running mean and variance, runs the images through the model in train mode with
    ``momentum=None`` (an exact cumulative average over the batches, not an exponential one) and restores
    each layer's momentum. The model is returned in eval mode, ready to extract features. No parameter
    changes, and no label is used. Example:
        >>> reestimate_bn = reestimate_batchnorm(nn.Sequential(prep, backbone), target_images)
    """
    from torch.optim.swa_utils import update_bn

    device = next(model.parameters()).device
    update_bn((images[i:i + batch] for i in range(0, len(images), batch)), model, device)
    return model.eval()


# ----------------------------------------------------------------------------- notebook cells run on a condition
def run_if(line: str, cell: str, shell) -> bool:
    """The ``%%run_if FLAG`` cell magic: run the cell only when the expression ``FLAG`` is true in the notebook.

    A skipped cell prints one line naming the flag, so a reader sees which cells did not run and why; a
    cell that runs behaves as without the magic (its errors are raised), except that the value of its last
    expression is not displayed: end such a cell with ``print(...)`` or ``display(...)``, and figures
    show as usual. Returns whether the cell ran.
    Load it with ``%load_ext ptcourse.chapters.resnet_transfer``. Example (a notebook cell)::

        %%run_if IMAGENET
        net, loaded = load_resnet18()
    """
    flag = line.strip()
    if not flag:
        raise ValueError("%%run_if needs a condition, e.g. %%run_if IMAGENET")
    if not eval(flag, shell.user_ns):  # noqa: S307 - an expression the notebook's author wrote
        print(f"(skipped: {flag} is False)")
        return False
    code = shell.transform_cell(cell)                  # IPython syntax (%magics) inside the cell still works
    cache = getattr(getattr(shell, "compile", None), "cache", None)
    filename = cache(code) if cache else "<run_if cell>"   # IPython keeps the source so tracebacks show it
    exec(compile(code, filename, "exec"), shell.user_ns)  # noqa: S102 - the notebook's own cell
    return True


def load_ipython_extension(ipython):
    """Registers :func:`run_if` as the cell magic ``%%run_if``."""
    ipython.register_magic_function(lambda line, cell: run_if(line, cell, ipython) and None,
                                    magic_kind="cell", magic_name="run_if")
