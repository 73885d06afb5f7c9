"""SimCLR augmentation for a whole batch at once, with independent randomness per image.

A ``torchvision.transforms.v2`` transform given a batched tensor [B, C, H, W] draws ONE set of
random parameters and applies it to every image. Contrastive learning needs a different crop,
flip and colour change for every image, so :class:`BatchAugment` draws per-image parameters
and applies them with tensor operations (an affine grid for crop + flip, per-image factors for
colour). It runs on whatever device the batch is on, e.g. the GPU.

Example:
    >>> aug = BatchAugment()                          # SimCLR's CIFAR recipe
    >>> x = torch.rand(256, 3, 32, 32)                # or uint8 images
    >>> v1, v2 = two_views(x, aug)                    # two independent views of every image
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def simclr_transform(size: int = 32, scale=(0.2, 1.0), strength: float = 0.5):
    """The same recipe as a per-image ``transforms.v2`` pipeline (for a Dataset / DataLoader).

    Example:
        >>> t = simclr_transform(32); view = t(torch.rand(3, 32, 32))
    """
    from torchvision.transforms import v2
    s = strength
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                       v2.RandomGrayscale(p=0.2)])


def _gray(x):
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


class BatchAugment(nn.Module):
    """Random resized crop, horizontal flip, colour jitter and grayscale, drawn per image.

    Colour jitter applies brightness, contrast, saturation and hue in that fixed order (v2 uses
    a random order); hue is a rotation of the chroma plane in YIQ space, a close and cheap
    stand-in for a shift of the HSV hue. ``strength`` scales the jitter as in SimCLR
    (0.5 for CIFAR). Crop and flip alone: ``BatchAugment(jitter_p=0, gray_p=0)``.

    Example:
        >>> aug = BatchAugment(size=32).to("cuda")
        >>> views = aug(images_uint8.cuda())          # float [B, 3, 32, 32] in [0, 1]
    """

    def __init__(self, size: int = 32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
                 strength: float = 0.5, jitter_p: float = 0.8, gray_p: float = 0.2):
        super().__init__()
        self.size, self.scale, self.ratio, self.flip_p = size, scale, ratio, flip_p
        s = strength
        self.jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)   # brightness, contrast, saturation, hue
        self.jitter_p, self.gray_p = jitter_p, gray_p

    def crop_params(self, b, device):
        """Per-image affine matrices [b, 2, 3] for a random resized crop and flip."""
        u = lambda: torch.rand(b, device=device)  # noqa: E731
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u()
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u())
        w = torch.sqrt(area * ratio).clamp(max=1.0)           # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (2 * u() - 1) * (1 - w)                          # crop centre, in [-1, 1] coordinates
        cy = (2 * u() - 1) * (1 - h)
        flip = torch.where(u() < self.flip_p, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        return theta

    def colour(self, x):
        b = x.shape[0]
        f = lambda amount: 1 + amount * (2 * torch.rand(b, 1, 1, 1, device=x.device) - 1)  # noqa: E731
        bri, con, sat, hue = self.jitter
        y = (x * f(bri)).clamp(0, 1)
        mean = _gray(y).mean(dim=(2, 3), keepdim=True)
        y = ((y - mean) * f(con) + mean).clamp(0, 1)
        g = _gray(y)
        y = ((y - g) * f(sat) + g).clamp(0, 1)
        # hue: rotate the (I, Q) chroma plane by a per-image angle 2*pi*h, h in [-hue, hue]
        angle = 2 * math.pi * hue * (2 * torch.rand(b, device=x.device) - 1)
        rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                               device=x.device, dtype=x.dtype)
        c, s = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s, s, c
        m = torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq                      # [b, 3, 3]
        return torch.einsum("bij,bjhw->bihw", m, y).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch [B, 3, H, W] (uint8 or float in [0, 1]); returns float views in [0, 1]."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        b = x.shape[0]
        grid = F.affine_grid(self.crop_params(b, x.device), [b, x.shape[1], self.size, self.size],
                             align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.jitter_p > 0:
            keep = torch.rand(b, 1, 1, 1, device=x.device) < self.jitter_p
            x = torch.where(keep, self.colour(x), x)
        if self.gray_p > 0:
            gray = torch.rand(b, 1, 1, 1, device=x.device) < self.gray_p
            x = torch.where(gray, _gray(x).expand_as(x), x)
        return x


def two_views(x: torch.Tensor, augment) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of every image in the batch ``x``.

    Example:
        >>> v1, v2 = two_views(torch.rand(8, 3, 32, 32), BatchAugment())
    """
    return augment(x), augment(x)


def cifar_resnet18() -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 images: a 3x3 stride-1 stem, no max-pool, no classifier.

    Returns an encoder mapping [B, 3, 32, 32] to [B, 512] features (11.2M parameters).

    Example:
        >>> cifar_resnet18()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 512])
    """
    from torchvision.models import resnet18
    net = resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net
