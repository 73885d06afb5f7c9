"""Checks for the exercises of chapter 03 (BERT fine-tuning).

Example:
    >>> from ptcourse.checks import check_attention
    >>> check_attention(my_attention)
    ✅ check_attention: matches the reference on 5 random inputs (values and gradients).
"""
from __future__ import annotations

import math

import torch

from ._common import CheckResult, _describe, compare
from ..chapters.bert_finetuning import mask_tokens, pad_collate

__all__ = ["check_attention", "check_pad_collate", "check_mask_tokens", "reference_attention"]


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
        text = (f"✅ check_mask_tokens: {msg}" if ok else f"❌ check_mask_tokens: {msg}\n   Hint: choose "
                "each non-special token with probability prob; of those 80% -> mask_id, 10% -> a random id, "
                "10% unchanged; labels = original id where chosen, -100 elsewhere.")
        if not quiet:
            print(text)
        return CheckResult(ok, text)

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
    try:
        out = mask_fn(ids, special, mask_id, vocab, 0.15)
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001
        return result(False, f"raised {type(err).__name__}: {err} on input_ids {_describe(ids)}")
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

