"""Transfer learning with a torchvision ResNet: pretrained weights, freezing, LR groups, Grad-CAM.

Example:
    >>> net, pretrained = load_resnet18()            # ImageNet weights via torchvision's cache
    >>> net.fc = torch.nn.Linear(512, 10)
    >>> model = PartlyFrozen(net, trainable=("fc",))   # frozen BatchNorm stays in eval mode
    >>> count_parameters(model, trainable_only=True)   # 5130 trainable parameters
"""
from __future__ import annotations

import contextlib
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
