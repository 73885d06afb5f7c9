"""Batching text for transformers: dynamic padding, length-grouped batches, masked-LM masking.

Tokenize once without padding, then pad each batch only to its own longest sentence::

    >>> train = Tokenized(texts, labels, tokenizer, max_length=128)
    >>> loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=pad_collate)
    >>> batch = next(iter(loader))        # {"input_ids", "attention_mask", "labels"}
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class Tokenized(Dataset):
    """Sentences tokenized once, unpadded; ``dataset[i]`` is ``{"input_ids": [ints], "label": int}``.

    Example:
        >>> ds = Tokenized(["a fine film", "dull"], [1, 0], tokenizer, max_length=64)
        >>> ds.lengths          # tokens per sentence, [CLS] and [SEP] included
        [5, 3]
    """

    def __init__(self, texts, labels, tokenizer, max_length: int = 128):
        self.input_ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        self.labels = [int(y) for y in labels]
        self.lengths = [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "label": self.labels[i]}


def pad_collate(features, pad_id: int = 0, pad_to: int | None = None) -> dict:
    """Stack ``{"input_ids", "label"}`` examples into one batch, right-padded with ``pad_id``.

    Pads to the longest sentence of the batch (dynamic padding), or to ``pad_to`` tokens when
    given (fixed padding). ``attention_mask`` is 1 on real tokens and 0 on padding.

    Example:
        >>> b = pad_collate([{"input_ids": [101, 7, 102], "label": 1}, {"input_ids": [101, 102], "label": 0}])
        >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
        ([[101, 7, 102], [101, 102, 0]], [[1, 1, 1], [1, 1, 0]], [1, 0])
    """
    width = pad_to if pad_to is not None else max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in features[0]:
        batch["labels"] = torch.tensor([int(f["label"]) for f in features], dtype=torch.long)
    return batch


class LengthGroupedBatchSampler(Sampler):
    """Batches of sentences of similar length, so dynamic padding adds almost nothing.

    Each epoch: shuffle, cut into chunks of ``batch_size * group`` examples, sort each chunk by
    length, split it into batches, and shuffle the order of all batches. Batches stay random
    (different every epoch) but hold sentences of nearly equal length.

    A chunk holds fewer batches when the set is small: at least ``min_chunks`` chunks per epoch
    (while a chunk still holds one batch). One chunk holding the whole set would be sorted into the
    same batches every epoch, only their order shuffled; with several, which sentences share a
    chunk, and so a batch, changes from epoch to epoch.

    Example:
        >>> sampler = LengthGroupedBatchSampler(train.lengths, batch_size=32, seed=0)
        >>> loader = DataLoader(train, batch_sampler=sampler, collate_fn=pad_collate)
    """

    def __init__(self, lengths, batch_size: int, group: int = 50, seed: int = 0, min_chunks: int = 4):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.group, self.seed, self.epoch = batch_size, group, seed, 0
        # batches per chunk: at most `group`, fewer when that leaves fewer than `min_chunks` chunks
        self.per_chunk = max(1, min(group, len(self.lengths) // (batch_size * min_chunks)))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)  # ceil

    def state_dict(self) -> dict:
        """The epoch counter, which decides the next epoch's order (saved in ``fit``'s checkpoints)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g)
        chunk = self.batch_size * self.per_chunk
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[torch.argsort(self.lengths[part], descending=True, stable=True)]
            batches += [part[i:i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        for j in torch.randperm(len(batches), generator=g).tolist():
            yield batches[j]


def padding_fraction(loader) -> float:
    """Fraction of all token positions in ``loader``'s batches that are padding (attention_mask 0).

    Example:
        >>> padding_fraction(DataLoader(train, batch_size=32, collate_fn=pad_collate))
        0.41
    """
    pad = total = 0
    for batch in loader:
        m = batch["attention_mask"]
        pad += int((m == 0).sum())
        total += m.numel()
    return pad / total


def mask_tokens(input_ids, special_mask, mask_id: int, vocab_size: int, prob: float = 0.15,
                generator=None):
    """BERT's masked-LM corruption: returns ``(inputs, labels)``; ``input_ids`` is not changed.

    Each token that is not special (``special_mask`` False; [CLS], [SEP] and padding are special)
    is chosen with probability ``prob``. Of the chosen: 80% become ``mask_id``, 10% a random
    token, 10% stay unchanged. ``labels`` holds the original id at chosen positions and -100
    (ignored by the loss) everywhere else.

    Example:
        >>> special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
        >>> inputs, labels = mask_tokens(ids, special, tokenizer.mask_token_id, tokenizer.vocab_size)
    """
    special_mask = special_mask.bool()
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special_mask
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


class MLMCollate:
    """A collate function for masked-LM pretraining: dynamic padding, then :func:`mask_tokens`.

    A fresh mask is drawn every time a batch is built, so each epoch sees different masks.

    Example:
        >>> loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=MLMCollate(tokenizer))
        >>> model(**next(iter(loader))).loss        # a BertForMaskedLM
    """

    def __init__(self, tokenizer, prob: float = 0.15):
        self.pad_id, self.mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        self.vocab_size, self.prob = len(tokenizer), prob
        self.special_ids = torch.tensor(tokenizer.all_special_ids)

    def __call__(self, features):
        batch = pad_collate([{"input_ids": f["input_ids"]} for f in features], self.pad_id)
        special = torch.isin(batch["input_ids"], self.special_ids) | (batch["attention_mask"] == 0)
        batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], special, self.mask_id,
                                                          self.vocab_size, self.prob)
        return batch


TFIDF_CS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def tfidf_baseline(train_texts, train_labels, val_texts, val_labels, test_texts=None, test_labels=None,
                   Cs=TFIDF_CS, name: str = "C TF-IDF", max_extend: int = 2) -> dict:
    """The classical baseline: TF-IDF of words and word pairs + logistic regression (scikit-learn).

    Chooses the inverse regularisation strength ``C`` with :func:`ptcourse.compare.search` on the
    **validation** sentences (one model per value; the grid extended geometrically, at most
    ``max_extend`` values, while the best is at an end) and scores that one model on the test
    sentences (when given). Returns ``{"C", "val_acc", "test_acc", "val_pred", "test_pred", "search"}``
    (test entries ``None`` without a test set; ``search`` is the :class:`~ptcourse.compare.Search`,
    named ``name``, for the chapter's record).

    Example:
        >>> r = tfidf_baseline(train.texts, train.labels, val.texts, val.labels, test.texts, test.labels)
        >>> sorted(r)                 # C was chosen on validation; test_acc is that one model on test
        ['C', 'search', 'test_acc', 'test_pred', 'val_acc', 'val_pred']
    """
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from ..compare import search

    y = np.asarray(train_labels)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x = vectorizer.fit_transform(list(train_texts))
    xv, yv = vectorizer.transform(list(val_texts)), np.asarray(val_labels)
    fitted = {}

    def val_accuracy(C):
        clf = LogisticRegression(C=C, max_iter=2000).fit(x, y)
        fitted[C] = (clf, clf.predict(xv))
        return float((fitted[C][1] == yv).mean())

    s = search(name, Cs, val_accuracy, extend="geometric", max_extend=max_extend)
    clf, val_pred = fitted[s.chosen]
    out = {"C": s.chosen, "val_acc": s.best, "val_pred": val_pred, "test_acc": None, "test_pred": None, "search": s}
    if test_texts is not None:
        out["test_pred"] = clf.predict(vectorizer.transform(list(test_texts)))
        out["test_acc"] = float((out["test_pred"] == np.asarray(test_labels)).mean())
    return out
