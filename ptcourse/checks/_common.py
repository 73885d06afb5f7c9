"""What every exercise check shares: :class:`CheckResult`, :func:`compare` and :func:`difference`.

Each ``check_<task>(student_fn)`` runs the student's function and the reference on several
random inputs and prints one friendly line: a pass, or what differs and a hint. It returns a
:class:`CheckResult` (truthy when it passed). A ``NotImplementedError`` from an unfinished
stub is let through, so an exercise notebook stops at the first task still to do.

Example:
    >>> from ptcourse.checks import check_nt_xent
    >>> check_nt_xent(my_nt_xent)
    ✅ check_nt_xent: matches the reference on 6 random inputs (values and gradients).

Writing a new check takes one call to :func:`compare`.
"""
from __future__ import annotations

import copy

import torch


class CheckResult:
    """The outcome of a check: ``bool(result)`` is whether it passed; ``result.message`` says why."""

    def __init__(self, passed: bool, message: str):
        self.passed, self.message = passed, message

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return f"CheckResult(passed={self.passed})"

    def _ipython_display_(self):  # the message was printed already; show nothing more
        pass


def result(name: str, ok: bool, msg: str, hint: str = "", quiet: bool = False, details=()) -> CheckResult:
    """The one way a check reports: ``✅ name: msg`` or ``❌ name: msg`` plus a hint (on a failure) and
    indented ``details`` lines; printed unless quiet.

    Example:
        >>> bool(result("check_x", False, "the output has shape [2]", hint="sum over the last axis", quiet=True))
        False
    """
    text = f"✅ {name}: {msg}" if ok else f"❌ {name}: {msg}" + (f"\n   Hint: {hint}" if hint else "")
    text = "\n".join([text] + [f"   {line}" for line in details])
    if not quiet:
        print(text)
    return CheckResult(ok, text)


def attempt(fn, *args):
    """Call a student's ``fn(*args)``: ``(value, None)``, or ``(None, "raised Error: message")`` when it
    raised. ``NotImplementedError`` (the exercise not attempted yet) propagates, as the checks expect.

    Example:
        >>> attempt(int, "3"), attempt(int, "x")[1]
        ((3, None), "raised ValueError: invalid literal for int() with base 10: 'x'")
    """
    try:
        return fn(*args), None
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001 - any error is reported to the student
        return None, f"raised {type(err).__name__}: {err}"


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    return repr(x) if isinstance(x, (int, float, bool, str)) else type(x).__name__


def difference(got, expected, atol=1e-5, rtol=1e-4, where="output") -> str | None:
    """What differs between ``got`` and ``expected`` (tensors, numbers, nested containers), or None."""
    if torch.is_tensor(expected):
        if not torch.is_tensor(got):
            return f"{where} should be a tensor, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"{where} has shape {list(got.shape)}, expected {list(expected.shape)}"
        if got.is_floating_point() != expected.is_floating_point() or (got.dtype == torch.bool) != (expected.dtype == torch.bool):
            return f"{where} has dtype {got.dtype}, expected {expected.dtype}"
        g, e = got.detach().double().cpu(), expected.detach().double().cpu()
        if torch.isnan(g).any() and not torch.isnan(e).any():
            return f"{where} contains NaN"
        if not torch.allclose(g, e, atol=atol, rtol=rtol, equal_nan=True):
            err = (g - e).abs()
            i = int(err.flatten().argmax())
            return (f"{where} differs: largest difference {float(err.max()):.3g} "
                    f"(got {float(g.flatten()[i]):.5g}, expected {float(e.flatten()[i]):.5g})")
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"{where} should be a sequence of {len(expected)} items, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            d = difference(g, e, atol, rtol, f"{where}[{i}]")
            if d:
                return d
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"{where} should have keys {sorted(expected)}, got {_describe(got)}"
        for k in expected:
            d = difference(got[k], expected[k], atol, rtol, f"{where}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(expected, float):
        if torch.is_tensor(got) and got.numel() == 1:
            got = float(got)
        if not isinstance(got, (int, float)) or abs(got - expected) > atol + rtol * abs(expected):
            return f"{where} is {got!r}, expected {expected:.6g}"
        return None
    if got != expected:
        return f"{where} is {got!r}, expected {expected!r}"
    return None


def _grads(fn, args, weight_seed=0):
    """Gradients of a fixed random projection of ``fn(*args)`` w.r.t. the float tensor args."""
    args = [a.detach().clone().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a
            for a in args]
    out = fn(*args)
    if not (torch.is_tensor(out) and out.requires_grad):
        return None, args
    g = torch.Generator().manual_seed(weight_seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    (out * w).sum().backward()
    return [a.grad if torch.is_tensor(a) and a.is_floating_point() else None for a in args], args


def compare(name, student_fn, reference_fn, cases, *, hint="", atol=1e-5, rtol=1e-4,
            grad=False, quiet=False) -> CheckResult:
    """Compare ``student_fn`` with ``reference_fn`` on each argument tuple in ``cases``.

    Inputs are deep-copied for each call, so a function that modifies its input in place
    cannot fool the comparison. With ``grad=True`` the gradients with respect to every
    floating-point tensor argument must match too.
    """
    def fail(msg):
        return result(name, False, msg, hint, quiet)

    for i, args in enumerate(cases):
        args = tuple(args)
        expected = reference_fn(*copy.deepcopy(args))
        got, error = attempt(student_fn, *copy.deepcopy(args))
        if error:
            return fail(f"{error} on input {_describe(args)}")
        problem = difference(got, expected, atol, rtol)
        if problem:
            return fail(f"{problem} on input {i + 1} {_describe(args)}")
        if grad:
            g_ref, _ = _grads(reference_fn, copy.deepcopy(args), i)
            g_got, _ = _grads(student_fn, copy.deepcopy(args), i)
            if g_ref is not None:
                if g_got is None:
                    return fail(f"the output carries no gradient (detached?) on input {i + 1}")
                for j, (a, b) in enumerate(zip(g_got, g_ref)):
                    if b is None:
                        continue
                    if a is None:
                        return fail(f"no gradient reaches argument {j} on input {i + 1}")
                    problem = difference(a, b, atol * 10, rtol * 10, where=f"gradient w.r.t. argument {j}")
                    if problem:
                        return fail(f"{problem} on input {i + 1}")
    return result(name, True, f"matches the reference on {len(cases)} random inputs" +
                  (" (values and gradients)." if grad else "."), quiet=quiet)


# ----------------------------------------------------------------------------- open-ended experiments
def fingerprint(model) -> tuple:
    """A summary of a model's weights: the same trained model gives the same tuple (the labs use it to
    recognise which model was scored on the sealed test split)."""
    return tuple(round(float(p.detach().double().sum()), 6) for p in model.parameters())


def tensor_accuracy(model, x, y, batch_size: int = 500) -> float:
    """Accuracy of ``model`` on in-memory tensors, in eval mode and without gradients (mode restored)."""
    was = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        pred = torch.cat([model(x[k:k + batch_size].to(device)).argmax(1).cpu()
                          for k in range(0, len(y), batch_size)])
    model.train(was)
    return float((pred == y).float().mean())


def split_trials(name: str, trials, model_key: str, what: str, quiet: bool = False):
    """Validate an open-ended experiment's ``trials`` (dicts with ``model_key`` and ``val_acc``, one of
    them marked ``'scratch': True``); return ``(scratch_index, other_indices)`` or a failed CheckResult."""
    if not isinstance(trials, (list, tuple)) or not all(isinstance(t, dict) for t in trials):
        return result(name, False, f"`trials` must be a list of dicts, one per trained {what}.", quiet=quiet)
    for i, t in enumerate(trials):
        if model_key not in t or "val_acc" not in t:
            return result(name, False, f"trial {i} needs the keys '{model_key}' and 'val_acc'.", quiet=quiet)
    scratch = [i for i, t in enumerate(trials) if t.get("scratch")]
    if len(scratch) != 1:
        return result(name, False, f"put exactly one scratch baseline in `trials` (found {len(scratch)}): a dict "
                                   f"with 'scratch': True for the {what} trained from scratch.", quiet=quiet)
    return scratch[0], [i for i, t in enumerate(trials) if not t.get("scratch")]


class SealedTestLab:
    """What the open-ended experiments' labs share: the validation accuracy a student selects on, and
    a sealed test split that the check scores each model on (remembered by :func:`fingerprint`, so a
    second look at the test split is noticed). Subclasses set ``x_val``, ``y_val`` and ``_tested = {}``
    and define ``_test_split()``."""

    batch_size = 500

    def val_accuracy(self, model) -> float:
        """Accuracy of ``model`` on the validation split (what you select on)."""
        return tensor_accuracy(model, self.x_val, self.y_val, self.batch_size)

    def _verified_val(self, name, trials, model_key, quiet=False):
        """Each trial's validation accuracy, recomputed; a failed CheckResult if a recorded one differs."""
        val = {}
        for i, t in enumerate(trials):
            acc = self.val_accuracy(t[model_key])
            if abs(float(t["val_acc"]) - acc) > 1e-6:
                return result(name, False, f"trial {i} records val_acc {float(t['val_acc']):.4f}, but its validation "
                                           f"accuracy is {acc:.4f}.",
                              hint="score every trial with lab.val_accuracy: selecting on any other split (the test "
                                   "split above all) is not allowed.", quiet=quiet)
            val[i] = acc
        return val

    def _test_accuracy(self, model) -> float:
        x, y = self._test_split()
        acc = tensor_accuracy(model, x, y, self.batch_size)
        self._tested.setdefault(fingerprint(model), acc)
        return acc


def train_on_tensors(net, x, y, epochs: int, lr: float, seed: int, batch_size: int = 64):
    """The labs' own quick training (Adam, cross-entropy, shuffled mini-batches from in-memory tensors)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for k in range(0, len(y), batch_size):
            i = perm[k:k + batch_size]
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net
