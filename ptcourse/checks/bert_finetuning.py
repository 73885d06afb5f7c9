"""Checks for the exercises of chapter 03 (BERT fine-tuning).

Example:
    >>> from ptcourse.checks import check_attention
    >>> check_attention(my_attention)
    ✅ check_attention: matches the reference on 5 random inputs (values and gradients).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._common import CheckResult, _describe, attempt, compare
from ._common import result as _report
from ..chapters.bert_finetuning import mask_tokens, pad_collate, tfidf_baseline

__all__ = ["check_attention", "check_pad_collate", "check_mask_tokens", "check_label_budget", "reference_attention"]


def reference_attention(q, k, v, mask=None):
    """Scaled dot-product attention: ``(output, weights)``; ``mask`` is bool, True = may attend."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def _attention_cases(seed=0):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for shape, with_mask in (((2, 5, 8), False), ((3, 4, 7, 16), False), ((2, 6, 4), True),
                             ((2, 3, 5, 8), True), ((1, 1, 9, 32), True)):
        *lead, n, d = shape
        q, k, v = (torch.randn(*lead, n, d, generator=g) for _ in range(3))
        if with_mask:  # a padding mask over the keys: the last few keys of some rows are padding
            keep = torch.randint(1, n + 1, (lead[0],), generator=g)
            mask = torch.arange(n) < keep.view(-1, *([1] * (len(lead) - 1)), 1, 1)
            mask = mask.expand(*lead, n, n)
            cases.append((q, k, v, mask))
        else:
            cases.append((q, k, v))
    return cases


def check_attention(attention, quiet=False) -> CheckResult:
    """``attention(q, k, v, mask=None) -> (output, weights)`` against the reference, values and gradients.

    q, k, v: [..., n, d]; mask: bool [..., n, n], True where a query may attend to a key.
    """
    hint = ("weights = softmax(q @ k^T / sqrt(d)) over the last dimension (the keys), with masked "
            "scores set to -inf BEFORE the softmax; output = weights @ v.")
    cases = _attention_cases()
    first = compare("check_attention", attention, reference_attention, cases, hint=hint, quiet=True)
    if not first:
        if not quiet:
            print(first.message)
        return first
    return compare("check_attention", lambda *a: attention(*a)[0], lambda *a: reference_attention(*a)[0],
                   cases, hint=hint, grad=True, quiet=quiet)


def check_pad_collate(collate, quiet=False) -> CheckResult:
    """``collate(features, pad_id)`` -> dict of input_ids / attention_mask / labels, padded to the batch's longest."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for b, pad_id in ((3, 0), (5, 0), (4, 7), (1, 0)):
        lengths = torch.randint(2, 12, (b,), generator=g).tolist()
        feats = [{"input_ids": torch.randint(100, 1000, (n,), generator=g).tolist(),
                  "label": int(torch.randint(0, 2, (1,), generator=g))} for n in lengths]
        cases.append((feats, pad_id))
    return compare("check_pad_collate", collate, lambda f, p: pad_collate(f, p), cases, quiet=quiet,
                   hint="pad every input_ids list on the right with pad_id up to the longest in THIS batch; "
                        "attention_mask is 1 on real tokens, 0 on padding; 'label' becomes 'labels'; "
                        "all torch.long tensors.")


def check_mask_tokens(mask_fn, quiet=False, seed=0) -> CheckResult:
    """``mask_fn(input_ids, special_mask, mask_id, vocab_size, prob=0.15) -> (inputs, labels)``.

    Masking is random, so this checks exact invariants on every position and the 15% / 80-10-10
    proportions on a large batch (about 150,000 candidate tokens; tolerances of many sigma).
    """
    def result(ok, msg):
        return _report("check_mask_tokens", ok, msg, quiet=quiet, hint=(
            "choose each non-special token with probability prob; of those 80% -> mask_id, 10% -> a random id, "
            "10% unchanged; labels = original id where chosen, -100 elsewhere."))

    g = torch.Generator().manual_seed(seed)
    vocab, mask_id = 1000, 3
    ids = torch.randint(10, vocab, (1000, 180), generator=g)
    lengths = torch.randint(20, 181, (1000,), generator=g)
    pad = torch.arange(180) >= lengths[:, None]
    ids[pad] = 0
    ids[:, 0] = 1                                       # a [CLS]-like token
    ids[torch.arange(1000), lengths - 1] = 2            # a [SEP]-like token
    special = pad.clone()
    special[:, 0] = True
    special[torch.arange(1000), lengths - 1] = True
    original = ids.clone()
    out, error = attempt(mask_fn, ids, special, mask_id, vocab, 0.15)
    if error:
        return result(False, f"{error} on input_ids {_describe(ids)}")
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
        return result(False, f"should return (inputs, labels), two tensors; got {_describe(out)}")
    inputs, labels = out
    if not torch.equal(ids, original):
        return result(False, "input_ids was modified in place; work on a copy (e.g. torch.where or .clone()).")
    for name, t in (("inputs", inputs), ("labels", labels)):
        if t.shape != ids.shape or t.dtype != torch.long:
            return result(False, f"{name} is {_describe(t)}, expected tensor{list(ids.shape)} int64")
    chosen = labels != -100
    if not torch.equal(labels[chosen], ids[chosen]):
        return result(False, "labels must hold the ORIGINAL token id at every chosen position.")
    if (chosen & special).any():
        return result(False, f"{int((chosen & special).sum())} special or padding positions were chosen; never "
                             "choose them.")
    if not torch.equal(inputs[~chosen], ids[~chosen]):
        return result(False, "positions that were not chosen (label -100) must keep their original id in inputs.")
    n = int((~special).sum())
    k = int(chosen.sum())
    frac = k / n
    if abs(frac - 0.15) > 6 * math.sqrt(0.15 * 0.85 / n):
        return result(False, f"{frac:.3%} of the non-special tokens were chosen; expected about 15%.")
    masked = (inputs[chosen] == mask_id).float().mean().item()
    same = (inputs[chosen] == ids[chosen]).float().mean().item()
    other = 1 - masked - same
    tol = 6 * math.sqrt(0.1 * 0.9 / k)
    if abs(masked - 0.8) > 6 * math.sqrt(0.16 / k) or abs(same - 0.1) > tol or abs(other - 0.1) > tol:
        return result(False, f"of the chosen tokens {masked:.1%} became mask_id, {other:.1%} a random id and "
                             f"{same:.1%} stayed unchanged; expected about 80% / 10% / 10%.")
    return result(True, f"{frac:.1%} of {n:,} tokens chosen; {masked:.1%} masked, {other:.1%} random, {same:.1%} "
                        "unchanged; special tokens and padding untouched.")



def _splits(dataset, n_val, n_test):
    from .. import data
    out = {"train": data.load(dataset, "train", limit=8530, seed=0)}
    out["validation"] = data.load(dataset, "validation", limit=n_val, seed=0)
    out["test"] = data.load(dataset, "test", limit=n_test, seed=0)
    return {k: (list(v.texts), np.asarray(v.labels)) for k, v in out.items()}


def check_label_budget(predict, train_indices, claimed_val_acc, *, dataset="rotten_tomatoes", n_val=1066,
                       n_test=1066, data=None, quiet=False) -> CheckResult:
    """The open-ended experiment: does your fine-tuned model beat TF-IDF at your label budget?

    ``predict(texts) -> labels`` is your trained model; ``train_indices`` the training sentences it
    was trained on (indices into the whole train split, ``ptcourse.data.load(dataset, "train",
    limit=8530, seed=0)`` order); ``claimed_val_acc`` the validation accuracy you measured when you
    chose this budget. The check

    1. checks the indices (distinct, inside the train split): their number is your budget;
    2. scores your model on the validation split (``load(dataset, "validation", limit=n_val,
       seed=0)``) and trains the TF-IDF + logistic-regression baseline on the same sentences (its
       ``C`` chosen on that validation split);
    3. checks that your claimed accuracy is the validation accuracy (a claim that matches the test
       split instead means the budget was chosen on test);
    4. passes when your model beats the baseline on validation, and says by how many points,
       against the noise of a validation set this size (paired standard error of the difference);
    5. then, once, reports both on the test split, the number you would publish.

    ``data`` (for tests) replaces the dataset: ``{"train"|"validation"|"test": (texts, labels)}``.
    """
    lines = []

    def result(ok, msg):
        return _report("check_label_budget", ok, msg, quiet=quiet, details=lines)

    splits = data if data is not None else _splits(dataset, n_val, n_test)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = (splits[k] for k in ("train", "validation", "test"))
    tr_y, va_y, te_y = np.asarray(tr_y), np.asarray(va_y), np.asarray(te_y)
    idx = np.asarray(train_indices).ravel()
    if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        return result(False, f"train_indices should be a non-empty list of integers, got {_describe(train_indices)}.")
    if len(np.unique(idx)) != len(idx):
        return result(False, f"train_indices has {len(idx) - len(np.unique(idx))} repeated entries: the budget is "
                             "the number of DISTINCT labelled sentences.")
    if idx.min() < 0 or idx.max() >= len(tr_x):
        return result(False, f"train_indices must lie in [0, {len(tr_x)}): they index the train split.")
    n = len(idx)
    val_pred, error = attempt(lambda: np.asarray(predict(list(va_x))).ravel())
    if error:
        return result(False, f"predict(texts) {error}")
    if val_pred.shape != va_y.shape:
        return result(False, f"predict(texts) should return one label per sentence: {len(va_y)} labels, got "
                             f"{_describe(val_pred)}.")
    ours = float((val_pred == va_y).mean())
    base = tfidf_baseline([tr_x[i] for i in idx], tr_y[idx], va_x, va_y, te_x, te_y)
    test_pred = np.asarray(predict(list(te_x))).ravel()
    ours_test = float((test_pred == te_y).mean())
    claimed = float(claimed_val_acc)
    if abs(claimed - ours) > 0.005:
        if abs(claimed - ours_test) <= 0.005:
            return result(False, f"you claim {claimed:.1%}, which is the TEST accuracy ({ours_test:.1%}); on "
                                 f"validation the model scores {ours:.1%}. Choose the budget on validation and "
                                 "look at test once, at the end.")
        return result(False, f"you claim a validation accuracy of {claimed:.1%}, but the model scores {ours:.1%} "
                             "on the validation split: is this the model you measured?")
    # paired standard error of the accuracy difference on the same validation sentences
    a, b = (val_pred == va_y), (base["val_pred"] == va_y)
    d = a.astype(float) - b.astype(float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    margin = ours - base["val_acc"]
    lines.append(f"validation ({len(va_y)} sentences): yours {ours:.1%}, TF-IDF {base['val_acc']:.1%} "
                 f"(C={base['C']:g}): {100 * margin:+.1f} points, standard error {100 * se:.1f} points.")
    lines.append(f"test, looked at once: yours {ours_test:.1%}, TF-IDF {base['test_acc']:.1%} "
                 f"({100 * (ours_test - base['test_acc']):+.1f} points).")
    if margin == 0:
        return result(False, f"with {n} labelled sentences your model TIES the TF-IDF baseline on validation; it "
                             "must beat it. Try another budget, learning rate or number of epochs.")
    if margin < 0:
        return result(False, f"with {n} labelled sentences your model is {100 * -margin:.1f} points BELOW the TF-IDF "
                             "baseline on validation. Try another budget, learning rate or number of epochs.")
    strength = ("more than twice the noise: a clear win" if margin > 2 * se else
                "within twice the noise of a validation set this size: a win, but not a clear one")
    return result(True, f"with {n} labelled sentences your model beats TF-IDF on validation by "
                        f"{100 * margin:.1f} points, {strength}.")
