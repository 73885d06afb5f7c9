"""Chapter 05 helpers: per-image augmentation, and measuring and shrinking a model for deployment.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    >>> count_parameters(model)
    7850
    >>> size_kb(model) > 30                              # 7,850 float32 weights = 31.4 kB + header
    True
    >>> ms = latency_ms(model, torch.rand(1, 1, 28, 28))  # median CPU time per image
    >>> small = quantize_int8(model, torch.rand(256, 1, 28, 28))   # int8 weights and activations

Quantization is written out here in plain PyTorch (:func:`quantize_int8`): int8 weights with one
scale per output channel, int8 layer inputs with one scale per layer from calibration images, and
integer products summed exactly. It uses neither the deprecated ``torch.ao.quantization`` nor any
native quantized kernel, so it runs the same on every CPU and GPU; it stores weights in a quarter of
the bytes (the file shrinks by less: names, scales and biases stay), and is not faster (speed needs
int8 kernels: ``torchao``, ONNX Runtime, ExecuTorch).

:func:`load_teacher` reads the teacher chapter 04 saves, and refuses one trained in another run
profile or below the accuracy this chapter's prose assumes. :func:`search_axes` chooses several
hyperparameters on validation one after the other, each with :func:`ptcourse.compare.search`, and
:func:`extend_fraction` extends a grid of fractions (such as the distillation weight α) past its edge.
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import nn

from .. import compare
from ..metrics import count_parameters  # noqa: F401  (the chapter imports it from here)

__all__ = ["random_translate", "count_parameters", "size_kb", "latency_ms", "fold_batchnorm",
           "quantize_weight", "Int8Conv2d", "Int8Linear", "quantize_int8", "TeacherRefused", "load_teacher", "search_axes", "extend_fraction"]


# --------------------------------------------------------------------------- choosing on validation
def search_axes(name: str, axes: dict, score, start: dict, *, extend: dict | None = None,
                **search_kw) -> tuple[dict, list]:
    """Choose several hyperparameters on validation, one axis after the other, each with ``compare.search``.

    A coordinate search: the first axis is searched with every other axis at its ``start`` value, the
    next one at the first axis's choice, and so on, once. Every search is named ``"<axis> <name>"``
    (``"lr scratch (MNIST)"``), so that it can go into the chapter's record beside the others. A
    setting scored before (the start value reappearing in a later axis's grid) is not trained again.

    Args:
        name: the condition being tuned, e.g. ``"scratch (MNIST)"``.
        axes: ``{axis: grid}``, searched in this order.
        score: ``score(**setting) -> validation score`` for a full setting (every axis of ``start``).
        start: a value for every axis, used until that axis has been searched.
        extend: ``{axis: rule}``, the ``extend`` of that axis's search (``"geometric"``, a function, ...);
            an axis not named is not extended.
        **search_kw: passed on to every search (``max_extend``, ``edge_reason``, ``bound_reason``,
            ``trials_per_value``). A choice at an end of an axis's range (its ``extend`` rule returns
            ``None`` there, as :func:`extend_fraction` does at 0 and 1) records that, not ``edge_reason``.

    Returns:
        ``(chosen setting, [Search, ...])`` in the order of ``axes``.

    Example:
        >>> acc = lambda lr, wd: 1 - (lr - 0.01) ** 2 - (wd - 0.1) ** 2
        >>> chosen, done = search_axes("toy", {"lr": [0.003, 0.01, 0.03], "wd": [0.01, 0.1, 1.0]}, acc,
        ...                            {"lr": 0.003, "wd": 0.01})
        >>> chosen, [s.name for s in done]
        ({'lr': 0.01, 'wd': 0.1}, ['lr toy', 'wd toy'])
    """
    setting, done, seen = dict(start), [], {}
    missing = set(axes) - set(start)
    if missing:
        raise ValueError(f"search_axes({name!r}): no start value for {sorted(missing)}.")

    def scored(axis, value):
        trial = {**setting, axis: value}
        key = tuple(sorted((k, repr(v)) for k, v in trial.items()))
        if key not in seen:
            seen[key] = score(**trial)
        return seen[key]

    for axis, grid in axes.items():
        s = compare.search(f"{axis} {name}", grid, lambda v: scored(axis, v),
                           extend=(extend or {}).get(axis), **search_kw)
        setting[axis] = s.chosen
        done.append(s)
    return setting, done


def extend_fraction(grid: list, side: str) -> float | None:
    """The next value beyond an end of an ascending grid of fractions in [0, 1], at the grid's own step.

    The extension rule for :func:`ptcourse.compare.search` (``extend=extend_fraction``) on a weight such
    as the distillation loss's α: the step is clipped at 0 and 1, and there is nothing beyond them.

    Example:
        >>> extend_fraction([0.5, 0.7, 0.9], "high"), extend_fraction([0.5, 0.7, 0.9], "low")
        (1.0, 0.3)
        >>> extend_fraction([0.6, 0.8, 1.0], "high") is None     # a choice of 1.0 stays: the end of the range
        True
    """
    a, b = (grid[0], grid[1]) if side == "low" else (grid[-1], grid[-2])
    if a in (0.0, 1.0):
        return None
    return round(min(1.0, max(0.0, a + (a - b))), 6)


# the edge reason compare.search records for a choice at 0 or 1: the end of the range, not of the budget
extend_fraction.bound_reason = "the end of a weight's range [0, 1]: there is nothing beyond it"


# --------------------------------------------------------------------------- the saved teacher
class TeacherRefused(ValueError):
    """A saved teacher this chapter will not distil from; the message says why and what to do."""


def load_teacher(path, profile: str, min_accuracy: float) -> dict:
    """The checkpoint of the teacher chapter 04 saved at ``path``, if it suits this run.

    Chapter 04 saves its fine-tuned ResNet-18 with the run profile it was trained in and its
    validation accuracy. A teacher from another profile (a 1-epoch smoke run, say) or below
    ``min_accuracy`` would make this chapter's experiments, and its prose, about a different
    teacher: it is refused with :class:`TeacherRefused`, and the chapter trains its own.

    Example:
        >>> try:
        ...     ck = load_teacher(saved, "cpu", min_accuracy=0.8)
        ... except TeacherRefused as why:
        ...     print(why)          # and train a teacher here
    """
    from ..files import load
    ck = load(path)
    made_in, acc = ck.get("profile"), ck.get("val_acc")
    if made_in != profile:
        raise TeacherRefused(
            f"{path} holds a teacher trained in the {made_in or 'unrecorded'} profile, and this run uses the "
            f"{profile} profile: its accuracy would say nothing about this chapter's experiments. Run chapter "
            f"04 in the {profile} profile to replace it, or delete the file.")
    if acc is None or acc < min_accuracy:
        shown = "no recorded validation accuracy" if acc is None else f"validation accuracy {acc:.3f}"
        raise TeacherRefused(
            f"{path} holds a teacher with {shown}, below the {min_accuracy:.2f} this chapter needs of a "
            f"teacher (a weak teacher has little to teach). Run chapter 04 again, or delete the file.")
    return ck


# --------------------------------------------------------------------------- augmentation
def random_translate(x: torch.Tensor, pixels: int, flip: bool = False, mode: str = "constant",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image of a batch ``x`` [B, C, H, W] by its own random offset of up to ``pixels``.

    Pads by ``pixels`` (``mode``: ``"constant"`` zeros, or ``"reflect"``) and crops a random
    H x W window per image; ``flip=True`` also mirrors each image left-right with probability 1/2.
    One draw per image, not per batch: a batch-wide draw moves every image the same way, which
    is far less augmentation than it looks.

    Example:
        >>> random_translate(torch.rand(64, 1, 28, 28), 2).shape
        torch.Size([64, 1, 28, 28])
    """
    n, c, h, w = x.shape
    if pixels <= 0 and not flip:
        return x
    padded = F.pad(x, (pixels,) * 4, mode=mode) if pixels > 0 else x
    dev = x.device
    i = torch.randint(0, 2 * pixels + 1, (n,), generator=generator).to(dev)
    j = torch.randint(0, 2 * pixels + 1, (n,), generator=generator).to(dev)
    rows = (i[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(n, c, h, w + 2 * pixels)
    out = padded.gather(2, rows)
    cols = (j[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(dev)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out


# --------------------------------------------------------------------------- measuring
def size_kb(model: torch.nn.Module) -> float:
    """Size on disk of ``torch.save(model.state_dict())`` in kilobytes (1 kB = 1000 bytes).

    Works for int8 models too (their int8 weights are buffers in the state dict).

    Example:
        >>> 4004 < size_kb(torch.nn.Linear(1000, 1000)) < 4010    # 1,001,000 float32 numbers
        True
    """
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path) / 1000
    finally:
        os.remove(path)


def latency_ms(model: torch.nn.Module, example: torch.Tensor, num_threads: int | None = None,
               min_run_time: float = 0.5) -> float:
    """Median CPU time of one forward pass, per image, in milliseconds (``torch.utils.benchmark``).

    The model runs in eval mode under ``torch.inference_mode()``. ``num_threads=None`` (the
    default) times it on the threads torch already uses (``torch.get_num_threads()``) and changes
    no thread setting; pass a number to time on that many threads. ``example`` is a batch
    [B, ...]; with B = 1 this is the latency of one request, with a larger B the time per image of
    batched inference. The benchmark warms up and repeats the call until ``min_run_time`` seconds
    have passed, and reports the median (robust to a busy machine).

    Example:
        >>> latency_ms(torch.nn.Linear(10, 2), torch.rand(1, 10)) < 1.0
        True
    """
    was_training = model.training
    model.eval()
    threads = torch.get_num_threads() if num_threads is None else num_threads
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": example.cpu()}, num_threads=threads)
    with torch.inference_mode():
        m = timer.blocked_autorange(min_run_time=min_run_time)
    model.train(was_training)
    return m.median * 1000 / len(example)


# --------------------------------------------------------------------------- int8, by hand
def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` (eval mode) in which every ``Conv2d`` directly followed by a
    ``BatchNorm2d`` becomes one ``Conv2d``: eval-mode batch norm is the affine map
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, so it can be multiplied into the
    convolution's weights and bias. The outputs are the same (up to float rounding).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> [type(m).__name__ for m in fold_batchnorm(net)]
        ['Conv2d', 'ReLU']
    """
    layers = [copy.deepcopy(m) for m in model]
    out, i = [], 0
    while i < len(layers):
        m = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            with torch.no_grad():
                factor = nxt.weight / torch.sqrt(nxt.running_var + nxt.eps)
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                 m.dilation, m.groups, bias=True)
                conv.weight.copy_(m.weight * factor.view(-1, 1, 1, 1))
                bias = m.bias if m.bias is not None else torch.zeros_like(nxt.running_mean)
                conv.bias.copy_((bias - nxt.running_mean) * factor + nxt.bias)
            out.append(conv)
            i += 2
        else:
            out.append(m)
            i += 1
    return nn.Sequential(*out).eval()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per output channel (row 0 of ``w``).

    Returns ``(q, scale)`` with ``q`` int8 in [-127, 127] and ``w ≈ q * scale`` (the error of each
    weight is at most ``scale / 2``).

    Example:
        >>> w = torch.tensor([[0.5, -1.0], [0.01, 0.02]])
        >>> q, s = quantize_weight(w)
        >>> q.dtype, q[:, 1].tolist(), bool(((q * s[:, None] - w).abs() <= s[:, None] / 2).all())
        (torch.int8, [-127, 127], True)
    """
    scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / 127
    q = torch.round(w.detach() / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8)
    return q, scale


class _Int8Layer(nn.Module):
    """Shared part of :class:`Int8Conv2d` and :class:`Int8Linear`: int8 weights, one input scale."""

    def __init__(self, layer: nn.Module, input_scale: float):
        super().__init__()
        q, scale = quantize_weight(layer.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale.float())
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(q.shape[0])
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        fan_in = q[0].numel()
        # int8 x int8 products are at most 127^2; float32 adds integers exactly below 2^24
        self.exact_dtype = torch.float32 if fan_in * 127 * 127 < 2 ** 24 else torch.float64

    def quantize_input(self, x):
        """The input as int8 values (kept in a float tensor): round(x / scale), clipped to [-127, 127]."""
        return torch.round(x / self.input_scale).clamp(-127, 127)

    def forward(self, x):
        xq = self.quantize_input(x).to(self.exact_dtype)
        acc = self._integer_op(xq, self.weight_int8.to(self.exact_dtype))   # exact integer sums
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        return (acc * (self.input_scale * self.weight_scale).view(shape)).to(x.dtype) + self.bias.view(shape)


class Int8Conv2d(_Int8Layer):
    """A ``Conv2d`` that computes with int8 weights and int8 inputs (integer sums, then one rescale)."""

    def __init__(self, conv: nn.Conv2d, input_scale: float):
        super().__init__(conv, input_scale)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def _integer_op(self, xq, wq):
        return F.conv2d(xq, wq, None, self.stride, self.padding, self.dilation, self.groups)


class Int8Linear(_Int8Layer):
    """A ``Linear`` layer that computes with int8 weights and int8 inputs."""

    def _integer_op(self, xq, wq):
        return F.linear(xq, wq)


def quantize_int8(model: nn.Sequential, calibration: torch.Tensor, batch_size: int = 256) -> nn.Sequential:
    """Post-training int8 quantization of a ``nn.Sequential`` CNN/MLP, written out by hand.

    1. batch norm is folded into the convolutions (:func:`fold_batchnorm`);
    2. the ``calibration`` images (a few hundred typical inputs) run through the float model and
       the largest absolute input of every ``Conv2d`` / ``Linear`` sets its input scale
       (``max|x| / 127``);
    3. each such layer becomes an :class:`Int8Conv2d` / :class:`Int8Linear`: int8 weights with a
       scale per output channel, its input rounded to int8, the products summed exactly as
       integers, and the sum rescaled to float (where ReLU and pooling run, unchanged).

    Returns a CPU model in eval mode whose weights take a quarter of the bytes; the saved file
    shrinks by less, as names, scales and biases stay (chapter 05 prints the measured ratio).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()).eval()
        >>> q = quantize_int8(net, torch.rand(32, 3, 8, 8))
        >>> q(torch.rand(1, 3, 8, 8)).shape
        torch.Size([1, 288])
    """
    folded = fold_batchnorm(copy.deepcopy(model).cpu().eval())
    targets = [i for i, m in enumerate(folded) if isinstance(m, (nn.Conv2d, nn.Linear))]
    largest = {i: 0.0 for i in targets}

    def recorder(i):
        def hook(module, inputs):
            largest[i] = max(largest[i], float(inputs[0].detach().abs().max()))
        return hook

    handles = [folded[i].register_forward_pre_hook(recorder(i)) for i in targets]
    try:
        with torch.no_grad():
            for k in range(0, len(calibration), batch_size):
                folded(calibration[k:k + batch_size].cpu())
    finally:
        for h in handles:
            h.remove()
    layers = list(folded)
    for i in targets:
        scale = max(largest[i], 1e-8) / 127
        layers[i] = Int8Conv2d(layers[i], scale) if isinstance(layers[i], nn.Conv2d) else Int8Linear(layers[i], scale)
    return nn.Sequential(*layers).eval()
