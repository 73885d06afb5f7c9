"""Checks for chapter 06's exercises: causal self-attention, the next-token loss, sampling, nucleus
(top-p) filtering, a KV-cache attention step, one block copied into GPT-2, and the open-ended
pretraining experiment.

Example:
    >>> from ptcourse.checks.language_model_pretraining import check_causal_attention
    >>> check_causal_attention(my_causal_attention)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import CheckResult, _describe, attempt, compare, result


def _result(name, problem, ok_text, hint, quiet):
    return result(name, problem is None, problem or ok_text, hint, quiet)


# ----------------------------------------------------------------------------- causal attention
def reference_causal_attention(q, k, v):
    """PyTorch's fused kernel with ``is_causal=True``: the answer ``causal_attention`` must give."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _attention_cases(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1, 4, 8), (2, 3, 7, 16), (3, 2, 12, 4), (2, 4, 1, 8)]
    return [tuple(torch.randn(s, generator=g) * 2 for _ in range(3)) for s in shapes]


def check_causal_attention(attention_fn, quiet=False) -> CheckResult:
    """``attention_fn(q, k, v) -> output`` for ``q, k, v`` of shape ``[B, heads, T, d]``: causal
    scaled dot-product attention, compared with ``F.scaled_dot_product_attention(is_causal=True)``
    in values and gradients."""
    return compare("check_causal_attention", attention_fn, reference_causal_attention, _attention_cases(),
                   grad=True, quiet=quiet, atol=1e-5, rtol=1e-4,
                   hint="scores = q @ k^T / sqrt(d); set the scores of keys *after* the query (j > i) to -inf "
                        "with a lower-triangular mask (torch.tril) before the softmax over the keys.")


# ----------------------------------------------------------------------------- next-token loss
PAD = 1


def reference_next_token_loss(logits, ids, pad_id=PAD):
    """Mean cross-entropy of ``logits[:, t]`` against ``ids[:, t + 1]``, targets equal to ``pad_id``
    ignored."""
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _loss_cases(seed=0):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for B, T, V, pad_id in [(2, 6, 11, 1), (3, 9, 7, 0), (4, 5, 13, 1)]:
        ids = torch.randint(3, V, (B, T), generator=g)
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        lengths[0] = T
        ids[torch.arange(T)[None, :] >= lengths[:, None]] = pad_id      # right padding
        logits = torch.randn(B, T, V, generator=g) * 2
        cases.append((logits, ids, pad_id))
    return cases


def check_next_token_loss(loss_fn, quiet=False) -> CheckResult:
    """``loss_fn(logits, ids, pad_id) -> scalar``: ``logits`` ``[B, T, V]`` is the model's output for
    ``ids`` ``[B, T]`` (right-padded with ``pad_id``); the loss predicts each next token."""
    cases = _loss_cases()
    logits, ids, pad_id = cases[0]
    hint = "the prediction at position t is scored against the token at t + 1: drop the last logit and the first id."
    got, _ = attempt(loss_fn, *[c.clone() if torch.is_tensor(c) else c for c in cases[0]])   # an error: compare says
    if torch.is_tensor(got) and got.numel() == 1:
        flat = lambda lo, ta: F.cross_entropy(lo.reshape(-1, lo.shape[-1]), ta.reshape(-1), ignore_index=-100)
        unshifted = flat(logits, ids.masked_fill(ids == pad_id, -100))
        with_pad = flat(logits[:, :-1], ids[:, 1:])
        if math.isclose(float(got), float(unshifted), rel_tol=1e-4):
            hint = ("your loss scores position t against the token at t itself (unshifted labels): the model "
                    "would learn to copy its input. Compare logits[:, :-1] with ids[:, 1:].")
        elif math.isclose(float(got), float(with_pad), rel_tol=1e-4):
            hint = "padding targets are counted: set them to -100 (ignore_index) or mask them out of the mean."
    return compare("check_next_token_loss", loss_fn, reference_next_token_loss, cases, grad=True, quiet=quiet,
                   hint=hint)


# ----------------------------------------------------------------------------- sampling
def reference_next_token_probs(logits, temperature=1.0, top_k=None):
    """The distribution ``sample_next`` must draw from: softmax(logits / T) restricted to the
    ``top_k`` largest logits and renormalised."""
    from ptcourse.chapters.language_model_pretraining import top_k_filter
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    return logits.softmax(-1)


def check_sample_next(sample_fn, quiet=False, draws: int = 20000) -> CheckResult:
    """``sample_fn(logits, temperature, top_k) -> ids``: ``logits`` ``[B, V]``, returns ``B`` token ids
    drawn from :func:`reference_next_token_probs`. Judged by the frequencies of ``draws`` samples."""
    name = "check_sample_next"
    g = torch.Generator().manual_seed(0)
    row = torch.randn(9, generator=g) * 1.5
    settings = [(1.0, None), (0.5, None), (2.0, 3), (0.8, 5), (1.0, 1)]
    torch.manual_seed(0)
    for temperature, top_k in settings:
        logits = row.expand(draws, -1).clone()
        ids, error = attempt(sample_fn, logits, temperature, top_k)
        if error:
            return _result(name, f"{error} (temperature={temperature}, top_k={top_k})",
                           "", "take logits [B, V] and return a tensor of B token ids.", quiet)
        if not torch.is_tensor(ids) or ids.shape not in ((draws,), (draws, 1)) or ids.is_floating_point():
            got = f"tensor{list(ids.shape)} {ids.dtype}" if torch.is_tensor(ids) else type(ids).__name__
            return _result(name, f"returned {got}, expected {draws} integer ids for logits [{draws}, 9]", "",
                           "torch.multinomial(probs, 1) gives [B, 1]; .squeeze(-1) gives [B].", quiet)
        ids = ids.reshape(-1).long()
        if ids.min() < 0 or ids.max() >= row.numel():
            return _result(name, "returned ids outside the vocabulary", "", "sample indices of the last dimension.", quiet)
        freq = torch.bincount(ids, minlength=row.numel()).double() / draws
        expected = reference_next_token_probs(row.double(), temperature, top_k)
        outside = float(freq[expected == 0].sum())
        where = f"(temperature={temperature}, top_k={top_k})"
        if outside > 0:
            return _result(name, f"{outside:.1%} of the samples are outside the top {top_k} tokens {where}", "",
                           "set the logits below the k-th largest to -inf before the softmax.", quiet)
        err = float((freq - expected).abs().max())
        if err > 0.02:
            hint = "sample from softmax(logits / temperature): divide by the temperature, do not multiply."
            greedy = torch.zeros_like(expected)
            greedy[expected.argmax()] = 1
            if float((freq - greedy).abs().max()) < 0.01 and float(expected.max()) < 0.99:
                hint = "you always pick the most likely token (greedy): draw with torch.multinomial instead."
            elif float((freq - reference_next_token_probs(row.double(), 1 / temperature, top_k)).abs().max()) < 0.02:
                pass  # multiplied instead of divided: the default hint says it
            elif float((freq - reference_next_token_probs(row.double(), 1.0, top_k)).abs().max()) < 0.02:
                hint = "the temperature has no effect: divide the logits by it before the softmax."
            return _result(name, f"sample frequencies differ from the expected probabilities by up to {err:.3f} "
                                 f"{where}", "", hint, quiet)
    return _result(name, None, f"frequencies of {draws} draws match softmax(logits / T) with top-k for "
                               f"{len(settings)} settings.", "", quiet)


# ----------------------------------------------------------------------------- nucleus filtering
def reference_top_p_filter(logits, top_p):
    """The library's :func:`~ptcourse.chapters.language_model_pretraining.top_p_filter`: the logits
    with every token outside the nucleus of mass ``top_p`` set to ``-inf``."""
    from ptcourse.chapters.language_model_pretraining import top_p_filter
    return top_p_filter(logits, top_p)


def _nucleus_cases(seed=0):
    g = torch.Generator().manual_seed(seed)
    peaked = torch.tensor([[6.0, 1.0, 0.5, 0.0, -1.0, -2.0]])            # one token holds almost all the mass
    cases = [(peaked, 0.9), (torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1), 0.8)]
    for B, V, scale, p in [(4, 10, 1.0, 0.9), (3, 50, 3.0, 0.5), (5, 20, 0.3, 0.95), (2, 30, 2.0, 0.3)]:
        cases.append((torch.randn(B, V, generator=g) * scale, p))
    return cases


def check_top_p_filter(filter_fn, quiet=False) -> CheckResult:
    """``filter_fn(logits, top_p) -> logits``: ``logits`` ``[B, V]``; the tokens outside the smallest
    set of likeliest tokens whose probabilities sum to at least ``top_p`` must get probability 0
    (``-inf`` or a very negative logit), the others keep their logits. Compared through the softmax
    of the output, so ``-inf`` and ``-1e9`` both pass."""
    probs = lambda fn: (lambda logits, p: fn(logits, p).softmax(-1))
    hint = ("sort the probabilities in descending order; keep a token while the mass of the tokens ranked "
            "*above* it is below top_p (so the token that crosses top_p is kept), then map the mask back to "
            "the original order before filling the rest with -inf.")
    cases = _nucleus_cases()
    got, _ = attempt(lambda: [filter_fn(l.clone(), p) for l, p in cases])   # an error: compare reports it
    if got is not None and all(torch.is_tensor(x) and x.shape == l.shape for x, (l, _) in zip(got, cases)):
        kept = [x.detach().softmax(-1) > 0 for x in got]
        ref = [reference_top_p_filter(l, p).isfinite() for l, p in cases]
        if any(torch.isnan(x.detach().softmax(-1)).any() for x in got) or kept[0].sum() < ref[0].sum():
            hint = ("a row lost every token, or the token that crosses top_p was dropped: keep a token when the "
                    "mass *above* it (cumsum minus its own probability) is below top_p; the likeliest is always kept.")
        elif all(torch.equal(a.sum(-1), b.sum(-1)) for a, b in zip(kept, ref)) and \
                not all(torch.equal(a, b) for a, b in zip(kept, ref)):
            hint = ("the right number of tokens is kept, but not the right ones: the mask was computed in sorted "
                    "order; scatter it back to the vocabulary order (or fill the sorted logits and unsort them).")
    return compare("check_top_p_filter", probs(filter_fn), probs(reference_top_p_filter), cases, quiet=quiet,
                   hint=hint)


# ----------------------------------------------------------------------------- a KV cache step
def check_kv_cache_step(step_fn, quiet=False) -> CheckResult:
    """``step_fn(attn, x_new, cache) -> (y, (k, v))``: causal self-attention of the new positions
    ``x_new`` ``[B, T_new, d]`` of a :class:`~ptcourse.chapters.language_model_pretraining.CausalSelfAttention`
    over the cached keys and values ``cache = (k, v)`` (each ``[B, heads, T_past, d_h]``, or None at
    the start) and their own; returns the new positions' outputs and the cache grown by their keys and
    values.

    Compared with the attention run on the whole sequence at once (``attn(x)[:, T_past:]``) for a
    prompt, one new token and several new tokens at a time; the cache is compared with the keys and
    values of the whole sequence, and ``attn.qkv`` must see only the new positions (projecting the
    cached ones again is the work a cache exists to save).
    """
    from ..chapters.language_model_pretraining import CausalSelfAttention
    name = "check_kv_cache_step"
    hint = ("project only x_new with attn.qkv, split into heads ([B, heads, T_new, d_h]), append k and v to the "
            "cached ones along the position axis (dim 2), then let new position i attend to every cached key and "
            "to the new keys up to itself: torch.ones(T_new, T_past + T_new).tril(diagonal=T_past) as the mask.")
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, n_heads=4).eval()
    x = torch.randn(2, 9, 16)
    B, T, C = x.shape
    with torch.no_grad():
        q_all, k_all, v_all = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in attn.qkv(x).split(C, dim=2))

    @torch.no_grad()
    def masked(past, new, diagonal):         # the new positions' outputs under tril(diagonal) over past + new keys
        q, k, v = q_all[:, :, past:past + new], k_all[:, :, :past + new], v_all[:, :, :past + new]
        allowed = torch.ones(new, past + new, dtype=torch.bool).tril(diagonal=diagonal)
        y = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        return attn.proj(y.transpose(1, 2).reshape(B, new, C))
    rows = []
    hook = attn.qkv.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        for past, new in ((0, 4), (4, 1), (5, 3), (8, 1)):
            cache = None if past == 0 else (k_all[:, :, :past].clone(), v_all[:, :, :past].clone())
            rows.clear()
            with torch.no_grad():
                got, error = attempt(step_fn, attn, x[:, past:past + new].clone(), cache)
            where = f"with {past} cached and {new} new position(s)"
            if error:
                return _result(name, f"{where}: {error}", "", hint, quiet)
            ok_shape = (isinstance(got, (tuple, list)) and len(got) == 2 and torch.is_tensor(got[0])
                        and isinstance(got[1], (tuple, list)) and len(got[1]) == 2)
            if not ok_shape:
                return _result(name, f"{where}: returned {_describe(got)}; expected (y, (k, v)).", "", hint, quiet)
            y, (k, v) = got
            if any(r > new for r in rows):
                return _result(name, f"{where}: attn.qkv projected {max(rows)} positions; only the {new} new ones "
                                     "need it, the cached keys and values are already projected.", "", hint, quiet)
            want = attn(x[:, :past + new])[:, past:].detach()
            if tuple(y.shape) != tuple(want.shape):
                return _result(name, f"{where}: y is {_describe(y)}; expected tensor{list(want.shape)}.", "",
                               hint, quiet)
            if not (torch.is_tensor(k) and tuple(k.shape) == tuple(k_all[:, :, :past + new].shape)
                    and torch.allclose(k, k_all[:, :, :past + new], atol=1e-5)
                    and torch.is_tensor(v) and torch.allclose(v, v_all[:, :, :past + new], atol=1e-5)):
                return _result(name, f"{where}: the returned cache should hold the keys and values of all "
                                     f"{past + new} positions so far, [B, heads, {past + new}, d_h], in order; got "
                                     f"{_describe(k)}, {_describe(v)}.", "", hint, quiet)
            if not torch.allclose(y, want, atol=1e-5):
                if past and torch.allclose(y, masked(past, new, 0), atol=1e-5):
                    problem = ("the mask leaves out the cached positions: new position i sees the keys 0..i only, "
                               f"instead of the {past} cached keys and the new ones up to itself")
                elif new > 1 and torch.allclose(y[:, -1], want[:, -1], atol=1e-5):
                    problem = ("only the last new position is right: the earlier new positions must not see the new "
                               "positions after them (a mask among the new ones)")
                else:
                    problem = ("the outputs differ from attention over the whole sequence by up to "
                               f"{(y - want).abs().max():.3g}")
                return _result(name, f"{where}: {problem}.", "", hint, quiet)
    finally:
        hook.remove()
    return _result(name, None, "the same outputs as attention over the whole sequence, the cache grown by the new "
                               "keys and values, and only the new positions projected.", "", quiet)


# ----------------------------------------------------------------------------- the GPT as GPT-2
def check_gpt2_block_copy(copy_fn, quiet=False) -> CheckResult:
    """``copy_fn(block, gpt2_block)``: copy one of the chapter's ``Block``s into a ``transformers``
    ``GPT2Block`` in place, so that ``GPT2LMHeadModel`` computes the chapter's GPT.

    A 2-layer GPT is converted with every other weight in place (:func:`~ptcourse.chapters.
    language_model_pretraining.to_gpt2`) and its GPT-2 blocks overwritten with noise; ``copy_fn``
    fills each, under ``torch.no_grad()``. Passes when the two models' logits agree; otherwise the
    first GPT-2 tensor that does not hold its counterpart is named.
    """
    from ..chapters.language_model_pretraining import GPT, gpt2_block_pairs, to_gpt2
    name = "check_gpt2_block_copy"
    hint = ("copy ln_1 <- ln1, attn.c_attn <- attn.qkv, attn.c_proj <- attn.proj, ln_2 <- ln2, mlp.c_fc <- mlp[0], "
            "mlp.c_proj <- mlp[2], weights and biases, with .copy_(); GPT-2's Conv1D stores its weight [in, out], "
            "the transpose of nn.Linear's [out, in], so copy linear weights as ours.weight.T.")
    torch.manual_seed(0)
    model = GPT(vocab_size=40, context=12, d_model=16, n_layers=2, n_heads=2).eval()
    with torch.no_grad():                   # no two tensors alike (a fresh LayerNorm is all ones, every bias zero)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = to_gpt2(model).eval()
    with torch.no_grad():
        for p in hf.transformer.h.parameters():
            p.normal_()
        for block, gpt2_block in zip(model.blocks, hf.transformer.h):
            _, error = attempt(copy_fn, block, gpt2_block)
            if error:
                return _result(name, error, "", hint, quiet)
        ids = torch.randint(0, 40, (2, 9))
        gap = float((hf(ids, attention_mask=torch.ones_like(ids)).logits - model(ids)).abs().max())
    if gap < 1e-4:
        return _result(name, None, f"GPT2LMHeadModel gives the GPT's logits (max difference {gap:.1e}).", "", quiet)
    for i, (block, gpt2_block) in enumerate(zip(model.blocks, hf.transformer.h)):
        for theirs, ours in gpt2_block_pairs(block, gpt2_block):
            transposed = type(theirs).__name__ == "Conv1D"
            where = next(n for n, m in gpt2_block.named_modules() if m is theirs)
            want = ours.weight.T if transposed else ours.weight
            if transposed and theirs.weight.shape == ours.weight.shape and torch.equal(theirs.weight, ours.weight):
                return _result(name, f"h[{i}].{where}.weight holds the weight untransposed: Conv1D stores [in, out].",
                               "", hint, quiet)
            if not (torch.equal(theirs.weight, want) and torch.equal(theirs.bias, ours.bias)):
                return _result(name, f"h[{i}].{where} does not hold its counterpart's weight and bias.", "", hint,
                               quiet)
    return _result(name, f"the logits differ by up to {gap:.3g}.", "", hint, quiet)


# ----------------------------------------------------------------------------- the open-ended experiment
@torch.no_grad()
def _perplexity(model, seqs, pad_id=PAD, batch_size=128):
    from ptcourse.chapters.language_model_pretraining import perplexity
    return perplexity(model, seqs, batch_size=batch_size, pad_id=pad_id)


def check_pretraining_experiment(model, tok, corpus, steps: int, max_steps: int, target: float = 0.5,
                                 quiet=False) -> CheckResult:
    """Judge the outcome of a short pretraining run: its perplexity on the held-out sentences of
    ``corpus`` (never trained on; checked here) must be at most ``target`` times the perplexity of
    the unigram model of the training text, within ``max_steps`` optimizer steps.

    Args:
        model: a GPT (``model(ids) -> logits [B, T, V]``) with a ``context`` attribute.
        tok: the ``tokenizers`` tokenizer the model was trained with.
        corpus: the :class:`~ptcourse.chapters.language_model_pretraining.Corpus` it was trained on.
        steps: how many optimizer steps the run took.
    """
    from ptcourse.chapters.language_model_pretraining import encode_sentences, encode_stream, unigram_perplexity
    name = "check_pretraining_experiment"
    train = set(corpus.train)
    overlap = sum(s in train for s in corpus.heldout)
    if overlap:
        return _result(name, f"{overlap} held-out sentences are in the training text", "",
                       "build the corpus with prepare_corpus: held-out sentences must never be trained on.", quiet)
    if steps > max_steps:
        return _result(name, f"{steps} steps is over the budget of {max_steps}", "",
                       "the experiment is about doing better *within* the budget: change the recipe, not the length.",
                       quiet)
    heldout = encode_sentences(tok, corpus.heldout, model.context - 1)
    ppl = _perplexity(model, heldout)
    unigram = unigram_perplexity(encode_stream(tok, corpus.train), heldout, tok.get_vocab_size())
    ratio = ppl / unigram
    ok = f"held-out perplexity {ppl:.1f} = {ratio:.2f} x the unigram model's {unigram:.1f} (target <= {target}) " \
         f"in {steps} steps."
    if ratio <= target:
        return _result(name, None, ok, "", quiet)
    return _result(name, f"held-out perplexity {ppl:.1f} is {ratio:.2f} x the unigram model's {unigram:.1f}; the "
                         f"target is {target} (perplexity {target * unigram:.1f}), {ratio / target:.2f}x too high",
                   "", "look at the initialisation of the embeddings (tied to the output layer) and the learning rate.",
                   quiet)
