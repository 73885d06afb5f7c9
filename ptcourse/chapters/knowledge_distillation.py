"""Measuring and shrinking a model for deployment: parameters, size on disk, CPU latency, int8.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    >>> count_parameters(model)
    7850
    >>> size_kb(model) > 30                              # 7,850 float32 weights = 31.4 kB + header
    True
    >>> ms = latency_ms(model, torch.rand(1, 1, 28, 28))  # median CPU time per image
    >>> small = quantize_dynamic(model)                    # int8 weights for the Linear layers

Quantization uses PyTorch's own ``torch.ao.quantization`` (eager mode, dynamic and static). In torch
2.x it prints deprecation warnings pointing to the ``torchao`` package, its successor; the
helpers here silence those warnings (the functions still work in the installed torch).
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings

import torch
import torch.utils.benchmark as benchmark


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (quantized modules keep theirs as packed buffers: see :func:`size_kb`).

    Example:
        >>> count_parameters(torch.nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def size_kb(model: torch.nn.Module) -> float:
    """Size on disk of ``torch.save(model.state_dict())`` in kilobytes (1 kB = 1000 bytes).

    Works for quantized models too (their int8 weights are in the state dict).

    Example:
        >>> round(size_kb(torch.nn.Linear(1000, 1000)))      # 1,001,000 float32 numbers
        4005
    """
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path) / 1000
    finally:
        os.remove(path)


def latency_ms(model: torch.nn.Module, example: torch.Tensor, num_threads: int = 1,
               min_run_time: float = 0.5) -> float:
    """Median CPU time of one forward pass, per image, in milliseconds (``torch.utils.benchmark``).

    The model runs in eval mode under ``torch.inference_mode()``, on ``num_threads`` CPU threads
    (1 by default: a phone or a busy server core; the comparison between models is what matters).
    ``example`` is a batch [B, ...]; with B = 1 this is the latency of one request, with a larger B
    the time per image of batched inference. The benchmark warms up and repeats the call until
    ``min_run_time`` seconds have passed, and reports the median (robust to a busy machine).

    Example:
        >>> latency_ms(torch.nn.Linear(10, 2), torch.rand(1, 10)) < 1.0
        True
    """
    was_training = model.training
    model.eval()
    timer = benchmark.Timer(stmt="model(x)", setup="", globals={"model": model, "x": example.cpu()},
                            num_threads=num_threads)
    with torch.inference_mode():
        m = timer.blocked_autorange(min_run_time=min_run_time)
    model.train(was_training)
    return m.median * 1000 / len(example)


def quantize_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers have int8 weights (activations quantized on the fly).

    Good for Linear/LSTM-heavy models (MLPs, transformers' feed-forward blocks); convolutions stay
    float32. No calibration data needed. CPU only.

    Example:
        >>> q = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(64, 64)))
        >>> type(q[0]).__name__
        'Linear'
    """
    from torch.ao.quantization import quantize_dynamic as _qd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _qd(copy.deepcopy(model).cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)


def quantize_static(model: torch.nn.Sequential, calibration: torch.Tensor, backend: str = "x86",
                    batch_size: int = 256) -> torch.nn.Sequential:
    """A copy of a ``nn.Sequential`` model with int8 weights AND activations (eager mode, post-training).

    Conv + BatchNorm + ReLU (and Conv + ReLU, Linear + ReLU) are fused into one layer; the model
    is wrapped between ``QuantStub`` (float -> int8) and ``DeQuantStub`` (int8 -> float); observers
    record the range of every activation while the ``calibration`` images (a few hundred typical
    inputs) run through it; ``convert`` then swaps in int8 kernels (``backend``: ``x86``, or
    ``qnnpack`` on ARM). Convolutions, pooling, flatten and linear layers are supported. (FX graph
    mode, ``torch.ao.quantization.quantize_fx``, handles any traceable model but imports sympy
    and friends on first use, which takes many seconds.)

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten())
        >>> q = quantize_static(net, torch.rand(32, 3, 8, 8))
        >>> q(torch.rand(1, 3, 8, 8)).shape
        torch.Size([1, 288])
    """
    import torch.ao.quantization as tq

    nn = torch.nn
    torch.backends.quantized.engine = backend
    layers = list(copy.deepcopy(model).cpu().eval())
    groups, i = [], 0
    while i < len(layers):  # indices of fusable runs: conv-bn-relu, conv-bn, conv-relu, linear-relu
        kinds = [type(m) for m in layers[i:i + 3]]
        if kinds[:3] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
            groups.append([i, i + 1, i + 2]); i += 3
        elif kinds[:2] in ([nn.Conv2d, nn.BatchNorm2d], [nn.Conv2d, nn.ReLU], [nn.Linear, nn.ReLU]):
            groups.append([i, i + 1]); i += 2
        else:
            i += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        body = nn.Sequential(*layers)
        if groups:
            body = tq.fuse_modules(body, [[str(j) for j in g] for g in groups])
        wrapped = nn.Sequential(tq.QuantStub(), *body, tq.DeQuantStub())
        wrapped.qconfig = tq.get_default_qconfig(backend)
        prepared = tq.prepare(wrapped)
        with torch.inference_mode():
            for k in range(0, len(calibration), batch_size):
                prepared(calibration[k:k + batch_size].cpu())
        return tq.convert(prepared)
