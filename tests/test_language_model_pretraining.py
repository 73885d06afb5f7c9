"""Chapter 06: the corpus helpers, the GPT and the exercise checks (each must reject typical wrong answers)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ptcourse.chapters import language_model_pretraining as lm
from ptcourse.checks import language_model_pretraining as checks


# ----------------------------------------------------------------------------- corpus
def test_normalize_splits_contractions_like_sst2():
    assert lm.normalize("It's  GOOD, doesn't it? can't") == "it 's good, does n't it? ca n't"


def test_contained_finds_runs_of_words_and_exact_matches_only():
    sentences = ["It's a charming and often affecting journey ."]
    phrases = ["a charming and often", "charming journey and often", "a charming", "journey .",
               "it 's a charming and often affecting journey .", "often affecting journey"]
    assert lm.contained(phrases, sentences, min_words=4).tolist() == [True, False, False, False, True, False]
    assert lm.contained(["it 's a"], ["it's a"], min_words=4).tolist() == [True]   # an exact short match


def test_normalize_reconciles_sst_ptb_escapes_and_rotten_tomatoes_characters():
    """SST-2 writes brackets and quotes as PTB escapes, Rotten Tomatoes as characters (some typographic):
    the same snippet must normalise to one string, or the leak filter lets its pieces through."""
    sst = "a `` big chill '' reunion -lrb- of sorts -rrb- ... it 's fun -- mostly"
    rt = 'a "big chill" reunion (of sorts) \u2026it\u2019s fun \u2013 mostly'
    assert lm.normalize(sst) == lm.normalize(rt)
    assert lm.contained(["`` big chill '' reunion -lrb- of"], [rt], min_words=4).tolist() == [True]
    assert (lm.normalize("mr. nelson 's ` black culture ' cry ( 1984 ) , 10,000 times . . . ")
            == lm.normalize("mr . nelson's 'black culture' cry [ 1984 ] , 10 , 000 times ..."))


def test_ngram_contamination_counts_shared_runs_of_words_within_texts_only():
    ev = ["one two three four five six seven eight nine", "short sentence"]
    r = lm.ngram_contamination(ev, ["zero one two three four five six seven eight", "nine ten"], n=8)
    assert (r["eval_ngrams"], r["found"], r["sentences_hit"], r["share"]) == (2, 1, 1, 0.5)
    # an 8-gram split across two pretraining texts is not in the stream (<|endoftext|> between them)
    assert lm.ngram_contamination(ev, ["one two three four", "five six seven eight"], n=8)["found"] == 0
    # spelling differences are reconciled before matching
    assert lm.ngram_contamination(['a "big chill" reunion of the old gang'],
                                  ["a `` big chill '' reunion of the old gang"], n=8)["share"] == 1.0


def test_length_matched_gives_both_sides_the_same_shape():
    a = [[0] + list(range(1, k)) for k in (2, 5, 6, 9, 12)]
    b = [[0] + [7] * k for k in (3, 4, 8, 20)]
    x, y = lm.length_matched(a, b, length=5, seed=1)
    assert len(x) == len(y) == 3 and {len(s) for s in x + y} == {5}
    assert all(s in [t[:5] for t in a] for s in x)
    with pytest.raises(ValueError):
        lm.length_matched(a, b, length=5, n=4)


def test_warmup_stable_decay_short_run_is_a_branch_of_the_long_one():
    long, short = lm.warmup_stable_decay(1000, warmup=50), lm.warmup_stable_decay(250, warmup=50)
    assert [long(s) for s in range(200)] == [short(s) for s in range(200)]      # shared until the short decay
    assert short(249) == pytest.approx(1 / 50) and long(249) == 1.0 and long(999) == pytest.approx(1 / 200)  # annealed
    assert all(short(s) >= short(s + 1) for s in range(49, 250))


def test_prepare_corpus_removes_leaks_and_heldout_pieces():
    phrases = ["a charming and often affecting", "a charming and often affecting",   # leaked (duplicate)
               "the plot is a total mess", "plot is a total",                       # inside a held-out sentence
               "a gem of a film", "bad", "a film that works"] + [f"phrase number {i} here" for i in range(200)]
    corpus = lm.prepare_corpus(phrases, eval_sentences=["it 's a charming and often affecting journey ."],
                               heldout_sentences=["The plot is a total mess ."], naive_fraction=0.1, seed=0)
    assert "a charming and often affecting" not in corpus.train
    assert not any("total" in p for p in corpus.train + corpus.naive_heldout)
    assert corpus.heldout == ["the plot is a total mess ."]
    assert corpus.stats["leaked"] == 1 and corpus.stats["unique"] == len(phrases) - 1
    assert not set(corpus.train) & set(corpus.naive_heldout)
    assert 0 < len(corpus.naive_heldout) < 60
    assert len(corpus.train) + len(corpus.naive_heldout) == corpus.stats["unique"] - 1 - 2


def test_bpe_round_trip_and_special_ids():
    tok = lm.train_bpe(["a gem of a film", "a total mess of a film", "the film is a gem"] * 5, vocab_size=300)
    assert [tok.token_to_id(s) for s in lm.SPECIALS] == [lm.EOS_ID, lm.PAD_ID, lm.MASK_ID]
    assert tok.decode(tok.encode("a gem, unseen: über").ids) == "a gem, unseen: über"   # byte-level: no unknowns
    stream = lm.encode_stream(tok, ["a gem", "a mess"])
    assert (stream == lm.EOS_ID).sum() == 2 and stream[-1] == lm.EOS_ID


def test_random_windows_are_contiguous_and_seeded():
    stream = torch.arange(100)
    a, b = lm.RandomWindows(stream, 8, 5, seed=1), lm.RandomWindows(stream, 8, 5, seed=1)
    for i in range(5):
        w = a[i]
        assert len(w) == 9 and torch.equal(w, b[i]) and torch.equal(w[1:] - w[:-1], torch.ones(8, dtype=torch.long))


# ----------------------------------------------------------------------------- network and losses
def _model(**kw):
    torch.manual_seed(0)
    return lm.GPT(vocab_size=50, context=16, d_model=32, n_layers=2, n_heads=4, **kw)


def test_gpt_is_causal_and_tied():
    model = _model().eval()
    ids = torch.randint(3, 50, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(3, 50, (2, 5))
    with torch.no_grad():
        a, b = model(ids), model(changed)
        c, d = model(ids, causal=False), model(changed, causal=False)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])
    assert not torch.allclose(c[:, :7], d[:, :7])            # bidirectional: earlier outputs change
    assert model.head.weight is model.tok_emb.weight
    assert lm.count_parameters(model) < sum(p.numel() for p in model.parameters()) + 50 * 32
    assert abs(float(model.tok_emb.weight.detach().std()) - 0.02) < 0.005


def test_classifier_pooling_ignores_padding():
    body = _model()
    for pooling in ("mean", "last"):
        clf = lm.Classifier(body, pooling=pooling).eval()
        short = lm.collate_sentences([([0, 5, 6, 7], 1)])
        padded = lm.collate_sentences([([0, 5, 6, 7], 1), ([0, 5, 6, 7, 8, 9, 10, 11], 0)])
        with torch.no_grad():
            assert torch.allclose(clf(short["input_ids"], short["attention_mask"])[0],
                                  clf(padded["input_ids"], padded["attention_mask"])[0], atol=1e-5)
    bi = lm.Classifier(body, causal=False).eval()
    with torch.no_grad():
        assert torch.allclose(bi(short["input_ids"], short["attention_mask"])[0],
                              bi(padded["input_ids"], padded["attention_mask"])[0], atol=1e-5)


def test_next_token_loss_and_perplexity_agree():
    model = _model().eval()
    seqs = [[0, 4, 5, 6, 7], [0, 8, 9]]
    ids = lm.pad_batch(seqs)
    with torch.no_grad():
        loss = lm.next_token_loss(model(ids), ids)
    assert math.isclose(lm.perplexity(model, seqs), math.exp(float(loss)), rel_tol=1e-5)
    # padding is not counted: the short sentence alone gives the same sum of losses
    assert math.isclose(lm.perplexity(model, seqs[:1], batch_size=1) ** 4 * lm.perplexity(model, seqs[1:]) ** 2,
                        math.exp(float(loss)) ** 6, rel_tol=1e-4)
    assert lm.unigram_perplexity(torch.tensor([3, 3, 3, 4]), [[0, 3, 3]], 5) < 5


# ----------------------------------------------------------------------------- checks accept the right answers...
def _causal(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def _sample(logits, temperature=1.0, top_k=None):
    return torch.multinomial(checks.reference_next_token_probs(logits, temperature, top_k), 1).squeeze(-1)


def test_checks_accept_correct_answers():
    assert checks.check_causal_attention(_causal, quiet=True)
    assert checks.check_next_token_loss(lm.next_token_loss, quiet=True)
    assert checks.check_sample_next(_sample, quiet=True)


# ----------------------------------------------------------------------------- ... and reject the typical wrong ones
def test_causal_attention_check_rejects_missing_mask_wrong_direction_and_no_scaling():
    no_mask = lambda q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v
    def upper(q, k, v):
        T = q.shape[-2]
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~torch.ones(T, T, dtype=torch.bool).triu(), -1e9)
        return s.softmax(-1) @ v
    def unscaled(q, k, v):
        T = q.shape[-2]
        return (q @ k.transpose(-2, -1)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9).softmax(-1) @ v
    zeroed_after_softmax = lambda q, k, v: (no_mask(q, k, v) * 0 + (q @ k.transpose(-2, -1) / math.sqrt(
        q.shape[-1])).softmax(-1).tril() @ v)
    for wrong in (no_mask, upper, unscaled, zeroed_after_softmax):
        assert not checks.check_causal_attention(wrong, quiet=True)


def test_next_token_loss_check_rejects_unshifted_padded_and_reversed():
    def unshifted(logits, ids, pad_id):
        return F.cross_entropy(logits.flatten(0, 1), ids.masked_fill(ids == pad_id, -100).flatten(), ignore_index=-100)
    def with_padding(logits, ids, pad_id):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    def reversed_shift(logits, ids, pad_id):
        t = ids[:, :-1].masked_fill(ids[:, :-1] == pad_id, -100)
        return F.cross_entropy(logits[:, 1:].flatten(0, 1), t.flatten(), ignore_index=-100)
    r = checks.check_next_token_loss(unshifted, quiet=True)
    assert not r and "copy" in r.message
    r = checks.check_next_token_loss(with_padding, quiet=True)
    assert not r and "padding" in r.message
    assert not checks.check_next_token_loss(reversed_shift, quiet=True)
    assert not checks.check_next_token_loss(lambda lo, ids, p: lm.next_token_loss(lo, ids, p).detach(), quiet=True)


def test_sample_check_rejects_greedy_multiplied_temperature_and_ignored_top_k():
    greedy = lambda logits, t, k: logits.argmax(-1)
    multiplied = lambda logits, t, k: _sample(logits * t * t, t, k)          # logits * T instead of / T
    no_top_k = lambda logits, t, k: _sample(logits, t, None)
    no_temperature = lambda logits, t, k: _sample(logits, 1.0, k)
    r = checks.check_sample_next(greedy, quiet=True)
    assert not r and "greedy" in r.message
    for wrong in (multiplied, no_top_k, no_temperature):
        assert not checks.check_sample_next(wrong, quiet=True)


def test_stubs_are_let_through():
    def stub(*args):
        raise NotImplementedError("Exercise 1")
    for check in (checks.check_causal_attention, checks.check_next_token_loss, checks.check_sample_next):
        with pytest.raises(NotImplementedError):
            check(stub, quiet=True)


def test_pretraining_experiment_check_judges_the_outcome():
    phrases = [f"the film is {w} and the plot is {v}" for w in ("good", "bad", "fine", "dull") for v in
               ("thin", "rich", "long", "short")] * 3
    corpus = lm.prepare_corpus(phrases, eval_sentences=[], heldout_sentences=["the film is good and the plot is thin ."],
                               naive_fraction=0.0)
    tok = lm.train_bpe(corpus.train, vocab_size=300)
    torch.manual_seed(0)
    model = lm.GPT(tok.get_vocab_size(), context=16, d_model=32, n_layers=1, n_heads=2)
    untrained = checks.check_pretraining_experiment(model, tok, corpus, steps=0, max_steps=100, quiet=True)
    assert not untrained and "too high" in untrained.message
    stream = lm.encode_stream(tok, corpus.train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(80):
        batch = torch.stack([lm.RandomWindows(stream, 15, 16, seed=step)[i] for i in range(16)])
        loss = lm.next_token_loss(model(batch), batch)
        loss.backward(); opt.step(); opt.zero_grad()
    assert checks.check_pretraining_experiment(model, tok, corpus, steps=80, max_steps=100, quiet=True)
    assert not checks.check_pretraining_experiment(model, tok, corpus, steps=200, max_steps=100, quiet=True)
    leaky = lm.Corpus(corpus.train + corpus.heldout, corpus.heldout, [], {})
    assert not checks.check_pretraining_experiment(model, tok, leaky, steps=80, max_steps=100, quiet=True)


# ----------------------------------------------------------------------------- generating text
def test_cached_generation_gives_the_same_tokens_and_logits():
    model = _model(dropout=0.0).eval()
    prompt = torch.randint(3, 50, (3, 4))
    greedy = lm.generate(model, prompt, 12, temperature=0)
    assert greedy.shape == (3, 16) and torch.equal(greedy[:, :4], prompt)
    assert torch.equal(greedy, lm.generate(model, prompt, 12, temperature=0, use_cache=False))
    sampled = lm.generate(model, prompt, 12, top_p=0.9, seed=3)         # same draws: same logits, same random stream
    assert torch.equal(sampled, lm.generate(model, prompt, 12, top_p=0.9, seed=3, use_cache=False))
    with torch.no_grad():
        full = model(greedy)
        logits, caches = lm.forward_with_cache(model, greedy[:, :4])
        rows = [logits]
        for t in range(4, greedy.shape[1]):
            logits, caches = lm.forward_with_cache(model, greedy[:, t:t + 1], caches)
            rows.append(logits)
    assert caches[0][0].shape == (3, 4, 16, 8)                          # [B, heads, positions, d_head] per layer
    assert torch.allclose(torch.cat(rows, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError):                                    # a cache cannot slide past the context
        lm.forward_with_cache(model, torch.zeros(1, 1, dtype=torch.long), caches)


def test_a_cache_without_the_new_tokens_own_keys_would_be_caught():
    """The comparison can fail: a step that attends to the cache only (forgetting its own key) differs."""
    model = _model().eval()
    ids = torch.randint(3, 50, (2, 6))
    _, caches = lm.forward_with_cache(model, ids[:, :5])
    with torch.no_grad():
        full = model(ids)[:, -1]
        x = model.tok_emb(ids[:, 5:]) + model.pos_emb(torch.tensor([5]))
        for block, (k, v) in zip(model.blocks, caches):
            h = block.ln1(x)
            q = block.attn.qkv(h).split(32, dim=2)[0].view(2, 1, 4, 8).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v)                 # the past only: the new key is missing
            x = x + block.attn.proj(y.transpose(1, 2).reshape(2, 1, 32))
            x = x + block.mlp(block.ln2(x))
        wrong = model.head(model.ln_f(x))[:, -1]
    assert not torch.allclose(wrong, full, atol=1e-4)
    assert torch.allclose(lm.forward_with_cache(model, ids[:, 5:], caches)[0][:, -1], full, atol=1e-5)


def test_sample_next_greedy_top_p_and_suppress():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert lm.sample_next(logits, temperature=0).tolist() == [1]
    torch.manual_seed(0)
    draws = lm.sample_next(logits.expand(4000, -1), top_p=0.5)        # p(1) ~ .46 < .5: the nucleus is {1, 3}
    assert set(draws.tolist()) == {1, 3}
    peaked = torch.tensor([[9.0, 0.0, 0.0]])
    assert lm.top_p_filter(peaked, 0.99).isfinite().tolist() == [[True, False, False]]
    assert lm.top_p_filter(torch.zeros(1, 4), 0.5).isfinite().sum() == 2   # flat: half the tokens
    model = _model().eval()
    out = lm.generate(model, torch.tensor([[0, 5]]), 14, suppress=(lm.EOS_ID, 7), seed=0)
    assert not ((out[:, 2:] == lm.EOS_ID) | (out[:, 2:] == 7)).any()


def test_distinct_n_and_repeated_token_rate():
    assert lm.distinct_n([[1, 2, 3, 4]], 1) == 1.0 and lm.distinct_n([[5, 5, 5, 5]], 1) == 0.25
    assert lm.distinct_n([[1, 2, 1, 2, 1]], 2) == 0.5                    # (1,2) (2,1) (1,2) (2,1)
    assert lm.distinct_n([[1, 2], [2, 1]], 2) == 1.0                     # n-grams do not cross samples
    assert lm.repeated_token_rate([[1, 2, 3, 4]]) == 0.0 and lm.repeated_token_rate([[9, 9, 9]]) == 1.0
    assert lm.repeated_token_rate([[1, 2], [2, 1]]) == 0.0               # repeats are counted within a sample
    assert lm.repeated_token_rate([[1, 2, 3, 1]], window=2) == 0.0 and lm.repeated_token_rate([[1, 2, 3, 1]]) == 1 / 3


def test_to_gpt2_computes_the_same_logits():
    model = _model().eval()
    with torch.no_grad():                                                # weights far from their initial values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf = lm.to_gpt2(model).eval()
    assert hf.config.n_layer == 2 and hf.config.n_embd == 32 and hf.lm_head.weight is hf.transformer.wte.weight
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        tanh_gelu = lm.to_gpt2(model, activation="gelu_new").eval()(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())
    assert not torch.allclose(ours, tanh_gelu, atol=1e-4)                # GPT-2's own GELU is a different function
    state = model.state_dict()                                          # a mapping that forgets the transpose fails
    hf.transformer.h[0].mlp.c_fc.weight.data = state["blocks.0.mlp.0.weight"].reshape(32, 128).clone()
    with torch.no_grad():
        assert not torch.allclose(hf(ids).logits, ours, atol=1e-4)


# ----------------------------------------------------------------------------- the nucleus exercise's check
def test_top_p_check_accepts_the_right_answer_and_rejects_typical_wrong_ones():
    assert checks.check_top_p_filter(lm.top_p_filter, quiet=True)
    assert checks.check_top_p_filter(lambda lo, p: lm.top_p_filter(lo, p).nan_to_num(neginf=-1e9), quiet=True)

    def crossing_dropped(logits, p):                                    # cumsum > p: the token that crosses p is lost
        s, order = logits.sort(-1, descending=True)
        drop = s.softmax(-1).cumsum(-1) > p
        return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))

    def not_unsorted(logits, p):                                        # the sorted-order mask applied to the original order
        s, _ = logits.sort(-1, descending=True)
        probs = s.softmax(-1)
        return logits.masked_fill(probs.cumsum(-1) - probs >= p, float("-inf"))

    def top_k_instead(logits, p):
        kth = logits.topk(max(1, int(p * logits.shape[-1])), -1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    def cumsum_of_logits(logits, p):                                    # no softmax: sums logits, not probabilities
        s, order = logits.sort(-1, descending=True)
        drop = s.cumsum(-1) - s >= p
        return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))

    r = checks.check_top_p_filter(crossing_dropped, quiet=True)
    assert not r and "crosses" in r.message
    r = checks.check_top_p_filter(not_unsorted, quiet=True)
    assert not r and "scatter it back" in r.message
    for wrong in (top_k_instead, cumsum_of_logits, lambda lo, p: lo):
        assert not checks.check_top_p_filter(wrong, quiet=True)
    with pytest.raises(NotImplementedError):
        checks.check_top_p_filter(lambda lo, p: (_ for _ in ()).throw(NotImplementedError("Exercise 5")), quiet=True)


def _cached_attention(attn, x, cache, diagonal_offset=True, mask_new=True, keep_cache=True):
    """attention_step with one thing done wrong, for the check's tests."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, attn.n_heads, C // attn.n_heads).transpose(1, 2) for t in attn.qkv(x).split(C, 2))
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    past = k.shape[2] - T
    allowed = torch.ones(T, past + T, dtype=torch.bool).tril(diagonal=past if diagonal_offset else 0)
    if not mask_new:
        allowed[:] = True
    y = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    out = attn.proj(y.transpose(1, 2).reshape(B, T, C))
    return out, ((k, v) if keep_cache else (k[:, :, past:], v[:, :, past:]))


def test_check_kv_cache_step():
    assert checks.check_kv_cache_step(lm.attention_step, quiet=True)
    assert checks.check_kv_cache_step(_cached_attention, quiet=True)          # the slips' helper, done right

    def recomputes(attn, x, cache):                                            # projects the cached positions again
        attn.qkv(torch.cat([x, x], 1))
        return lm.attention_step(attn, x, cache)
    slips = {"projected": recomputes,
             "mask among the new": lambda a, x, c: _cached_attention(a, x, c, mask_new=False),
             "leaves out the cached": lambda a, x, c: _cached_attention(a, x, c, diagonal_offset=False),
             "should hold the keys": lambda a, x, c: _cached_attention(a, x, c, keep_cache=False),
             "expected (y, (k, v))": lambda a, x, c: lm.attention_step(a, x, c)[0]}
    for words, fn in slips.items():
        r = checks.check_kv_cache_step(fn, quiet=True)
        assert not r and words in r.message, (words, r.message)
    with pytest.raises(NotImplementedError):
        checks.check_kv_cache_step(lambda a, x, c: (_ for _ in ()).throw(NotImplementedError("Exercise 6")), quiet=True)


def test_check_gpt2_block_copy():
    def right(block, gpt2_block):
        for theirs, ours in lm.gpt2_block_pairs(block, gpt2_block):
            theirs.weight.copy_(ours.weight.T if type(theirs).__name__ == "Conv1D" else ours.weight)
            theirs.bias.copy_(ours.bias)
    assert checks.check_gpt2_block_copy(right, quiet=True)

    def untransposed(block, gpt2_block):                     # square matrices copy without an error
        for theirs, ours in lm.gpt2_block_pairs(block, gpt2_block):
            theirs.weight.copy_(ours.weight if theirs.weight.shape == ours.weight.shape else ours.weight.T)
            theirs.bias.copy_(ours.bias)

    def swapped_norms(block, gpt2_block):
        right(block, gpt2_block)
        gpt2_block.ln_1.weight.copy_(block.ln2.weight)

    def no_biases(block, gpt2_block):
        for theirs, ours in lm.gpt2_block_pairs(block, gpt2_block):
            theirs.weight.copy_(ours.weight.T if type(theirs).__name__ == "Conv1D" else ours.weight)
    slips = {"untransposed": untransposed, "h[0].ln_1 does not hold": swapped_norms,
             "does not hold its counterpart": no_biases,
             "raised RuntimeError": lambda b, h: h.attn.c_attn.weight.copy_(b.attn.qkv.weight)}
    for words, fn in slips.items():
        r = checks.check_gpt2_block_copy(fn, quiet=True)
        assert not r and words in r.message, (words, r.message)
    with pytest.raises(NotImplementedError):
        checks.check_gpt2_block_copy(lambda b, h: (_ for _ in ()).throw(NotImplementedError("Exercise 7")), quiet=True)
