"""Checks for the exercises of chapter 02 (contrastive learning): NT-Xent, two views, kNN, and the
open-ended temperature sweep (judged by its outcome and by how it was obtained, not by its code)."""
from __future__ import annotations

import torch

from ._common import CheckResult, attempt, compare, result

__all__ = ["check_nt_xent", "check_two_views", "check_knn_predict", "check_temperature_sweep"]


def _nt_xent_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for n, d, t in [(4, 8, 0.5), (8, 16, 0.1), (16, 32, 0.05), (3, 5, 1.0), (32, 128, 0.2), (6, 4, 0.5)]:
        scale = 1 + 9 * torch.rand(2 * n, 1, generator=g)       # unequal norms: normalising matters
        z = torch.randn(2 * n, d, generator=g) * scale
        z[n:] = 0.7 * z[n:] + 0.5 * z[:n] * scale[n:] / scale[:n]  # positives somewhat aligned
        cases.append((z[:n].clone(), z[n:].clone(), t))
    return cases


def check_nt_xent(nt_xent_fn, quiet: bool = False) -> CheckResult:
    """``nt_xent_fn(z1, z2, temperature)`` must equal ``ptcourse.losses.nt_xent`` (value and gradients).

    Example:
        >>> check_nt_xent(ptcourse.losses.nt_xent)
    """
    from ..losses import nt_xent
    return compare("check_nt_xent", nt_xent_fn, nt_xent, _nt_xent_cases(), grad=True, quiet=quiet,
                   hint="normalise the rows of cat([z1, z2]), divide the similarities by the temperature, "
                        "mask the diagonal (self-similarity) with -inf, and use all 2N rows as anchors: "
                        "row i's positive is row i+N (and row i+N's is row i); then F.cross_entropy.")


def _random_transform(x):
    """A transform that uses the global torch RNG (so two calls give two different views)."""
    shift = int(torch.randint(0, x.shape[-1], (1,)))
    return torch.roll(x, shifts=shift, dims=-1) * (0.5 + torch.rand(1))


def check_two_views(two_views_cls, quiet: bool = False) -> CheckResult:
    """``two_views_cls(dataset, transform)`` must be a Dataset whose item ``i`` is two augmented views.

    The dataset's items are ``(image, label)``; item ``i`` of the wrapper must be
    ``(transform(image_i), transform(image_i))`` from two separate calls of the transform
    (so the two views differ), and its length that of the dataset.

    Example:
        >>> check_two_views(TwoViews)
    """
    from ..data import ImageDataset

    g = torch.Generator().manual_seed(1)
    base = ImageDataset(torch.randint(0, 256, (7, 3, 6, 6), dtype=torch.uint8, generator=g),
                        torch.arange(7) % 3, ["a", "b", "c"])

    def reference(seed, i):
        torch.manual_seed(seed)
        x, _ = base[i]
        return _random_transform(x), _random_transform(x)

    def name(msg):
        return result("check_two_views", False, msg, quiet=quiet, hint=(
            "read the image (ignore the label) with `x, _ = self.dataset[i]` and return "
            "`self.transform(x), self.transform(x)`: two calls, two different random views."))

    def build():
        ds = two_views_cls(base, _random_transform)
        return ds, len(ds)
    built, error = attempt(build)
    if error:
        return name(f"building it or taking len() {error}")
    ds, n = built
    if n != len(base):
        return name(f"len() is {n}, expected {len(base)} (the length of the wrapped dataset)")

    def student(seed, i):
        torch.manual_seed(seed)
        return ds[i]

    return compare("check_two_views", student, reference, [(s, i) for s, i in [(0, 0), (1, 3), (2, 6), (3, 2)]],
                   quiet=quiet, hint="item i is (transform(x_i), transform(x_i)) from two separate calls, "
                                     "no label; the transform makes each view random.")


def _knn_cases():
    g = torch.Generator().manual_seed(2)
    cases = []
    for n, q, d, c, k, t in [(200, 150, 16, 5, 20, 0.07), (120, 100, 8, 4, 15, 0.1), (60, 80, 32, 10, 60, 0.07),
                             (300, 100, 16, 3, 1, 0.07)]:
        means = torch.randn(c, d, generator=g)
        ytr = torch.randint(0, c, (n,), generator=g)
        xtr = (means[ytr] + 1.2 * torch.randn(n, d, generator=g)) * (0.2 + 5 * torch.rand(n, 1, generator=g))
        yq = torch.randint(0, c, (q,), generator=g)
        xq = (means[yq] + 1.2 * torch.randn(q, d, generator=g)) * (0.2 + 5 * torch.rand(q, 1, generator=g))
        cases.append((xtr, ytr, xq, k, t))
    return cases


def check_knn_predict(knn_fn, quiet: bool = False) -> CheckResult:
    """``knn_fn(train_feats, train_labels, query_feats, k, temperature)`` must predict like
    ``ptcourse.probes.knn_predict`` (cosine similarity, top-k, votes weighted by exp(sim / t)).

    Example:
        >>> check_knn_predict(ptcourse.probes.knn_predict)
    """
    from ..probes import knn_predict

    def reference(xtr, ytr, xq, k, t):
        return knn_predict(xtr, ytr, xq, k=k, temperature=t)

    return compare("check_knn_predict", knn_fn, reference, _knn_cases(), quiet=quiet,
                   hint="L2-normalise both feature sets, sim = query @ train.T, take the top-k similarities, "
                        "let each neighbour vote for its label with weight exp(sim / temperature) "
                        "(scatter_add_ into a [queries, classes] tensor), then argmax.")


def check_temperature_sweep(val_scores: dict, chosen, encoders: dict, random_encoder, bank, val, test, *,
                            k: int = 20, margin: float = 0.03, min_ratio: float = 4.0, tol: float = 0.011,
                            quiet: bool = False) -> CheckResult:
    """Judge an NT-Xent temperature sweep by its outcome and by how the temperature was chosen.

    ``val_scores[tau]`` is the student's kNN accuracy on the validation split of ``encoders[tau]``
    (an encoder trained with temperature ``tau``); ``chosen`` is the temperature picked.
    ``bank``, ``val`` and ``test`` are ``(images, labels)`` pairs: the labelled memory bank, the
    validation split and the test split. The check

    1. needs at least 3 temperatures spanning a factor of ``min_ratio`` or more;
    2. recomputes every validation score from the encoders (weighted kNN, ``k``, temperature
       0.07): the reported numbers must match, within ``tol``, so they were measured on validation
       (numbers that match the *test* split instead are called out);
    3. needs ``chosen`` to be the best temperature on validation;
    4. judges the result on test: the chosen encoder's kNN accuracy must beat the random-init
       encoder's by at least ``margin``, and it says how far the choice is from the sweep's best
       temperature on test (which an honest choice need not hit).

    Example:
        >>> check_temperature_sweep(val_scores, best, encoders, random_encoder, bank, val, test, k=20)
    """
    from ..probes import extract_features, knn_accuracy
    name = "check_temperature_sweep"

    def fail(msg, hint=""):
        return result(name, False, msg, hint=hint, quiet=quiet)

    taus = sorted(val_scores)
    if len(taus) < 3:
        return fail(f"the sweep has {len(taus)} temperature(s); try at least 3.",
                    "spread them out, e.g. one below 0.2, one near 0.5, one at 1 or above.")
    if min(taus) <= 0 or max(taus) / min(taus) < min_ratio:
        return fail(f"the temperatures {taus} span a factor of {max(taus) / min(taus):.1f}; "
                    f"spread them over a factor of {min_ratio:g} or more.")
    if set(encoders) != set(val_scores):
        return fail(f"encoders has temperatures {sorted(encoders)}, val_scores has {taus}: one encoder per score.")

    def knn(enc, split):
        with torch.no_grad():
            fb = extract_features(enc, bank[0], device="cpu")
            fq = extract_features(enc, split[0], device="cpu")
        return knn_accuracy(fb, bank[1], fq, split[1], k=k, temperature=0.07)

    val_true = {t: knn(encoders[t], val) for t in taus}
    off = [t for t in taus if abs(float(val_scores[t]) - val_true[t]) > tol]
    test_acc = {t: knn(encoders[t], test) for t in taus}
    if off:
        t = off[0]
        if abs(float(val_scores[t]) - test_acc[t]) <= tol:
            return fail(f"the score you report for tau={t} ({float(val_scores[t]):.1%}) is the TEST accuracy "
                        f"(validation: {val_true[t]:.1%}).",
                        "measure every temperature on the validation split; the test split is for the final "
                        "number only.")
        return fail(f"the score you report for tau={t} ({float(val_scores[t]):.1%}) is not the validation kNN "
                    f"accuracy of encoders[{t}] ({val_true[t]:.1%}, k={k}).",
                    "use the labelled bank as memory, the validation images as queries, and the encoder that "
                    "belongs to each temperature.")
    if chosen not in val_scores:
        return fail(f"chosen={chosen!r} is not one of the temperatures you tried ({taus}).")
    best_val = max(val_true.values())
    if val_true[chosen] < best_val - 1e-9:
        by_test = max(test_acc, key=test_acc.get)
        why = " (it is the best on TEST: choose on validation)" if chosen == by_test else ""
        return fail(f"tau={chosen} is not the best temperature on validation{why}: "
                    f"{val_true[chosen]:.1%} vs {best_val:.1%}.")
    rand = knn(random_encoder, test)
    best_t = max(test_acc, key=test_acc.get)
    behind = test_acc[best_t] - test_acc[chosen]
    outcome = (f"tau={chosen}: test kNN {test_acc[chosen]:.1%} vs {rand:.1%} for random features "
               f"({test_acc[chosen] - rand:+.1%}; needed {margin:+.1%}). Best of your sweep on test: tau={best_t} "
               f"at {test_acc[best_t]:.1%}" + (" (your choice)." if behind <= 0 else
                                               f", {behind:.1%} above your choice: the price of choosing honestly."))
    if test_acc[chosen] - rand < margin:
        return fail(outcome, "train longer or on more images, or try a wider range of temperatures.")
    return result(name, True, f"chosen on validation, as it should be. {outcome}", quiet=quiet)
