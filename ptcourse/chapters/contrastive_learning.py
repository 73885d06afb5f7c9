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


# ----------------------------------------------------------------------------- the chapter's small models
def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def small_cnn(widths=(24, 48, 96, 192)) -> tuple[nn.Module, int]:
    """A 4-layer CNN encoder for 32x32 images: 32 -> 16 -> 8 -> 4 pixels, then global average pooling.

    Returns ``(encoder, feature_size)``; ``encoder`` maps [B, 3, 32, 32] to [B, widths[-1]].

    Example:
        >>> enc, dim = small_cnn(); enc(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 192])
    """
    w = widths
    enc = nn.Sequential(conv_block(3, w[0]), nn.MaxPool2d(2), conv_block(w[0], w[1]), nn.MaxPool2d(2),
                        conv_block(w[1], w[2]), nn.MaxPool2d(2), conv_block(w[2], w[3]),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return enc, w[3]


class SimCLRNet(nn.Module):
    """An encoder followed by SimCLR's projection head (Linear, ReLU, Linear); ``forward`` returns z."""

    def __init__(self, encoder: nn.Module, dim: int, proj_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def forward(self, x):
        return self.head(self.encoder(x))


class ConvAutoencoder(nn.Module):
    """Chapter 01's autoencoder for colour images: the given encoder, and a decoder back to 32x32.

    The decoder maps the feature vector to a 4x4 map and upsamples it three times (nearest
    neighbour + 3x3 convolution); a sigmoid gives pixels in [0, 1]. Its default widths are half
    the encoder's, which makes it cost about as many multiply-adds per image as :func:`small_cnn`
    (the decoder works at the higher resolutions), so one autoencoder epoch (one image through
    encoder and decoder) costs about what one SimCLR epoch (two views through the encoder) does.

    Example:
        >>> enc, dim = small_cnn(); ae = ConvAutoencoder(enc, dim)
        >>> ae(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, encoder: nn.Module, dim: int, widths=(12, 24, 48, 96)):
        super().__init__()
        w = widths
        self.encoder = encoder
        self.fc = nn.Linear(dim, w[3] * 16)
        self.c = w[3]
        up = lambda a, b: [nn.Upsample(scale_factor=2), conv_block(a, b)]  # noqa: E731
        self.decoder = nn.Sequential(*up(w[3], w[2]), *up(w[2], w[1]), *up(w[1], w[0]),
                                     nn.Conv2d(w[0], 3, 3, padding=1), nn.Sigmoid())

    def forward(self, x):
        h = self.fc(self.encoder(x)).view(len(x), self.c, 4, 4)
        return self.decoder(h)


# ----------------------------------------------------------------------------- label budgets and evaluation
def label_splits(labels, val_per_class: int, budgets, seeds, val_seed: int = 1000):
    """Carve a validation set and seeded labelled subsets out of one labelled training split.

    Returns ``(val_idx, labelled)`` where ``labelled[(budget, seed)]`` holds ``budget`` indices per
    class, drawn with ``seed`` from the images NOT in the validation set (so validation never
    overlaps the labels a model trains on). The test split stays untouched.

    Example:
        >>> y = np.repeat(np.arange(3), 20)
        >>> val, lab = label_splits(y, 5, budgets=[2, 4], seeds=[0, 1])
        >>> len(val), len(lab[(4, 1)]), set(val) & set(lab[(4, 1)])
        (15, 12, set())
    """
    import numpy as np
    from ..data import balanced_indices
    labels = np.asarray(labels)
    val_idx = balanced_indices(labels, val_per_class, seed=val_seed)
    pool = np.setdiff1d(np.arange(len(labels)), val_idx)
    labelled = {(b, s): pool[balanced_indices(labels[pool], b, seed=s)] for b in budgets for s in seeds}
    return val_idx, labelled


def probe_search(name: str, Cs, draws: dict, val, *, search_kw=None):
    """Choose a linear probe's ``C`` by the mean validation accuracy over every labelled draw.

    ``draws`` maps a seed to ``(features, labels)`` of that seed's labelled subset; ``val`` is the
    ``(features, labels)`` pair of the validation set. Each value of ``Cs`` is fitted on every draw
    (``trials_per_value = len(draws)``), so the choice does not rest on one draw's luck; the probes
    are kept, so the caller scores the chosen ``C``'s probes on the test split once, afterwards.
    ``search_kw`` goes to :func:`ptcourse.compare.search` (``extend``, ``max_extend``, ``edge_reason``).

    Returns ``(search, probes)``: the :class:`~ptcourse.compare.Search` and ``{seed: fitted probe}``
    at the chosen ``C``.

    Example:
        >>> s, fitted = probe_search("C SimCLR @ 5 labels", [0.01, 0.1, 1.0], draws, (f_val, y_val))
        >>> test = [(fitted[seed].predict(f_test) == y_test).mean() for seed in draws]
    """
    import numpy as np
    from ..compare import search
    from ..probes import fit_logistic_probe
    fv, yv = np.asarray(val[0], dtype=np.float64), np.asarray(val[1])
    fitted = {}

    def score(c):
        fitted[c] = {seed: fit_logistic_probe(x, y, c, seed=seed) for seed, (x, y) in draws.items()}
        return float(np.mean([(p.predict(fv) == yv).mean() for p in fitted[c].values()]))

    s = search(name, list(Cs), score, trials_per_value=len(draws), **(search_kw or {}))
    return s, fitted[s.chosen]


def lr_then_steps_search(label: str, lrs, steps, run, *, search_kw=None):
    """Choose a classifier's learning rate, then its number of steps, each by a validation search.

    ``run(lr, steps) -> (validation score, trained model)`` trains once. First the learning rate is
    searched over ``lrs`` at the middle value of ``steps``; then the step count is searched over
    ``steps`` at the chosen rate (the middle value's run is reused, not trained again). Both go
    through :func:`ptcourse.compare.search` with ``search_kw`` (a choice at a grid's end extends it).
    Scratch and fine-tuning get exactly this search, so the same number of trials.

    Returns ``(lr_search, steps_search, model)``, the model being the run at the chosen pair.

    Example:
        >>> s_lr, s_n, net = lr_then_steps_search("scratch @ 20 labels", [5e-4, 1e-3, 2e-3], [100, 200, 400],
        ...                                       lambda lr, n: train_and_score(lr, n))
    """
    from ..compare import search
    done = {}

    def score(lr, n):
        if (lr, n) not in done:
            done[(lr, n)] = run(lr, n)
        return done[(lr, n)][0]

    mid = list(steps)[len(steps) // 2]
    s_lr = search(f"lr {label}", list(lrs), lambda lr: score(lr, mid), **(search_kw or {}))
    s_n = search(f"steps {label}", list(steps), lambda n: score(s_lr.chosen, n), **(search_kw or {}))
    return s_lr, s_n, done[(s_lr.chosen, s_n.chosen)][1]


def train_classifier(encoder: nn.Module, dim: int, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int,
                     batch: int = 64, augment=None, seed: int = 0, device=None, num_classes: int = 10) -> nn.Module:
    """Train ``copy(encoder) + Linear(dim, classes)`` end to end for exactly ``steps`` steps.

    Used for both the from-scratch baseline (a freshly initialised encoder) and fine-tuning (a
    pretrained one), so both get the same optimiser (AdamW, weight decay 5e-4, one-cycle LR),
    steps, batch and augmentation. Batches are drawn with replacement, so small label budgets
    get as many steps as large ones. ``x`` holds float images in [0, 1].

    Example:
        >>> net = train_classifier(small_cnn()[0], 192, x, y, lr=1e-3, steps=200)
    """
    import copy
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset
    from ..loop import fit
    from ..runtime import seed_everything
    seed_everything(seed)
    net = nn.Sequential(copy.deepcopy(encoder), nn.Linear(dim, num_classes)).to(memory_format=torch.channels_last)
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=batch,
                        sampler=RandomSampler(data, replacement=True, num_samples=steps * batch))

    def step(model, b):
        xb, yb = b
        if augment is not None:
            xb = augment(xb)
        return F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), yb)

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, pct_start=0.1, total_steps=steps)  # noqa: E731
    fit(net, loader, epochs=1, step_fn=step, optimizer=opt, scheduler=sched, device=device, progress=False)
    return net


@torch.no_grad()
def classifier_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, device=None, batch: int = 500) -> float:
    """Accuracy of ``net`` (eval mode) on float images ``x`` with labels ``y``."""
    from ..runtime import best_device
    device = torch.device(device) if device is not None else best_device()
    was = net.training
    net.eval().to(device)
    hits = sum(int((net(x[i:i + batch].to(device).contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
                    == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    net.train(was)
    return hits / len(x)


def interleaved_timings(fns: dict, repeats: int = 5) -> dict:
    """Time each function ``repeats`` times, round-robin (A, B, A, B, ...), so that a change in the
    machine's load hits all of them alike. Returns ``{name: [seconds, ...]}``.

    Example:
        >>> t = interleaved_timings({"a": lambda: sum(range(10**5)), "b": lambda: sorted(range(10**5))}, 3)
        >>> sorted(t), len(t["a"])
        (['a', 'b'], 3)
    """
    import time
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out
