"""Chapter 06's helpers: a leak-free pretraining corpus, a byte-level BPE, a small GPT, LM batches,
decoding (greedy, top-k, nucleus; a KV cache), sample statistics, and the GPT as ``transformers``' GPT-2.

The chapter writes its GPT in the notebook, to be read; :class:`GPT` here is the same network,
for the exercises, the checks and the tests.

Example:
    >>> from ptcourse.chapters.language_model_pretraining import prepare_corpus, train_bpe, GPT
    >>> corpus = prepare_corpus(sst2_phrases, eval_sentences=rt_val + rt_test, heldout_sentences=sst2_val)
    >>> tok = train_bpe(corpus.train, vocab_size=2048)
    >>> model = GPT(vocab_size=tok.get_vocab_size(), context=64)
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..metrics import count_parameters  # noqa: F401  (the chapter imports it from here)

SPECIALS = ("<|endoftext|>", "<pad>", "<mask>")   # ids 0, 1, 2 in a tokenizer from :func:`train_bpe`
EOS_ID, PAD_ID, MASK_ID = 0, 1, 2


# ----------------------------------------------------------------------------- the corpus
# Penn-treebank escapes (SST writes them) and typographic characters (Rotten Tomatoes has some),
# each mapped to the plain form both datasets can agree on
PTB_TOKENS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}",
              "``": '"', "''": '"'}
TYPOGRAPHIC = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--", "\u2014": "--",
               "\u00a0": " ", "\u2044": "/"}


def normalize(text: str) -> str:
    """One spelling for the same words in SST-2 and Rotten Tomatoes, so that a leak is found.

    The two datasets hold the same review snippets written differently: SST-2 splits contractions
    the Penn-treebank way (``it 's``, ``does n't``) and escapes brackets and quotes as ``-lrb-``,
    ``-rrb-``, `````` and ``''``; Rotten Tomatoes writes ``it's``, ``(``, ``"``, and has typographic
    characters (``…``, ``–``, curly quotes), ``. . .`` for ``...``, square brackets where SST has
    round ones, ``mr.`` and ``10,000`` where RT has ``mr .`` and ``10 , 000``, and single quotes
    attached to words (``'black culture'``, SST: ```` ` black culture '````).
    Both sides become: Unicode NFKC, ASCII dashes and quotes, PTB escapes as the characters they
    stand for, every bracket round, quotes, brackets, ``...`` and ``--`` split off the words,
    contractions split, lower case, single spaces.

    Example:
        >>> normalize("It's  a film that doesn't work.")
        "it 's a film that does n't work ."
        >>> normalize("a `` big chill '' -LRB- sort of -RRB- reunion") == normalize('a "big chill" (sort of) reunion')
        True
        >>> normalize("\u2026an odd \u2013 film")
        '... an odd -- film'
    """
    text = unicodedata.normalize("NFKC", text.lower())
    for a, b in TYPOGRAPHIC.items():
        text = text.replace(a, b)
    text = " ".join(PTB_TOKENS.get(w, w) for w in text.split()).replace("`", "'")
    text = re.sub(r"\.\s\.\s\.", "...", text)                       # ". . ." -> "..."
    text = text.translate(str.maketrans("[]{}", "()()"))              # SST turned every bracket into ( )
    text = re.sub(r'(\.\.\.|--|["()])', r" \1 ", text)
    text = re.sub(r"(?<=\w)\.(?=\s|$)", " .", text)                   # mr. nelson -> mr . nelson
    text = re.sub(r"(?<=\d),(?=\d)", " , ", text)                      # 10,000 -> 10 , 000
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)
    text = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", text)
    text = re.sub(r"(?<!\S)'(?!(?:s|re|ve|ll|d|m)\b)(?=\S)", "' ", text)  # an opening quote: 'black -> ' black
    text = re.sub(r"(?<=\w)'(?=\s|$)", " '", text)                     # a closing one: culture' -> culture '
    return " ".join(text.split())


def word_spans(text: str, min_words: int = 4):
    """Every run of at least ``min_words`` consecutive words of ``normalize(text)``, as strings."""
    words = normalize(text).split()
    n = len(words)
    for i in range(n):
        for j in range(i + min_words, n + 1):
            yield " ".join(words[i:j])


def contained(phrases, sentences, min_words: int = 4) -> np.ndarray:
    """Which ``phrases`` occur in one of ``sentences``: True for a phrase of at least ``min_words``
    words that is a run of consecutive words of a sentence, and for a phrase equal to a sentence.

    Example:
        >>> contained(["a charming film", "a charming and often affecting"],
        ...           ["it 's a charming and often affecting journey ."]).tolist()
        [False, True]
    """
    spans = set()
    for s in sentences:
        spans.update(word_spans(s, min_words))
    whole = {normalize(s) for s in sentences}
    out = np.zeros(len(phrases), dtype=bool)
    for i, p in enumerate(phrases):
        q = normalize(p)
        out[i] = q in whole or (len(q.split()) >= min_words and q in spans)
    return out


@dataclass
class Corpus:
    """Pretraining text: ``train`` (phrases), ``heldout`` (whole sentences, never trained on),
    ``naive_heldout`` (phrases held out at random, the *wrong* split, kept for comparison), and
    ``stats`` (how many phrases each rule removed)."""

    train: list
    heldout: list
    naive_heldout: list
    stats: dict = field(default_factory=dict)


def prepare_corpus(phrases, eval_sentences, heldout_sentences, *, min_words: int = 4,
                   naive_fraction: float = 0.02, seed: int = 0) -> Corpus:
    """Unlabeled pretraining text without leaks, and a held-out set split by source sentence.

    1. **Leak removal**: drop every phrase contained in an evaluation sentence (``contained``:
       runs of ``min_words`` or more words, and exact matches). The classifier is later scored on
       those sentences; pretraining on their pieces would let the LM memorise the test set.
    2. **Held-out by sentence**: ``heldout_sentences`` are whole sentences split off by their
       source (SST-2's validation sentences, separated from its training sentences by the
       dataset's authors). Every training phrase contained in one of them is dropped too, so
       no piece of a held-out sentence is ever trained on.
    3. **The naive split**, for comparison only: a random ``naive_fraction`` of the remaining
       phrases held out by position. Their neighbours (the longer and shorter phrases cut from
       the same sentence) stay in training, so their perplexity measures memorisation.

    Duplicates are removed first (SST-2 repeats phrases).
    """
    seen, unique = set(), []
    for p in phrases:
        q = normalize(p)
        if q and q not in seen:
            seen.add(q)
            unique.append(q)
    heldout = list(dict.fromkeys(normalize(s) for s in heldout_sentences))
    leak = contained(unique, eval_sentences, min_words)
    inside_heldout = contained(unique, heldout, min_words)
    keep = [p for p, a, b in zip(unique, leak, inside_heldout) if not (a or b)]
    rng = np.random.default_rng(seed)
    naive = rng.random(len(keep)) < naive_fraction
    train = [p for p, n in zip(keep, naive) if not n]
    naive_heldout = [p for p, n in zip(keep, naive) if n]
    long = np.array([len(p.split()) >= min_words for p in unique])
    whole = {normalize(s) for s in eval_sentences}
    stats = {"phrases": len(phrases), "unique": len(unique),
             f"unique_{min_words}plus_words": int(long.sum()),
             "leaked": int(leak.sum()), f"leaked_{min_words}plus_words": int((leak & long).sum()),
             "leaked_whole_sentences": int(sum(q in whole for q in unique)),
             "inside_heldout": int((inside_heldout & ~leak).sum()),
             "train": len(train), "naive_heldout": len(naive_heldout), "heldout": len(heldout)}
    return Corpus(train, heldout, naive_heldout, stats)


def ngram_contamination(eval_sentences, pretraining_texts, n: int = 8) -> dict:
    """How much of the evaluation text the pretraining text still contains: an audit after filtering.

    Every run of ``n`` consecutive words (after :func:`normalize`) of every evaluation sentence is
    looked up among the ``n``-grams of the pretraining texts (each text on its own: the stream puts
    ``<|endoftext|>`` between them, so no ``n``-gram spans two). ``share`` is the fraction of the
    evaluation ``n``-grams found; ``sentences_hit`` how many evaluation sentences have at least one.
    A leak filter that works leaves both near 0; one that misses a spelling difference does not.
    (Eight words is the unit of GPT-3's and later contamination studies: short enough to catch a
    copied clause, long enough that chance matches are rare.)

    Example:
        >>> r = ngram_contamination(["one two three four five six seven eight nine"],
        ...                         ["zero one two three four five six seven eight", "unrelated text"])
        >>> r["eval_ngrams"], r["found"], r["sentences_hit"]
        (2, 1, 1)
    """
    seen = set()
    for t in pretraining_texts:
        w = normalize(t).split()
        seen.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = found = hit = 0
    for s in eval_sentences:
        w = normalize(s).split()
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        k = sum(g in seen for g in grams)
        total, found, hit = total + len(grams), found + k, hit + (k > 0)
    return {"n": n, "eval_sentences": len(eval_sentences), "eval_ngrams": total, "found": found,
            "share": found / total if total else 0.0, "sentences_hit": hit}


# ----------------------------------------------------------------------------- the tokenizer
def train_bpe(texts, vocab_size: int = 2048, min_frequency: int = 2):
    """A byte-level BPE (GPT-2's kind) trained on ``texts`` with Hugging Face ``tokenizers``.

    Special tokens: ``<|endoftext|>`` (id 0, between documents and at the start of a sentence),
    ``<pad>`` (id 1) and ``<mask>`` (id 2, for the masked-LM comparison).

    Example:
        >>> tok = train_bpe(["a gem of a film", "a mess"], vocab_size=300)
        >>> tok.decode(tok.encode("a gem").ids)
        'a gem'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return tok


def encode_stream(tok, texts) -> torch.Tensor:
    """All ``texts`` as one long token stream, each followed by ``<|endoftext|>`` (int64)."""
    ids = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def encode_sentences(tok, texts, context: int) -> list[list[int]]:
    """Each text as ``[<|endoftext|>, tokens...]``, cut to ``context + 1`` ids (for next-token
    evaluation: inputs are the first ``context``, targets the last ``context``)."""
    return [[EOS_ID] + e.ids[:context] for e in tok.encode_batch(list(texts))]


class RandomWindows(Dataset):
    """``length`` random windows of ``context + 1`` consecutive tokens from ``stream`` (nanoGPT's
    ``get_batch``): inputs are ``window[:-1]``, next-token targets ``window[1:]``. The windows
    are drawn once, from ``seed``, so two runs with the same seed see the same data."""

    def __init__(self, stream: torch.Tensor, context: int, length: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(stream) - context - 1, (length,), generator=g)
        self.stream, self.context = stream, context

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        return self.stream[s: s + self.context + 1]


def pad_batch(seqs, pad_id: int = PAD_ID) -> torch.Tensor:
    """Right-pad lists of ids to the longest one: a ``[B, L]`` long tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def length_matched(a, b, length: int, n: int | None = None, seed: int = 0):
    """Two sets of sequences cut to the same shape, so that their perplexities can be compared.

    Perplexity depends on where in a sequence the tokens are (the first tokens, with little
    context, are the hardest), so a set of short phrases and a set of long sentences differ even
    for the same model. Here both sides keep only sequences with at least ``length`` ids, each cut
    to its first ``length`` ids, and the same number ``n`` of them (default: as many as the smaller
    side has), drawn at random with ``seed``: the same number of targets at the same context lengths.

    Example:
        >>> a, b = length_matched([[0, 5, 6, 7], [0, 5]], [[0, 1, 2, 3, 4], [0, 9, 9, 9]], length=3)
        >>> a, sorted(map(len, b)), len(b)
        ([[0, 5, 6]], [3], 1)
    """
    rng = np.random.default_rng(seed)
    long_a, long_b = [s for s in a if len(s) >= length], [s for s in b if len(s) >= length]
    n = min(len(long_a), len(long_b)) if n is None else n
    if n > min(len(long_a), len(long_b)):
        raise ValueError(f"only {min(len(long_a), len(long_b))} sequences of {length}+ ids on one side, not {n}")
    pick = lambda seqs: [list(seqs[i][:length]) for i in sorted(rng.choice(len(seqs), n, replace=False))]
    return pick(long_a), pick(long_b)


def warmup_stable_decay(total: int, warmup: int, decay_fraction: float = 0.2):
    """A learning-rate multiplier for ``LambdaLR``: linear warmup, constant, linear decay to 0.

    The last ``decay_fraction`` of the ``total`` steps anneal the rate to zero. Because the rate
    before the decay does not depend on ``total``, a run of ``total`` steps is the same as a longer
    run up to ``total * (1 - decay_fraction)`` steps, followed by its own decay: shorter complete
    (annealed) runs can branch off a long one at the cost of their decay steps only
    (Hägele et al. 2024, "Scaling laws and compute-optimal training beyond fixed training durations").

    Example:
        >>> f = warmup_stable_decay(100, warmup=10)
        >>> [round(f(s), 2) for s in (0, 9, 50, 80, 90, 99)]
        [0.1, 1.0, 1.0, 1.0, 0.5, 0.05]
    """
    start = int(round(total * (1 - decay_fraction)))

    def multiplier(step):
        if step < warmup:
            return (step + 1) / warmup
        if step < start:
            return 1.0
        return max(0.0, (total - step) / max(1, total - start))
    return multiplier


# ----------------------------------------------------------------------------- the losses
def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Mean cross-entropy of predicting ``ids[:, t+1]`` from ``logits[:, t]``, padding ignored.

    ``logits`` ``[B, T, V]`` is the model's output for ``ids`` ``[B, T]``.
    """
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def perplexity(model, seqs, batch_size: int = 128, pad_id: int = PAD_ID) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over every real token of ``seqs``
    (lists of ids starting with ``<|endoftext|>``); padding is not counted."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids = pad_batch(seqs[i:i + batch_size], pad_id).to(device)
        logits = model(ids)
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    model.train(was)
    return math.exp(total / count)


def unigram_perplexity(train_stream: torch.Tensor, seqs, vocab_size: int) -> float:
    """Perplexity of the unigram model (token frequencies of ``train_stream``, add-one smoothed)
    on the next-token targets of ``seqs``: the bar any language model must clear."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    targets = torch.cat([torch.as_tensor(s[1:]) for s in seqs])
    return math.exp(-float(logp[targets].mean()))


# ----------------------------------------------------------------------------- the network
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; ``causal=True`` lets position t see positions <= t only."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, causal: bool = True, key_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        mask = None
        if key_mask is not None:                      # [B, T] True for real tokens
            mask = key_mask[:, None, None, :].bool()
        if causal:
            tril = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = tril if mask is None else mask & tril
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, causal=True, key_mask=None):
        x = x + self.drop(self.attn(self.ln1(x), causal, key_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """A small GPT: token + position embeddings, ``n_layers`` blocks, a final LayerNorm and an
    output layer that shares its weights with the token embedding (weight tying). Every weight
    is drawn from N(0, ``init_std``²) (0.02, as GPT-2), biases start at 0.

    ``model(ids)`` gives next-token logits ``[B, T, V]``; ``model.hidden(ids)`` the final hidden
    states ``[B, T, d]``; ``causal=False`` makes it bidirectional (the masked-LM comparison).

    Example:
        >>> model = GPT(vocab_size=2048, context=64, d_model=128, n_layers=4, n_heads=4)
        >>> model(torch.zeros(2, 10, dtype=torch.long)).shape
        torch.Size([2, 10, 2048])
    """

    def __init__(self, vocab_size: int, context: int = 64, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, dropout: float = 0.0, init_std: float | None = 0.02):
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight                 # weight tying
        if init_std is not None:
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0.0, init_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def hidden(self, ids, causal: bool = True, key_mask=None):
        T = ids.shape[1]
        if T > self.context:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.context}).")
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x, causal, key_mask)
        return self.ln_f(x)

    def forward(self, ids, causal: bool = True, key_mask=None):
        return self.head(self.hidden(ids, causal, key_mask))


class Classifier(nn.Module):
    """A sentence classifier on a GPT body: pool its hidden states, then one linear layer.

    ``pooling="mean"`` averages the states of the real tokens; ``"last"`` takes the last real
    token's state (in a causal model, the only position that has seen the whole sentence).
    ``causal`` is passed to the body (False for a masked-LM body, which was trained bidirectional).

    ``model(input_ids, attention_mask)`` returns logits ``[B, n_classes]`` (a ``labels`` key in the
    batch is accepted and ignored, so ``ptcourse.fit`` can pass Hugging Face style dict batches).
    """

    def __init__(self, body: GPT, n_classes: int = 2, pooling: str = "mean", causal: bool = True):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', not {pooling!r}")
        self.body, self.pooling, self.causal = body, pooling, causal
        d = body.tok_emb.embedding_dim
        self.head = nn.Linear(d, n_classes)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.bool()
        h = self.body.hidden(input_ids, causal=self.causal, key_mask=None if self.causal else mask)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            last = mask.long().sum(1) - 1
            pooled = h[torch.arange(len(h), device=h.device), last]
        return self.head(pooled)


class SentenceDataset(Dataset):
    """Sentences encoded once (``[<|endoftext|>] + tokens``, at most ``context`` ids) with labels."""

    def __init__(self, tok, texts, labels, context: int):
        self.ids = [[EOS_ID] + e.ids[:context - 1] for e in tok.encode_batch(list(texts))]
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], int(self.labels[i])


def collate_sentences(items, pad_id: int = PAD_ID) -> dict:
    """A batch of ``(ids, label)`` as ``{"input_ids", "attention_mask", "labels"}`` (right-padded)."""
    ids = pad_batch([i for i, _ in items], pad_id)
    lengths = torch.tensor([len(i) for i, _ in items])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in items])}


# ----------------------------------------------------------------------------- generating text
def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k filtering: the logits with every token outside the ``top_k`` largest set to ``-inf``
    (ties with the k-th largest are kept).

    Example:
        >>> top_k_filter(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2).isfinite().tolist()
        [[True, True, False, False]]
    """
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) filtering: keep the smallest set of likeliest tokens whose probabilities sum
    to at least ``top_p``, set the other logits to ``-inf`` (Holtzman et al. 2020).

    A token is kept when the probability of the tokens ranked above it is below ``top_p``, so the
    likeliest token is always kept and the token that crosses ``top_p`` is kept too. The logits are
    taken as they are (divide by a temperature first if you want one).

    Example:
        >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)   # probs .64 .24 .09 .03
        >>> top_p_filter(logits, 0.8).isfinite().tolist()
        [[True, True, False, False]]
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs                 # mass of the tokens ranked above each one
    drop_sorted = above >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)   # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from logits ``[B, V]``: greedy when ``temperature == 0`` (the argmax),
    else a draw from softmax(logits / T) restricted to the ``top_k`` largest logits (:func:`top_k_filter`)
    and/or the nucleus of mass ``top_p`` (:func:`top_p_filter`).

    Example:
        >>> sample_next(torch.tensor([[0.0, 3.0, 1.0]]), temperature=0).tolist()
        [1]
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)


def attention_step(attn: CausalSelfAttention, x: torch.Tensor, cache=None):
    """Causal self-attention of the *new* positions ``x`` ``[B, T_new, d]`` over the cached keys
    and values of the earlier positions (``cache = (k, v)``, each ``[B, heads, T_past, d_h]``, or
    None) and their own. Returns the output ``[B, T_new, d]`` and the cache extended by the new
    positions' keys and values: only the new positions are projected.

    Example:
        >>> attn = CausalSelfAttention(32, n_heads=4).eval()
        >>> x = torch.randn(1, 5, 32)
        >>> _, cache = attention_step(attn, x[:, :4])
        >>> y, cache = attention_step(attn, x[:, 4:], cache)
        >>> cache[0].shape, torch.allclose(y, attn(x)[:, 4:], atol=1e-5)
        (torch.Size([1, 4, 5, 8]), True)
    """
    B, T, C = x.shape
    q, k, v = attn.qkv(x).split(C, dim=2)
    q, k, v = (t.view(B, T, attn.n_heads, C // attn.n_heads).transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    past = k.shape[2] - T
    allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # new query i sees keys <= past + i
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    y = scores.softmax(dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


def forward_with_cache(model: GPT, ids: torch.Tensor, caches=None):
    """Next-token logits ``[B, T_new, V]`` of the new tokens ``ids`` ``[B, T_new]`` that follow the
    positions held in ``caches`` (one ``(k, v)`` per layer from an earlier call; None: ``ids`` is
    the start). Returns ``(logits, caches)``. Calling it on a prompt, then on one token at a time,
    gives the same logits as ``model`` on the whole sequence, with each position computed once.

    Example:
        >>> model = GPT(vocab_size=50, context=16, d_model=32, n_layers=2).eval()
        >>> ids = torch.randint(0, 50, (1, 6))
        >>> a, caches = forward_with_cache(model, ids[:, :5])
        >>> b, caches = forward_with_cache(model, ids[:, 5:], caches)
        >>> torch.allclose(b[:, -1], model(ids)[:, -1], atol=1e-5)
        True
    """
    start = 0 if caches is None else caches[0][0].shape[2]
    T = ids.shape[1]
    if start + T > model.context:
        raise ValueError(f"{start + T} positions are more than the context ({model.context}): "
                         "a cache cannot slide, the positions of the cached keys would change.")
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(start, start + T, device=ids.device))
    new_caches = []
    for block, cache in zip(model.blocks, caches or [None] * len(model.blocks)):
        a, cache = attention_step(block.attn, block.ln1(x), cache)
        x = x + a
        x = x + block.mlp(block.ln2(x))
        new_caches.append(cache)
    return model.head(model.ln_f(x)), new_caches


@torch.no_grad()
def generate(model: GPT, prompt_ids: torch.Tensor, n_new: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             seed: int | None = None, suppress=()) -> torch.Tensor:
    """Continue ``prompt_ids`` ``[B, P]`` by ``n_new`` tokens (no stop at ``<|endoftext|>``) with
    :func:`sample_next` (``temperature=0``: greedy). ``use_cache=True`` runs the prompt once, then
    only the newest token per step (:func:`forward_with_cache`); ``False`` reruns the model on the
    whole sequence at every step. Both give the same tokens. ``suppress``: token ids never generated
    (``(EOS_ID,)`` makes every sample run the full length, like Hugging Face's ``min_new_tokens``).
    Returns ``[B, P + n_new]``.

    Example:
        >>> model = GPT(vocab_size=50, context=32, d_model=32, n_layers=2)
        >>> prompt = torch.tensor([[0, 7, 8]])
        >>> torch.equal(generate(model, prompt, 10, temperature=0), generate(model, prompt, 10, temperature=0, use_cache=False))
        True
    """
    was = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    ids, caches, new = prompt_ids, None, prompt_ids
    for _ in range(n_new):
        if use_cache:
            logits, caches = forward_with_cache(model, new, caches)      # only the tokens not seen yet
        else:
            logits = model(ids)                                           # the whole prefix, again
        logits = logits[:, -1]
        if suppress:
            logits = logits.index_fill(-1, torch.tensor(suppress, device=logits.device), float("-inf"))
        new = sample_next(logits, temperature, top_k, top_p)[:, None]
        ids = torch.cat([ids, new], dim=1)
    model.train(was)
    return ids


# ----------------------------------------------------------------------------- what samples look like
def distinct_n(samples, n: int) -> float:
    """Distinct-n (Li et al. 2016): the number of *different* n-grams of tokens in all ``samples``
    together divided by the number of n-grams in them (1: no n-gram occurs twice; small: the
    samples keep saying the same things). n-grams are counted within each sample.

    Example:
        >>> distinct_n([[1, 2, 3], [1, 2, 4]], 1), distinct_n([[1, 2, 3], [1, 2, 4]], 2)
        (0.6666666666666666, 0.75)
    """
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_token_rate(samples, window: int | None = None) -> float:
    """The share of tokens, over all ``samples``, that repeat a token among the previous ``window``
    tokens of the same sample (None: all previous tokens); the first token of a sample is not
    counted. Welleck et al. (2020) call this rep/w. Degenerate loops ("the the the") push it to 1.

    Example:
        >>> repeated_token_rate([[5, 6, 5, 5], [7, 8]]), repeated_token_rate([[5, 6, 5, 5]], window=1)
        (0.5, 0.3333333333333333)
    """
    repeats = total = 0
    for s in samples:
        s = list(s)
        for t in range(1, len(s)):
            repeats += s[t] in s[max(0, t - window) if window else 0:t]
            total += 1
    return repeats / total if total else 0.0


# ----------------------------------------------------------------------------- the same network in transformers
def gpt2_config(model: GPT, activation: str = "gelu"):
    """The ``transformers.GPT2Config`` of ``model``'s shape (no download). ``activation="gelu"`` is
    the exact GELU of ``nn.GELU()``; GPT-2 itself uses ``"gelu_new"``, the tanh approximation.

    Example:
        >>> c = gpt2_config(GPT(vocab_size=50, context=16, d_model=32, n_layers=2))
        >>> c.n_layer, c.n_embd, c.n_inner, c.activation_function
        (2, 32, 128, 'gelu')
    """
    from transformers import GPT2Config
    d = model.tok_emb.embedding_dim
    return GPT2Config(vocab_size=model.tok_emb.num_embeddings, n_positions=model.context, n_embd=d,
                      n_layer=len(model.blocks), n_head=model.blocks[0].attn.n_heads, n_inner=4 * d,
                      activation_function=activation, layer_norm_epsilon=model.ln_f.eps,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def gpt2_block_pairs(block: Block, gpt2_block) -> list:
    """``(GPT-2's module, ours)`` for every weight-holding module of one transformer block: ``ln_1``
    is our ``ln1``, ``attn.c_attn`` our fused ``attn.qkv``, ``attn.c_proj`` our ``attn.proj``, ``ln_2``
    our ``ln2``, ``mlp.c_fc`` and ``mlp.c_proj`` our ``mlp[0]`` and ``mlp[2]``. GPT-2's linear layers
    are ``Conv1D``, whose weight is the transpose of ``nn.Linear``'s.

    Example:
        >>> [type(theirs).__name__ for theirs, _ in gpt2_block_pairs(model.blocks[0], hf.transformer.h[0])]
        ['LayerNorm', 'Conv1D', 'Conv1D', 'LayerNorm', 'Conv1D', 'Conv1D']
    """
    return [(gpt2_block.ln_1, block.ln1), (gpt2_block.attn.c_attn, block.attn.qkv),
            (gpt2_block.attn.c_proj, block.attn.proj), (gpt2_block.ln_2, block.ln2),
            (gpt2_block.mlp.c_fc, block.mlp[0]), (gpt2_block.mlp.c_proj, block.mlp[2])]


@torch.no_grad()
def to_gpt2(model: GPT, activation: str = "gelu"):
    """``transformers.GPT2LMHeadModel`` with ``model``'s weights: the same network under GPT-2's names.

    GPT-2's linear layers are ``Conv1D`` modules whose weight is stored ``[in, out]``, the transpose
    of ``nn.Linear``'s ``[out, in]``; its ``c_attn`` is our fused ``qkv`` (queries, keys, values in
    that order); ``wte``/``wpe`` are the token and position embeddings, ``lm_head`` is tied to ``wte``.

    Example:
        >>> model = GPT(vocab_size=50, context=16, d_model=32, n_layers=2).eval()
        >>> hf = to_gpt2(model).eval()
        >>> ids = torch.randint(0, 50, (2, 9))
        >>> torch.allclose(hf(ids).logits, model(ids), atol=1e-5)
        True
    """
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(gpt2_config(model, activation))
    t = hf.transformer
    t.wte.weight.copy_(model.tok_emb.weight)
    t.wpe.weight.copy_(model.pos_emb.weight)
    pairs = [(t.ln_f, model.ln_f)]
    for h, b in zip(t.h, model.blocks):
        pairs += gpt2_block_pairs(b, h)
    for theirs, ours in pairs:
        transposed = type(theirs).__name__ == "Conv1D"
        theirs.weight.copy_(ours.weight.T if transposed else ours.weight)
        theirs.bias.copy_(ours.bias)
    assert hf.lm_head.weight.data_ptr() == t.wte.weight.data_ptr(), "lm_head is not tied to wte"
    return hf
