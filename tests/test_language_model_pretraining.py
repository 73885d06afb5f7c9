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
