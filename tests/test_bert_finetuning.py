"""Chapter 03: ptcourse.chapters.bert_finetuning (collate, length-grouped sampler, MLM masking) and the exercise checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import numpy as np

from ptcourse.checks.bert_finetuning import (check_attention, check_label_budget, check_mask_tokens, check_pad_collate,
                                          reference_attention)
from ptcourse.chapters.bert_finetuning import (LengthGroupedBatchSampler, MLMCollate, Tokenized, mask_tokens, pad_collate,
                                               padding_fraction, tfidf_baseline)


# ----------------------------------------------------------------------------- attention
def test_reference_attention_matches_torch_sdpa():
    q, k, v = torch.randn(3, 2, 3, 5, 8).unbind(0)
    keep = torch.arange(5) < torch.tensor([5, 2]).view(2, 1, 1, 1)
    for mask in (None, keep.expand(2, 3, 5, 5)):
        out, w = reference_attention(q, k, v, mask)
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(2, 3, 5))


def test_reference_attention_against_a_loop():
    q, k, v = torch.randn(3, 4, 6).unbind(0)
    out, _ = reference_attention(q, k, v)
    for i in range(4):
        s = torch.tensor([float(q[i] @ k[j]) / math.sqrt(6) for j in range(4)])
        w = s.exp() / s.exp().sum()
        assert torch.allclose(out[i], (w[:, None] * v).sum(0), atol=1e-5)


def _no_scale(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = s.softmax(-1)
    return w @ v, w


def _mask_after_softmax(q, k, v, mask=None):
    w = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    if mask is not None:
        w = w * mask
    return w @ v, w


def _softmax_over_queries(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = s.softmax(-2).nan_to_num()
    return w @ v, w


def _detached(q, k, v, mask=None):
    out, w = reference_attention(q, k, v, mask)
    return out.detach(), w.detach()


def test_check_attention():
    assert check_attention(reference_attention, quiet=True)
    for wrong in (_no_scale, _mask_after_softmax, _softmax_over_queries, _detached):
        assert not check_attention(wrong, quiet=True), wrong.__name__


def test_check_attention_lets_a_stub_through():
    def stub(q, k, v, mask=None):
        raise NotImplementedError("Exercise 1")
    with pytest.raises(NotImplementedError):
        check_attention(stub, quiet=True)


# ----------------------------------------------------------------------------- collate
def test_pad_collate_example_and_fixed_width():
    feats = [{"input_ids": [101, 7, 102], "label": 1}, {"input_ids": [101, 102], "label": 0}]
    b = pad_collate(feats)
    assert b["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in b.values())
    assert pad_collate(feats, pad_id=5, pad_to=6)["input_ids"].tolist()[1] == [101, 102, 5, 5, 5, 5]
    assert "labels" not in pad_collate([{"input_ids": [1, 2]}])


def _left_pad(features, pad_id=0):
    b = pad_collate(features, pad_id)
    L = b["input_ids"].shape[1]
    for r, f in enumerate(features):
        n = len(f["input_ids"])
        b["input_ids"][r] = torch.cat([torch.full((L - n,), pad_id), torch.tensor(f["input_ids"])])
        b["attention_mask"][r] = torch.cat([torch.zeros(L - n), torch.ones(n)]).long()
    return b


def test_check_pad_collate():
    assert check_pad_collate(lambda f, p=0: pad_collate(f, p), quiet=True)
    wrong = {
        "fixed width": lambda f, p=0: pad_collate(f, p, pad_to=16),
        "pad id ignored": lambda f, p=0: pad_collate(f, 0),
        "mask all ones": lambda f, p=0: {**pad_collate(f, p), "attention_mask": torch.ones_like(pad_collate(f, p)["attention_mask"])},
        "no labels": lambda f, p=0: {k: v for k, v in pad_collate(f, p).items() if k != "labels"},
        "left padding": _left_pad,
    }
    for name, fn in wrong.items():
        assert not check_pad_collate(fn, quiet=True), name


# ----------------------------------------------------------------------------- sampler
def test_length_grouped_sampler_covers_everything_once_and_groups_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (1000,), generator=g).tolist()
    sampler = LengthGroupedBatchSampler(lengths, batch_size=32, group=10, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 32
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10                               # random batches of 32 would spread over ~50 tokens
    assert [b for b in sampler] != batches           # a new order every epoch


def test_length_grouped_sampler_shuffles_a_set_smaller_than_its_chunk():
    """A set that fits in one chunk must not be cut into the same sorted batches every epoch.

    With 200 sentences, batches of 8 and chunks of 50 batches, one chunk holds the whole set: sorted
    by length, it gives the same 25 batches every epoch (only their order changes), so the model
    sees the same groups of sentences, one per step, epoch after epoch.
    """
    lengths = torch.randperm(200, generator=torch.Generator().manual_seed(0)).add(3).tolist()   # all different
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, group=50, seed=0)
    epochs = [list(sampler) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(200))
    contents = [{frozenset(b) for b in batches} for batches in epochs]
    assert contents[0] != contents[1] and contents[1] != contents[2]
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epochs[0]])
    assert spread < 200 / 4                          # still grouped: random batches of 8 spread over ~155


class _FakeTokenizer:
    pad_token_id, mask_token_id, all_special_ids = 0, 103, [0, 100, 101, 102, 103]

    def __call__(self, texts, truncation=True, max_length=128):
        return {"input_ids": [[101] + [1000 + len(w) for w in t.split()][:max_length - 2] + [102] for t in texts]}

    def __len__(self):
        return 2000


def test_tokenized_and_padding_fraction():
    tok = _FakeTokenizer()
    ds = Tokenized(["a b c", "a", "a b c d e f"], [1, 0, 1], tok, max_length=6)
    assert ds.lengths == [5, 3, 6] and ds[1] == {"input_ids": [101, 1001, 102], "label": 0}
    from torch.utils.data import DataLoader
    one_batch = padding_fraction(DataLoader(ds, batch_size=3, collate_fn=pad_collate))
    assert one_batch == pytest.approx((1 + 3 + 0) / 18)
    assert padding_fraction(DataLoader(ds, batch_size=1, collate_fn=pad_collate)) == 0


# ----------------------------------------------------------------------------- masking
def test_mask_tokens_invariants_and_rates():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (400, 100), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -20:] = True
    before = ids.clone()
    inputs, labels = mask_tokens(ids, special, mask_id=3, vocab_size=500, generator=g)
    assert torch.equal(ids, before)
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.01
    assert abs((inputs[chosen] == 3).float().mean() - 0.8) < 0.03


def test_mlm_collate_never_masks_special_tokens():
    tok = _FakeTokenizer()
    feats = [{"input_ids": [101] + list(range(1000, 1000 + n)) + [102]} for n in (5, 30, 12)] * 50
    b = MLMCollate(tok, prob=0.5)(feats)
    chosen = b["labels"] != -100
    assert chosen.any()
    assert not chosen[b["attention_mask"] == 0].any()
    assert not chosen[:, 0].any()


def _no_random(ids, special, mask_id, vocab, prob=0.15):
    chosen = (torch.rand(ids.shape) < prob) & ~special
    return torch.where(chosen & (torch.rand(ids.shape) < 0.9), mask_id, ids), torch.where(chosen, ids, -100)


def _masks_specials(ids, special, mask_id, vocab, prob=0.15):
    return mask_tokens(ids, torch.zeros_like(special), mask_id, vocab, prob)


def _labels_everywhere(ids, special, mask_id, vocab, prob=0.15):
    inputs, _ = mask_tokens(ids, special, mask_id, vocab, prob)
    return inputs, ids.clone()


def _in_place(ids, special, mask_id, vocab, prob=0.15):
    inputs, labels = mask_tokens(ids, special, mask_id, vocab, prob)
    ids.copy_(inputs)
    return ids, labels


def _all_masked(ids, special, mask_id, vocab, prob=0.15):
    chosen = (torch.rand(ids.shape) < prob) & ~special
    return torch.where(chosen, mask_id, ids), torch.where(chosen, ids, -100)


def test_check_mask_tokens():
    assert check_mask_tokens(lambda *a: mask_tokens(*a), quiet=True)
    for wrong in (_no_random, _masks_specials, _labels_everywhere, _in_place, _all_masked,
                  lambda i, s, m, v, p=0.15: mask_tokens(i, s, m, v, 0.3)):
        assert not check_mask_tokens(wrong, quiet=True)


# ----------------------------------------------------------------------------- TF-IDF baseline, the experiment's check
def _toy_split(n, seed, noise=0.25):
    """Sentences whose sentiment words carry the label, with ``noise`` of the labels flipped."""
    rng = np.random.default_rng(seed)
    pos, neg, filler = ["great", "moving", "superb"], ["dull", "awful", "tedious"], ["film", "plot", "cast", "the", "a"]
    texts, labels = [], []
    for _ in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(filler, 4)) + [str(rng.choice(pos if y else neg))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(y if rng.random() > noise else 1 - y)
    return texts, np.array(labels)


TOY = {"train": _toy_split(400, 0), "validation": _toy_split(300, 1), "test": _toy_split(300, 2)}


def _oracle(split):
    truth = {}
    for t, y in zip(*TOY[split]):
        truth.setdefault(t, y)
    return lambda texts: np.array([truth.get(t, 0) for t in texts])


def _clean_rule(texts):   # what a perfect reader of the sentiment words predicts
    return np.array([int(any(w in t.split() for w in ("great", "moving", "superb"))) for t in texts])


def test_tfidf_baseline_tunes_C_on_validation_and_learns():
    tr, va, te = TOY["train"], TOY["validation"], TOY["test"]
    r = tfidf_baseline(tr[0][:200], tr[1][:200], va[0], va[1], te[0], te[1], Cs=(0.001, 1.0, 100.0))
    assert r["C"] in (1.0, 100.0) and r["val_acc"] > 0.65 and r["test_acc"] > 0.65
    assert r["val_acc"] == pytest.approx(float((r["val_pred"] == va[1]).mean()))
    assert tfidf_baseline(tr[0][:50], tr[1][:50], va[0], va[1])["test_acc"] is None


def test_tfidf_baseline_records_its_search_and_extends_a_choice_at_an_edge():
    tr, va = TOY["train"], TOY["validation"]
    r = tfidf_baseline(tr[0][:200], tr[1][:200], va[0], va[1], Cs=(0.001, 0.01), name="C toy", max_extend=1)
    s = r["search"]
    assert s.name == "C toy" and s.chosen == r["C"] and s.best == r["val_acc"]
    assert len(s.grid) == 3 and s.extended == 1        # a two-value grid always chooses at an end: one value added
    assert s.to_dict()["val"] == [float(v) for v in s.scores]


def test_check_label_budget_passes_an_honest_win_and_says_how_far():
    idx = np.arange(30)
    ours = float((_clean_rule(TOY["validation"][0]) == TOY["validation"][1]).mean())
    r = check_label_budget(_clean_rule, idx, ours, data=TOY, quiet=True)
    assert r, r.message
    assert "30 labelled sentences" in r.message and "points" in r.message and "test, looked at once" in r.message


def test_check_label_budget_fails_on_a_loss_a_test_claim_and_bad_indices():
    idx = np.arange(300)
    chance = lambda texts: np.zeros(len(texts), dtype=int)
    acc = float((chance(TOY["validation"][0]) == TOY["validation"][1]).mean())
    r = check_label_budget(chance, idx, acc, data=TOY, quiet=True)
    assert not r and "BELOW" in r.message
    base = tfidf_baseline([TOY["train"][0][i] for i in idx], TOY["train"][1][idx], *TOY["validation"])
    same = lambda t: base["val_pred"] if list(t) == list(TOY["validation"][0]) else chance(t)   # the baseline itself
    tie = check_label_budget(same, idx, base["val_acc"], data=TOY, quiet=True)
    assert not tie and "TIES" in tie.message
    # a claim that is the test accuracy: the budget was chosen on test
    test_oracle = _oracle("test")
    val_acc = float((test_oracle(TOY["validation"][0]) == TOY["validation"][1]).mean())
    test_acc = float((test_oracle(TOY["test"][0]) == TOY["test"][1]).mean())
    assert abs(val_acc - test_acc) > 0.01
    r = check_label_budget(test_oracle, np.arange(30), test_acc, data=TOY, quiet=True)
    assert not r and "TEST accuracy" in r.message
    assert not check_label_budget(_clean_rule, [1, 1, 2], 0.7, data=TOY, quiet=True)
    assert not check_label_budget(_clean_rule, [0, 10_000], 0.7, data=TOY, quiet=True)
    assert not check_label_budget(_clean_rule, np.arange(30), 0.1, data=TOY, quiet=True)
    assert not check_label_budget(lambda t: np.zeros(3), np.arange(30), 0.7, data=TOY, quiet=True)


# ----------------------------------------------------------------------------- the chapter's protocol
def _chapter_code():
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).resolve().parent.parent / "chapters" / "03_bert_finetuning.ipynb").read_text("utf-8"))
    return [("".join(c["source"]), c["cell_type"]) for c in nb["cells"]]


def test_chapter_chooses_on_validation_reports_on_test_and_records_it():
    cells = _chapter_code()
    code = [s for s, kind in cells if kind == "code"]
    helpers = next(s for s in code if "def val_correct(" in s)
    assert "val_loader" in helpers.split("def val_correct(")[1] and "test_loader" not in helpers.split("def val_correct(")[1]
    sweep = next(s for s in code if 'compare.search(f"lr {kind} @ {n} labels"' in s)   # every budget, both networks
    assert "val_correct(" in sweep and "test" not in sweep and 'extend="geometric"' in sweep
    probe = next(s for s in code if "def frozen_probe(" in s)
    assert "val_feats, val_set.labels" in probe.split("compare.search(")[1].split("return")[0]
    runs = next(s for s in code if "test_acc[kind][n].append" in s)
    assert "test_loader" in runs and "best_lr[kind][n]" in runs
    verdict = next(s for s in code if "strongest[n] = max(" in s)
    assert "val_acc" in verdict and "compare.Verdict(" in verdict
    trainer = next(s for s in code if "Trainer(" in s)
    assert "eval_dataset=val_set" in trainer and "test" not in trainer       # a demo of a tool: never the test split
    report = next(s for s in code if "ptcourse.report(" in s)
    assert "searches=searches" in report and "verdicts=verdicts" in report
    assert any("compare.holm(verdicts)" in s for s in code)
    assert any(s.strip() == "<!-- measured:03_bert_finetuning -->" or s.startswith("<!-- measured:03_bert_finetuning -->")
               for s, kind in cells if kind == "markdown")
    settings = next(s for s in code if "BUDGETS = P.pick(" in s)
    assert "None" not in settings                                          # every size an explicit number
