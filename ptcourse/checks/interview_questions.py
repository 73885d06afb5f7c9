"""Checks for the exercises of chapter 08 (the interview-question bank's four programming tasks).

Each check builds small models of its own (a tiny random BERT, a tiny MLP teacher, a random
ResNet-18), so it runs in seconds on a CPU and needs no download, and it recognises the mistakes
of the source article's code.

Example:
    >>> check_finetune(finetune)
    >>> check_attention_maps(attention_maps)
    >>> check_distill_step(distill_step)
    >>> check_transfer_setup(transfer_setup)
    >>> check_positional_head(model, tokenizer, layer=0, head=2, offset=-1)
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import CheckResult, difference, result

__all__ = ["check_finetune", "check_attention_maps", "check_distill_step", "check_transfer_setup",
           "check_positional_head", "tiny_bert", "tiny_tokenizer"]


def _result(name, ok, msg, hint="", quiet=False) -> CheckResult:
    return result(name, ok, msg, hint=hint, quiet=quiet)


# --------------------------------------------------------------------------- tiny models
WORDS = ["good", "bad", "film", "plot", "great", "dull", "the", "a", "is", "not", "very", "actors"]


def tiny_tokenizer():
    """A WordPiece tokenizer with a 17-token vocabulary (the five special tokens + ``WORDS``)."""
    from transformers import BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    path = Path(tempfile.mkdtemp(prefix="ptcourse-vocab-")) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(vocab_file=str(path))


def tiny_bert(num_labels: int | None = 2, seed: int = 0, vocab_size: int = 32, dropout: float = 0.1):
    """A randomly initialised 2-layer BERT (hidden size 32, 2 heads) with eager attention."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, num_labels=num_labels or 2)
    config._attn_implementation = "eager"
    model = BertForSequenceClassification(config) if num_labels else BertModel(config)
    return model


# --------------------------------------------------------------------------- task 1: fine-tune
def _toy_batches(n, seed, batch_size=16, length=10, vocab=32):
    """Sentences of random ids 5..vocab-1; label 1 when id 5 occurs (a token a model must find)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(1, length - 1, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = 5
    ids[:, 0], ids[:, -1] = 2, 3                        # [CLS] ... [SEP]
    lengths = torch.randint(length // 2 + 1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    mask[labels == 1] = 1                              # keep the id-5 token visible
    ids = ids * mask                                   # padding id 0
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size],
             "labels": labels[i:i + batch_size]} for i in range(0, n, batch_size)]


@torch.no_grad()
def _accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        right += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return right / total


def check_finetune(student_fn, quiet=False) -> CheckResult:
    """``student_fn(model, train_batches, val_batches, *, lr, epochs)`` fine-tunes ``model`` (a model
    with a classification head: batches of ``input_ids``, ``attention_mask``, ``labels``) and returns
    its accuracy on ``val_batches``, measured in eval mode."""
    name = "check_finetune"
    train, val = _toy_batches(256, seed=1, batch_size=32), _toy_batches(128, seed=2)
    val[0]["labels"][:12] = 1 - val[0]["labels"][:12]   # some label noise: train and val accuracy differ
    model = tiny_bert(seed=3)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    got = student_fn(model, train, val, lr=3e-3, epochs=4)
    if torch.is_tensor(got):
        got = float(got)
    if not isinstance(got, (int, float)) or not 0 <= got <= 1:
        return _result(name, False, f"should return the validation accuracy (a number in [0, 1]), got {got!r}",
                       "count correct arg-max predictions on val_batches and divide by their number.", quiet)
    moved = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    if not moved:
        return _result(name, False, "the model's weights did not change: nothing was trained",
                       "loss = model(**batch).loss; optimizer.zero_grad(); loss.backward(); optimizer.step()", quiet)
    val_acc, train_acc = _accuracy(model, val), _accuracy(model, train)
    if abs(got - val_acc) > 1e-6:
        if abs(got - train_acc) < 1e-6:
            return _result(name, False, f"returned {got:.3f}, the accuracy on the *training* batches; on the "
                           f"validation batches it is {val_acc:.3f}", "evaluate on val_batches, as "
                           "the article's code should have (it evaluates on train_loader).", quiet)
        return _result(name, False, f"returned {got:.3f}, but the trained model's validation accuracy in eval "
                       f"mode is {val_acc:.3f}", "call model.eval() and use torch.no_grad() before measuring "
                       "(dropout is on in train mode).", quiet)
    if val_acc < 0.75:
        return _result(name, False, f"validation accuracy {val_acc:.3f} after 4 epochs at lr=3e-3; the reference "
                       "reaches about 0.9 on this toy task", "use lr and epochs as given, AdamW over "
                       "model.parameters(), and call optimizer.zero_grad() every step.", quiet)
    return _result(name, True, f"trained, and returned the validation accuracy in eval mode ({val_acc:.3f}).",
                   quiet=quiet)


# --------------------------------------------------------------------------- task 2: attention maps
def _ref_attention_maps(model, tokenizer, text):
    enc = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    return torch.stack(out.attentions, dim=1)[0]


def check_attention_maps(student_fn, quiet=False) -> CheckResult:
    """``student_fn(model, tokenizer, text)`` returns the attention weights of every layer and head,
    ``[layers, heads, tokens, tokens]``, each row a probability distribution over the keys."""
    name = "check_attention_maps"
    tok, model = tiny_tokenizer(), tiny_bert(num_labels=None, seed=4)
    hint = ("run the model with output_attentions=True (loaded with attn_implementation='eager') and stack "
            "outputs.attentions (one [batch, heads, n, n] tensor per layer) along a new dim 1; drop the batch dim.")
    for text in ("the film is very good", "a dull plot", "not great actors"):
        expected = _ref_attention_maps(model, tok, text)
        got = student_fn(model, tok, text)
        if torch.is_tensor(got) and got.dim() in (2, 3) and got.shape[-1] == model.config.hidden_size:
            return _result(name, False, f"returned shape {list(got.shape)}: its last dimension is the hidden "
                           "size, so these are hidden states (last_hidden_state), not attention weights, the "
                           "article's mistake", hint, quiet)
        problem = difference(got, expected, atol=1e-5, rtol=1e-4)
        if problem:
            return _result(name, False, f"{problem} for the text {text!r}", hint, quiet)
    return _result(name, True, "matches the model's own attention weights on 3 sentences "
                   "(every row sums to 1).", quiet=quiet)


# --------------------------------------------------------------------------- task 3: distillation
def _teacher(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))


def _student(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5))


def _ref_distill_step(student, teacher, x, y, optimizer, temperature, alpha):
    teacher.eval()
    student.train()
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = student(x)
    T = temperature
    kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                  reduction="batchmean", log_target=True)
    loss = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s_logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def check_distill_step(student_fn, quiet=False) -> CheckResult:
    """``student_fn(student, teacher, x, y, optimizer, temperature, alpha)`` takes one optimizer step of
    knowledge distillation (Hinton et al. 2015) and returns the loss as a float."""
    name = "check_distill_step"
    hint = ("teacher.eval() and its forward under torch.no_grad(); KL(teacher || student) from F.log_softmax of "
            "both logits / T with reduction='batchmean' (and log_target=True), times T²; "
            "alpha * that + (1 - alpha) * cross-entropy; zero_grad, backward, step.")
    g = torch.Generator().manual_seed(11)
    teacher = _teacher()
    teacher.train()                                    # as a student would receive it from training
    with torch.no_grad():                              # give the BatchNorm some history
        teacher(torch.randn(64, 8, generator=g))
    for T, alpha in ((4.0, 0.9), (2.0, 0.5), (1.0, 0.0)):
        mine, ref = _student(), _student()
        teach_mine, teach_ref = copy.deepcopy(teacher), copy.deepcopy(teacher)
        opt_mine = torch.optim.SGD(mine.parameters(), lr=0.5)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
        teacher_before = copy.deepcopy(teach_mine.state_dict())
        for step in range(2):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
            got = student_fn(mine, teach_mine, x.clone(), y.clone(), opt_mine, T, alpha)
            want = _ref_distill_step(ref, teach_ref, x.clone(), y.clone(), opt_ref, T, alpha)
            if any(p.grad is not None and p.grad.abs().sum() > 0 for p in teach_mine.parameters()):
                return _result(name, False, "gradients reached the teacher's parameters", "compute the "
                               "teacher's logits under torch.no_grad() (the teacher is a fixed target).", quiet)
            changed = [k for k, v in teach_mine.state_dict().items() if not torch.equal(v, teacher_before[k])]
            if changed:
                return _result(name, False, f"the teacher changed ({changed[0]}): it ran in train mode, so its "
                               "BatchNorm statistics moved and its dropout was on", "call teacher.eval().", quiet)
            got = float(got) if torch.is_tensor(got) or isinstance(got, (int, float)) else got
            if not isinstance(got, float) or math.isnan(got):
                return _result(name, False, f"returned {got!r} at T={T}, alpha={alpha}; expected the loss as a "
                               "number (NaN comes from raw logits in nn.KLDivLoss)", hint, quiet)
            if abs(got - want) > 1e-4 * max(1.0, abs(want)):
                return _result(name, False, f"loss {got:.5f} at T={T}, alpha={alpha} (step {step + 1}), "
                               f"expected {want:.5f}", hint, quiet)
            for (k, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
                problem = difference(a, b, atol=1e-5, rtol=1e-4, where=f"student weight {k}")
                if problem:
                    return _result(name, False, f"after step {step + 1} at T={T}: {problem}", "zero the "
                                   "gradients before backward, and step the optimizer once.", quiet)
    return _result(name, True, "same loss and the same student after two steps at three (T, alpha); the "
                   "teacher stayed fixed.", quiet=quiet)


# --------------------------------------------------------------------------- task 4: transfer learning
def check_transfer_setup(student_fn, quiet=False) -> CheckResult:
    """``student_fn(net, num_classes, lr)`` returns ``(model, optimizer)`` for transfer with a frozen
    backbone: a new head (``net.fc``) is the only trainable part, the optimizer holds exactly the
    trainable parameters, and the frozen BatchNorm layers stay in eval mode when ``model.train()`` is
    called (so their running statistics do not move)."""
    from torchvision.models import resnet18
    name = "check_transfer_setup"
    torch.manual_seed(0)
    net = resnet18(weights=None)
    in_features = net.fc.in_features
    model, optimizer = student_fn(net, 7, 1e-3)
    x = torch.rand(4, 3, 64, 64)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    out = model(x)
    if not torch.is_tensor(out) or out.shape != (4, 7):
        return _result(name, False, f"model(x) should give [4, 7] logits, got {getattr(out, 'shape', out)}",
                       "replace net.fc with nn.Linear(net.fc.in_features, num_classes).", quiet)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    if n_train != in_features * 7 + 7:
        return _result(name, False, f"{n_train:,} trainable parameters; only the new head's "
                       f"{in_features * 7 + 7:,} should be", "requires_grad_(False) on every parameter, then the "
                       "new head (created afterwards) trains.", quiet)
    moved = [i for i, (bn, (m, v)) in enumerate(zip(bns, stats))
             if not (torch.equal(bn.running_mean, m) and torch.equal(bn.running_var, v))]
    if moved:
        return _result(name, False, f"after model.train() and one forward pass, {len(moved)} of {len(bns)} frozen "
                       "BatchNorm layers changed their running statistics: frozen weights, but not frozen "
                       "statistics", "override train(mode) in a small wrapper so that frozen BatchNorm layers go "
                       "back to eval() after every train() call (ptcourse.fit calls model.train() each epoch).",
                       quiet)
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if in_opt != {id(p) for p in trainable}:
        return _result(name, False, f"the optimizer holds {len(in_opt)} tensors, the trainable ones are "
                       f"{len(trainable)}", "build it over [p for p in model.parameters() if p.requires_grad].",
                       quiet)
    if any(abs(group["lr"] - 1e-3) > 1e-12 for group in optimizer.param_groups):
        return _result(name, False, "the optimizer's learning rate is not the lr given", quiet=quiet)
    out.sum().backward()
    return _result(name, True, "new 7-class head, frozen backbone with its BatchNorm in eval mode, optimizer over "
                   "the head only.", quiet=quiet)


# --------------------------------------------------------------------------- open-ended: a positional head
def positional_share(weights: torch.Tensor, attention_mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Mean share of attention that each real token gives to the token ``offset`` places away.

    ``weights`` ``[batch, layers, heads, n, n]``, ``attention_mask`` ``[batch, n]``; returns
    ``[layers, heads]`` averaged over the tokens that have such a neighbour.
    """
    n = weights.shape[-1]
    idx = torch.arange(n)
    target = idx + offset
    ok = (target >= 0) & (target < n)
    rows, cols = idx[ok], target[ok]
    share = weights[..., rows, cols]                                       # [B, L, H, m]
    valid = (attention_mask[:, rows] * attention_mask[:, cols]).float()   # [B, m]
    return (share * valid[:, None, None]).sum((0, 3)) / valid.sum()


def check_positional_head(model, tokenizer, layer: int, head: int, offset: int,
                          threshold: float = 0.5, n_sentences: int = 24, quiet=False) -> CheckResult:
    """Open-ended experiment: is head ``(layer, head)`` of ``model`` a *positional* head, one that sends at
    least ``threshold`` of each token's attention to the token ``offset`` places away (-1: the previous one)?

    Measured on held-out sentences (the Rotten Tomatoes *validation* split; search on the training split),
    with the reference attention (not your function's output), so the answer is judged, not the code.
    """
    from .. import data
    name = "check_positional_head"
    texts = [ex["text"] for ex in data.load("rotten_tomatoes", "validation", limit=n_sentences, seed=123)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
    model.eval()
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    weights = torch.stack(out.attentions, dim=1)
    layers, heads = weights.shape[1], weights.shape[2]
    if not (0 <= layer < layers and 0 <= head < heads) or offset == 0:
        return _result(name, False, f"layer must be in 0..{layers - 1}, head in 0..{heads - 1}, offset non-zero",
                       quiet=quiet)
    share = positional_share(weights, enc["attention_mask"], offset)
    got = float(share[layer, head])
    where = f"layer {layer}, head {head}, offset {offset:+d}"
    if got >= threshold:
        return _result(name, True, f"{where} sends {got:.0%} of the attention to the token {offset:+d} places away "
                       f"on {len(texts)} held-out sentences (chance is about {1 / enc['attention_mask'].sum(1).float().mean():.0%}).",
                       quiet=quiet)
    return _result(name, False, f"{where} sends only {got:.0%} to that token on held-out sentences, "
                   f"{threshold - got:.0%} short of {threshold:.0%}",
                   "compute this share for every layer and head on training sentences with your attention_maps, "
                   "then report the largest; try offset -1 and +1.", quiet)
