"""Chapter 08 (the interview-question bank): its checks pass the reference answers and catch the article's
mistakes; its notebook cites record keys that exist; its helper reads the records."""
import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptcourse.chapters import interview_questions as iq
from ptcourse.checks import interview_questions as checks

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- reference answers
def finetune(model, train_batches, val_batches, *, lr, epochs):
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for batch in train_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in val_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return right / total


def attention_maps(model, tokenizer, text):
    enc = tokenizer(text, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    return torch.stack(out.attentions, dim=1)[0]


def distill_update(student, teacher, x, y, optimizer, temperature, alpha):
    """One KD step as a student would write it, leaving the modes of both models as they are."""
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    T = temperature
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    loss = alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(s, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def distill_step(student, teacher, x, y, optimizer, temperature, alpha):
    teacher.eval()
    student.train()
    return distill_update(student, teacher, x, y, optimizer, temperature, alpha)


class _FrozenBN(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def train(self, mode=True):
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        return self.net(x)


def transfer_setup(net, num_classes, lr):
    net.requires_grad_(False)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    model = _FrozenBN(net).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


# --------------------------------------------------------------------------- the checks pass them ...
@pytest.mark.slow  # a few seconds: kept out of the fast tier
def test_checks_pass_the_reference_answers():
    assert checks.check_finetune(finetune, quiet=True)
    assert checks.check_attention_maps(attention_maps, quiet=True)
    assert checks.check_distill_step(distill_step, quiet=True)
    assert checks.check_transfer_setup(transfer_setup, quiet=True)


# --------------------------------------------------------------------------- ... and catch the article's code
def test_finetune_check_catches_training_set_evaluation_and_train_mode():
    def on_train(model, train_batches, val_batches, *, lr, epochs):
        return finetune(model, train_batches, train_batches, lr=lr, epochs=epochs)

    def train_mode(model, train_batches, val_batches, *, lr, epochs):
        finetune(model, train_batches, val_batches, lr=lr, epochs=epochs)
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            hits = [(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                     == b["labels"]).float() for b in val_batches]
        return float(torch.cat(hits).mean())

    def untrained(model, train_batches, val_batches, *, lr, epochs):
        return 0.5

    r = checks.check_finetune(on_train, quiet=True)
    assert not r and "training" in r.message
    assert not checks.check_finetune(train_mode, quiet=True)
    assert "did not change" in checks.check_finetune(untrained, quiet=True).message


def test_attention_check_catches_the_hidden_state_plot():
    def article(model, tokenizer, text):                 # the article's "attention": hidden states averaged
        ids = tokenizer.encode(text, return_tensors="pt")
        with torch.no_grad():
            return model(ids).last_hidden_state.mean(dim=1)

    def one_layer(model, tokenizer, text):
        return attention_maps(model, tokenizer, text)[-1]

    r = checks.check_attention_maps(article, quiet=True)
    assert not r and "hidden states" in r.message
    assert not checks.check_attention_maps(one_layer, quiet=True)


def test_distill_check_catches_the_articles_loss_and_a_trainable_teacher():
    def article(student, teacher, x, y, optimizer, temperature, alpha):
        s, t = student(x), teacher(x)
        loss = nn.KLDivLoss()(s, t) * alpha + F.cross_entropy(s, y) * (1 - alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def teacher_in_train_mode(student, teacher, x, y, optimizer, temperature, alpha):
        teacher.train()
        return distill_update(student, teacher, x, y, optimizer, temperature, alpha)

    def no_t_squared(student, teacher, x, y, optimizer, temperature, alpha):
        teacher.eval()
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        T = temperature
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
        loss = alpha * kl + (1 - alpha) * F.cross_entropy(s, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    r = checks.check_distill_step(article, quiet=True)
    assert not r and "teacher" in r.message           # grads into the teacher, or its BatchNorm moved
    assert "train mode" in checks.check_distill_step(teacher_in_train_mode, quiet=True).message
    assert not checks.check_distill_step(no_t_squared, quiet=True)


def test_transfer_check_catches_unfrozen_backbone_and_train_mode_batchnorm():
    def article(net, num_classes, lr):                   # the article: new head, everything trains
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        return net, torch.optim.Adam(net.parameters(), lr=lr)

    def frozen_but_bn_in_train_mode(net, num_classes, lr):
        net.requires_grad_(False)
        net.fc = nn.Linear(net.fc.in_features, num_classes)
        return net, torch.optim.Adam(net.fc.parameters(), lr=lr)

    def optimizer_over_everything(net, num_classes, lr):
        model, _ = transfer_setup(net, num_classes, lr)
        return model, torch.optim.Adam(model.parameters(), lr=lr)

    assert "trainable parameters" in checks.check_transfer_setup(article, quiet=True).message
    assert "running statistics" in checks.check_transfer_setup(frozen_but_bn_in_train_mode, quiet=True).message
    assert "optimizer holds" in checks.check_transfer_setup(optimizer_over_everything, quiet=True).message


def test_positional_share_on_a_hand_made_pattern():
    n = 5
    prev = torch.zeros(1, 1, 2, n, n)
    prev[0, 0, 0, 0, 0] = 1
    for i in range(1, n):
        prev[0, 0, 0, i, i - 1] = 1                      # head 0: all attention on the previous token
    prev[0, 0, 1] = 1 / n                                # head 1: uniform
    mask = torch.ones(1, n, dtype=torch.long)
    share = checks.positional_share(prev, mask, -1)
    assert share[0, 0] == pytest.approx(1.0) and share[0, 1] == pytest.approx(1 / n)
    mask[0, -2:] = 0                                     # padding does not count
    assert checks.positional_share(prev, mask, -1)[0, 0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- the helper and the notebook
def test_evidence_reads_records_and_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "01_x.json").write_text(json.dumps({"chapter": "01_x", "profile": "cpu",
                                                    "metrics": {"acc": [0.5, 0.75], "n": 3}}))
    rows = iq.evidence([("01_x", "acc"), ("01_x", "missing"), ("09_none", "acc")], folder=tmp_path)
    out = capsys.readouterr().out
    assert rows[0]["value"] == [0.5, 0.75] and rows[1]["value"] is None and rows[2]["value"] is None
    assert "01_x.json" in out and "not recorded" in out


def test_evidence_prints_a_verdict_in_words_with_holm(tmp_path, capsys):
    verdicts = [{"key": "a_vs_b", "outcome": "ahead", "holm": False, "words": "a is ahead of b by +2.0 points [+0.1, +3.9]"},
                {"key": "c_vs_b", "outcome": "not told apart", "holm": False, "words": "c and b are not told apart"}]
    (tmp_path / "01_x.json").write_text(json.dumps({"profile": "cpu", "metrics": {}, "verdicts": verdicts}))
    rows = iq.evidence([("01_x", "verdict:a_vs_b"), ("01_x", "verdict:c_vs_b"), ("01_x", "verdict:nope")],
                       folder=tmp_path)
    out = capsys.readouterr().out
    assert rows[0]["value"].endswith("(not after Holm's correction)") and "+0.1, +3.9" in out
    assert rows[1]["value"] == "c and b are not told apart" and rows[2]["value"] is None


def _cited_keys(text):
    return re.findall(r"`results/(\d\d_[a-z_]+)\.json` → `([A-Za-z0-9_.:]+)`", text)


def test_every_cited_record_key_exists():
    """The chapter cites results as "`results/NN_x.json` → `key`"; each cited key must be in that record
    (a verdict as `verdict:NAME`, which must be among that record's verdicts)."""
    text = (ROOT / "chapters" / "08_interview_questions.ipynb").read_text(encoding="utf-8")
    cited = _cited_keys(text)
    assert len(cited) >= 8, "the answers should cite the measurements that support them"
    missing = []
    for chapter, key in cited:
        path = ROOT / "results" / f"{chapter}.json"
        assert path.exists(), f"cites {path.name}, which does not exist"
        record = json.loads(path.read_text(encoding="utf-8"))
        known = set(record["metrics"]) | {f"verdict:{v['key']}" for v in record.get("verdicts") or []}
        if key not in known:
            missing.append(f"{chapter} → {key}")
    assert not missing, "cited keys missing from the records: " + ", ".join(missing)


def test_all_ten_questions_and_four_tasks_are_there():
    chapter = (ROOT / "chapters" / "08_interview_questions.ipynb").read_text(encoding="utf-8")
    for q in range(1, 11):
        assert f"Q{q} ·" in chapter, f"question {q} of the bank is not answered"
    solutions = (ROOT / "solutions" / "08_interview_questions.ipynb").read_text(encoding="utf-8")
    for check in ("check_finetune", "check_attention_maps", "check_distill_step", "check_transfer_setup",
                  "check_positional_head"):
        assert check in solutions


def test_models_the_course_does_not_teach_are_placed_with_a_source():
    """Each named model gets a table row with a year (its primary source), and the articles' mislabels are corrected."""
    nb = json.loads((ROOT / "chapters" / "08_interview_questions.ipynb").read_text(encoding="utf-8"))
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    for model in ("GPT", "T5", "RoBERTa", "XLNet", "ViT", "wav2vec 2.0", "WaveNet", "Tacotron"):
        row = next((ln for ln in text.split("\n") if ln.startswith(f"| **{model}")), None)
        assert row and re.search(r"\b(19|20)\d\d\b", row), f"no table row with a dated source for {model}"
    assert "ImageNet is a dataset" in text and "SQuAD is a dataset" in text
    assert "speech **synthesis**" in text
