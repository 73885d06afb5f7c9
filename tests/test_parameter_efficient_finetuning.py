"""Chapter 07: ptcourse.chapters.parameter_efficient_finetuning (parameter groups, optimizer state,
saved size, pooling, drift measures) and the exercise checks, which must reject the usual wrong answers."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptcourse.chapters.parameter_efficient_finetuning import (
    SentenceClassifier, add_ia3, add_prompt_tuning, encode, format_parameter_table, ia3_parameter_count, linear_cka,
    lora_update_norm, mean_cosine, mean_pool, optimizer_state_bytes, parameter_group, parameter_table, prompt_tokens,
    saved_bytes, train_head, trainable_parameters, trainable_state_dict, training_memory, training_steps)
from ptcourse.chapters.bert_finetuning import pad_collate
from ptcourse.checks.parameter_efficient_finetuning import (
    ReferenceLoRALinear, check_bitfit, check_lora_linear, check_lora_search, check_zero_shot, reference_bitfit,
    reference_zero_shot, tiny_bert_classifier, check_static_memory, reference_static_memory, check_ia3_count,
    check_lora_all_linear_count, check_prompt_pooling)


# ----------------------------------------------------------------------------- library
def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


@pytest.mark.slow  # a few seconds: kept out of the fast tier
def test_parameter_groups_of_a_bert():
    model = tiny_bert_classifier()
    assert parameter_group("encoder.embeddings.word_embeddings.weight") == "embeddings"
    assert parameter_group("encoder.embeddings.LayerNorm.bias") == "LayerNorm"
    assert parameter_group("encoder.encoder.layer.0.attention.self.query.weight") == "attention"
    assert parameter_group("encoder.encoder.layer.0.attention.self.query.bias") == "biases"
    assert parameter_group("encoder.encoder.layer.1.intermediate.dense.weight") == "feed-forward"
    assert parameter_group("encoder.encoder.layer.1.output.dense.weight") == "feed-forward"
    assert parameter_group("base_model.model.encoder.layer.0.attention.self.value.lora_B.default.weight") == "LoRA"
    assert parameter_group("head.weight") == "head"
    table = parameter_table(model)
    assert "other" not in table
    assert sum(n for _, n in table.values()) == sum(p.numel() for p in model.parameters())
    assert all(t == n for t, n in table.values())                     # all trainable
    reference_bitfit(model)
    table = parameter_table(model)
    assert table["embeddings"][0] == table["attention"][0] == table["feed-forward"][0] == 0
    assert table["biases"][0] == table["biases"][1] > 0
    assert table["LayerNorm"][0] == table["LayerNorm"][1] // 2       # LayerNorm biases train, weights do not
    assert "total" in format_parameter_table(model)


def test_trainable_parameters_counts_shared_tensors_once():
    lin = nn.Linear(4, 3)
    tied = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 4))
    tied[2].weight = nn.Parameter(lin.weight.T.detach().clone())
    tied.add_module("again", lin)
    assert trainable_parameters(tied) == (15 + 12 + 4, 15 + 12 + 4)
    lin.weight.requires_grad_(False)
    assert trainable_parameters(tied) == (3 + 12 + 4, 31)


def test_optimizer_state_is_two_fp32_moments_per_trainable_parameter():
    model = tiny_bert_classifier()
    reference_bitfit(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert optimizer_state_bytes(opt) == 0                             # nothing before the first step
    ids = torch.randint(0, 50, (3, 7))
    F.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 1, 0])).backward()
    opt.step()
    trainable, _ = trainable_parameters(model)
    assert optimizer_state_bytes(opt) == 2 * 4 * trainable


def test_saved_bytes_follows_the_trainable_subset():
    model = tiny_bert_classifier()
    full = saved_bytes(model)
    reference_bitfit(model)
    small = saved_bytes(model)
    trainable, total = trainable_parameters(model)
    assert 4 * trainable <= small < 4 * trainable + 4096             # fp32 data plus a small header
    assert 4 * total <= full < 4 * total + 8192
    assert set(trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_linear_cka_and_cosine():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(z, 3 * z @ q + 1) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(z, z) == pytest.approx(1.0)
    assert linear_cka(z, torch.randn(200, 8, generator=g)) < 0.2
    assert mean_cosine(z, 2 * z) == pytest.approx(1.0)
    assert mean_cosine(z, -z) == pytest.approx(-1.0)
    assert mean_cosine(z, z @ q) < 0.9                                 # a rotation keeps CKA, not cosine


def test_encode_keeps_the_order_and_ignores_padding():
    model = tiny_bert_classifier().eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 50, (n,), generator=g).tolist(), "label": 0} for n in (5, 2, 9, 3, 7)]
    z = encode(model, data, batch_size=2)
    for i, ex in enumerate(data):
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            alone = model.embed(ids, torch.ones_like(ids))
        assert torch.allclose(z[i], alone[0], atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")   # peft, about transformers 6
def test_peft_lora_on_the_classifier_counts_r_times_in_plus_out():
    peft = pytest.importorskip("peft")
    model = tiny_bert_classifier()
    enc = peft.get_peft_model(model.encoder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                             lora_dropout=0.0))
    clf = SentenceClassifier(enc, 2)
    trainable, _ = trainable_parameters(clf)
    assert trainable == 2 * 2 * 4 * (16 + 16) + (16 * 2 + 2)          # layers x {q, v} x r(in + out) + head
    assert parameter_table(clf)["LoRA"][0] == 2 * 2 * 4 * 32


# ----------------------------------------------------------------------------- the training protocol
def test_training_steps_never_fall_as_the_data_grows_and_respect_the_floor():
    sizes = [1, 2, 8, 15, 16, 17, 64, 100, 256, 1000, 4096]
    plans = [training_steps(n, 16, 3, 30) for n in sizes]
    steps = [s for _, s in plans]
    assert steps == sorted(steps)                                   # more data: never fewer steps
    assert all(s >= 30 for s in steps)                              # the floor
    for n, (epochs, s) in zip(sizes, plans):
        batches = -(-n // min(16, n))
        assert epochs >= 3 and s == epochs * batches                # whole passes, at least 3
    assert training_steps(4096, 16, 3, 30) == (3, 768)              # a large set: exactly 3 passes


def test_train_head_learns_a_separable_task_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    head = train_head(x, y, lr=1e-1, steps=60, batch_size=16, seed=0)
    assert (head(x).argmax(1) == y).float().mean() > 0.95
    again = train_head(x, y, lr=1e-1, steps=60, batch_size=16, seed=0)
    assert torch.equal(head.weight, again.weight)
    untrained = train_head(x, y, lr=1e-1, steps=0, batch_size=16, seed=0)
    assert not torch.equal(head.weight, untrained.weight)


def test_lora_update_norm_follows_the_scaling_rule():
    """One B A, measured under alpha / r and alpha / sqrt(r): the ratio is sqrt(r), by hand and in peft."""
    peft = pytest.importorskip("peft")
    base = nn.Linear(16, 16)

    def lora(r, rslora, b_seed=0):
        enc = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                  peft.LoraConfig(r=r, lora_alpha=8, target_modules=["0"], use_rslora=rslora))
        assert lora_update_norm(enc) == 0.0                          # B = 0 at the start
        layer = enc.base_model.model[0]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(b_seed))
            layer.lora_A["default"].weight.copy_(torch.linspace(-1, 1, 16 * r).reshape(r, 16))
        return enc, layer

    for r in (1, 16):
        plain, layer = lora(r, False)
        rs, _ = lora(r, True)
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        assert lora_update_norm(plain) == pytest.approx(float((8 / r) * delta.norm() / base.weight.norm()), rel=1e-5)
        assert lora_update_norm(rs) / lora_update_norm(plain) == pytest.approx(math.sqrt(r), rel=1e-5)
    hand = ReferenceLoRALinear(copy.deepcopy(base), r=4, alpha=8)
    with torch.no_grad():
        hand.B.fill_(0.1)
    expected = float(2 * (hand.B @ hand.A).detach().norm() / hand.base.weight.norm())
    assert lora_update_norm(nn.Sequential(hand)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_update_norm(base)


# ----------------------------------------------------------------------------- LoRA check
class _LoRA(nn.Module):
    """A configurable LoRA layer for the wrong answers."""

    def __init__(self, base, r, alpha, *, b_init="zero", a_init="kaiming", scaling="alpha/r", freeze=True):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(not freeze)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        if a_init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.A)
        self.B = nn.Parameter(torch.zeros(base.out_features, r) if b_init == "zero"
                              else torch.randn(base.out_features, r) * 0.02)
        self.scaling = {"alpha/r": alpha / r, "none": 1.0, "alpha": alpha, "r/alpha": r / alpha}[scaling]

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling


def test_check_lora_linear_accepts_the_reference_and_rejects_wrong_layers():
    assert check_lora_linear(ReferenceLoRALinear, quiet=True)
    wrong = {
        "random B": lambda b, r, a: _LoRA(b, r, a, b_init="random"),
        "missing alpha/r": lambda b, r, a: _LoRA(b, r, a, scaling="none"),
        "alpha without /r": lambda b, r, a: _LoRA(b, r, a, scaling="alpha"),
        "r/alpha": lambda b, r, a: _LoRA(b, r, a, scaling="r/alpha"),
        "base not frozen": lambda b, r, a: _LoRA(b, r, a, freeze=False),
        "A zero too": lambda b, r, a: _LoRA(b, r, a, a_init="zero"),
    }
    for name, cls in wrong.items():
        result = check_lora_linear(cls, quiet=True)
        assert not result, name
    assert "alpha / r" in check_lora_linear(wrong["missing alpha/r"], quiet=True).message
    assert "step 0" in check_lora_linear(wrong["random B"], quiet=True).message


def test_check_lora_linear_rejects_transposed_shapes_and_lets_a_stub_through():
    class Transposed(ReferenceLoRALinear):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            self.A = nn.Parameter(self.A.detach().T.contiguous())
    assert not check_lora_linear(Transposed, quiet=True)

    class Stub(nn.Module):
        def __init__(self, base, r, alpha):
            raise NotImplementedError("Exercise 1")
    with pytest.raises(NotImplementedError):
        check_lora_linear(Stub, quiet=True)


# ----------------------------------------------------------------------------- BitFit check
def _layernorm_left_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.startswith("head.") or "LayerNorm" in name)


def _only_freezes(model):                       # never switches anything on: fails on a frozen model
    for name, p in model.named_parameters():
        if not (name.endswith(".bias") or name.startswith("head.")):
            p.requires_grad_(False)


def _forgets_the_head(model):
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))


def _freezes_by_weight_name(model):             # the "frozen" model whose embeddings-free params train
    for name, p in model.named_parameters():
        p.requires_grad_("weight" not in name or name.startswith("head."))


def _everything(model):
    for p in model.parameters():
        p.requires_grad_(True)


def test_check_bitfit():
    assert check_bitfit(reference_bitfit, quiet=True)
    assert check_bitfit(lambda m: (reference_bitfit(m), None)[1], quiet=True)     # returning None is fine
    for wrong in (_layernorm_left_trainable, _only_freezes, _forgets_the_head, _everything):
        assert not check_bitfit(wrong, quiet=True), wrong.__name__
    assert "LayerNorm" in check_bitfit(_layernorm_left_trainable, quiet=True).message
    # "weight" not in name == ends in bias here: the same selection, written differently, passes
    assert check_bitfit(_freezes_by_weight_name, quiet=True)


# ----------------------------------------------------------------------------- zero-shot check
def test_reference_zero_shot_by_hand():
    text = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 1.2]])
    labels = torch.tensor([[10.0, 0.0], [0.0, 0.5]])            # lengths differ a lot
    assert reference_zero_shot(text, labels).tolist() == [0, 1, 1]
    assert (text @ labels.T).argmax(1).tolist() == [0, 0, 0]    # the dot product is fooled by length
    phrasings = torch.stack([labels, 3 * labels], 1)            # [C, K, d]
    assert reference_zero_shot(text, phrasings).tolist() == [0, 1, 1]


def test_check_zero_shot():
    assert check_zero_shot(reference_zero_shot, quiet=True)

    def dot_product(t, lab):
        lab = lab.mean(1) if lab.dim() == 3 else lab
        return (t @ lab.T).argmax(1)

    def mean_before_normalising(t, lab):
        lab = lab.mean(1) if lab.dim() == 3 else lab
        return reference_zero_shot(t, lab)

    def wrong_dim(t, lab):
        lab = F.normalize(lab.mean(1) if lab.dim() == 3 else lab, dim=-1)
        return (F.normalize(t, dim=-1) @ lab.T).argmax(0)

    def similarities(t, lab):
        lab = F.normalize(lab.mean(1) if lab.dim() == 3 else lab, dim=-1)
        return F.normalize(t, dim=-1) @ lab.T

    for wrong in (dot_product, mean_before_normalising, wrong_dim, similarities):
        assert not check_zero_shot(wrong, quiet=True), wrong.__name__


# ----------------------------------------------------------------------------- open experiment check
def _trials():
    return [{"r": 1, "lr": 1e-3, "val_acc": 0.70, "trainable_fraction": 0.0005},
            {"r": 8, "lr": 1e-3, "val_acc": 0.78, "trainable_fraction": 0.004},
            {"r": 8, "lr": 3e-3, "val_acc": 0.80, "trainable_fraction": 0.004},
            {"r": 64, "lr": 1e-3, "val_acc": 0.82, "trainable_fraction": 0.03}]


def test_check_lora_search():
    t = _trials()
    assert check_lora_search(t, t[2], 0.81, max_gap=0.02, max_fraction=0.01, quiet=True)
    assert check_lora_search(t, t[2], 0.81, max_gap=0.02, max_fraction=0.01, chosen_test_acc=0.79,
                             full_test_acc=0.80, quiet=True)
    assert not check_lora_search(t, t[1], 0.81, max_gap=0.05, max_fraction=0.01, quiet=True)   # not the best
    assert not check_lora_search(t, t[3], 0.81, max_gap=0.02, max_fraction=0.01, quiet=True)   # too many params
    assert not check_lora_search(t, t[2], 0.85, max_gap=0.02, max_fraction=0.01, quiet=True)   # too far behind
    assert not check_lora_search(t[2:3], t[2], 0.81, max_gap=0.02, max_fraction=0.01, quiet=True)  # no search
    cheat = [dict(x, test_acc=0.8) for x in t]
    assert not check_lora_search(cheat, cheat[2], 0.81, max_gap=0.02, max_fraction=0.01, quiet=True)
    assert not check_lora_search(t, dict(t[2], val_acc=0.9), 0.81, max_gap=0.02, max_fraction=0.01, quiet=True)


# ----------------------------------------------------------------------------- memory by part
class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def _sum_loss(out, labels):
    return out.sum()            # its backward saves no tensor


def test_training_memory_by_hand_on_two_linear_layers():
    b = 5
    batch = {"x": torch.randn(b, 4), "labels": torch.zeros(b, dtype=torch.long)}
    n_params = 4 * 8 + 8 + 8 * 2 + 2
    parts = training_memory(_TwoLayers(), batch, loss_fn=_sum_loss)
    assert parts["weights"] == parts["gradients"] == 4 * n_params
    assert parts["optimizer"] == 2 * 4 * n_params
    # saved for backward: lin1 keeps x [b, 4]; ReLU keeps its output [b, 8], which lin2 keeps as its input:
    # one storage, counted once. The weights are saved too, but they are parameters (counted as weights).
    assert parts["activations"] == parts["activations_after_forward"] == 4 * b * (4 + 8)
    frozen = _TwoLayers()
    frozen.lin1.requires_grad_(False)          # no gradient for lin1's weight: x need not be kept
    parts = training_memory(frozen, batch, loss_fn=_sum_loss)
    assert parts["activations"] == 4 * b * 8
    assert parts["gradients"] == 4 * (8 * 2 + 2) and parts["weights"] == 4 * n_params


def test_training_memory_of_lora_follows_the_trainable_parameters():
    from peft import LoraConfig, get_peft_model
    model = tiny_bert_classifier(seed=0)
    model.encoder = get_peft_model(model.encoder, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                             lora_dropout=0.0))
    trainable, total = trainable_parameters(model)
    ids = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])}
    parts = training_memory(model, batch)
    assert parts["gradients"] == 4 * trainable < parts["weights"] == 4 * total
    assert parts["optimizer"] == 8 * trainable
    assert parts["activations"] > 0
    assert reference_static_memory(model) == {k: parts[k] for k in ("weights", "gradients", "optimizer")}


def test_gradient_checkpointing_keeps_fewer_activations_and_is_switched_off_again():
    ids = torch.randint(1, 50, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    plain = training_memory(tiny_bert_classifier(seed=0), batch)
    model = tiny_bert_classifier(seed=0)
    ckpt = training_memory(model, batch, gradient_checkpointing=True)
    assert ckpt["activations_after_forward"] < plain["activations_after_forward"] / 2
    assert ckpt["activations"] < plain["activations"]
    assert {k: ckpt[k] for k in ("weights", "gradients", "optimizer")} == \
        {k: plain[k] for k in ("weights", "gradients", "optimizer")}
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    # the step trained the same model: the same gradients with and without recomputation
    a, b = tiny_bert_classifier(seed=0), tiny_bert_classifier(seed=0)
    torch.manual_seed(1)            # the same dropout masks (checkpointing replays the RNG state)
    training_memory(a, batch, lr=1e-2)
    torch.manual_seed(1)
    training_memory(b, batch, lr=1e-2, gradient_checkpointing=True)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def _counts_every_gradient(model):
    return {**reference_static_memory(model), "gradients": reference_static_memory(model)["weights"]}


def _one_moment(model):
    ref = reference_static_memory(model)
    return {**ref, "optimizer": ref["gradients"]}


def _counts_trainable_weights_only(model):
    ref = reference_static_memory(model)
    return {**ref, "weights": ref["gradients"]}


def test_check_static_memory():
    assert check_static_memory(reference_static_memory, quiet=True)
    for wrong in (_counts_every_gradient, _one_moment, _counts_trainable_weights_only, lambda m: None):
        assert not check_static_memory(wrong, quiet=True), wrong
    assert "gradients" in check_static_memory(_counts_every_gradient, quiet=True).message

    def stub(model):
        raise NotImplementedError("write predict_memory")
    with pytest.raises(NotImplementedError):
        check_static_memory(stub, quiet=True)


def test_stacked_bars_stack_the_parts_in_order():
    import matplotlib
    matplotlib.use("Agg")
    from ptcourse import plots
    rows = {"full": {"weights": 4, "gradients": 4, "optimizer": 8}, "LoRA": {"weights": 4, "optimizer": 1}}
    fig = plots.stacked_bars(rows, parts=["weights", "gradients", "optimizer"], scale=0.5)
    ax = fig.axes[0]
    optimizer = ax.containers[2]
    assert [b.get_x() for b in optimizer] == [4.0, 2.0]            # starts where weights + gradients end
    assert [b.get_width() for b in optimizer] == [4.0, 0.5]
    assert [t.get_text().strip() for t in ax.texts] == ["8", "2"]  # the totals, scaled


# ----------------------------------------------------------------------------- IA3 and prompt tuning
def _tiny_bert():
    return tiny_bert_classifier(seed=0).encoder


def test_ia3_starts_as_the_identity_and_trains_only_its_vectors():
    """IA3's vectors start at 1: the wrapped encoder gives the pretrained outputs until it trains."""
    encoder = _tiny_bert().eval()
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        wrapped = add_ia3(copy.deepcopy(encoder)).eval()
        after = wrapped(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(before, after)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all(parameter_group(n) == "IA3" for n in names)
    assert not any("attention.output" in n for n in names)          # the attention's own output projection is not adapted
    assert trainable_parameters(wrapped)[0] == ia3_parameter_count(encoder.config)
    with torch.no_grad():                                          # a changed vector changes the output
        next(p for p in wrapped.parameters() if p.requires_grad).mul_(2.0)
        assert not torch.allclose(wrapped(input_ids=ids, attention_mask=mask).last_hidden_state, after)


def test_prompt_tuned_classifier_trains_only_the_prompt_and_head_and_pools_real_tokens():
    """Prompt tuning: the gradient reaches only the virtual tokens and the head; pooling skips the prompt."""
    encoder = _tiny_bert()
    wrapped = add_prompt_tuning(copy.deepcopy(encoder), 3)
    assert prompt_tokens(wrapped) == 3 and prompt_tokens(encoder) == 0
    model = SentenceClassifier(wrapped, 2)
    assert {parameter_group(n) for n, p in model.named_parameters() if p.requires_grad} == {"prompt", "head"}
    assert trainable_parameters(model)[0] == 3 * 16 + 16 * 2 + 2
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    F.cross_entropy(model(ids, mask), torch.tensor([0, 1])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(parameter_group(n) in ("prompt", "head") for n in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    # the vector is the mean over the sentence's own tokens: padding after them changes nothing
    model.eval()
    longer = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(model.embed(ids, mask), model.embed(longer, (longer != 0).long()), atol=1e-5)
        hidden = wrapped(input_ids=ids, attention_mask=mask).last_hidden_state
        assert hidden.shape[1] == 3 + ids.shape[1]
        assert torch.allclose(model.embed(ids, mask), mean_pool(hidden[:, 3:], mask), atol=1e-6)
        assert not torch.allclose(model.embed(ids, mask), mean_pool(hidden[:, :-3], mask), atol=1e-4)


def test_encode_pools_a_prompt_tuned_encoder_like_the_classifier():
    wrapped = add_prompt_tuning(_tiny_bert(), 2)
    data = [{"input_ids": [1, 5, 6, 2]}, {"input_ids": [1, 7, 2]}]
    z = encode(wrapped, data, batch_size=2)
    batch = pad_collate([{**d, "label": 0} for d in data])
    with torch.no_grad():
        want = SentenceClassifier(wrapped, 2).eval().embed(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(z, want, atol=1e-6)


def test_check_ia3_count():
    assert check_ia3_count(ia3_parameter_count, quiet=True)
    wrong = [lambda c: c.num_hidden_layers * 3 * c.hidden_size,                              # ff vector at width d
             lambda c: c.num_hidden_layers * (3 * c.hidden_size + c.intermediate_size),     # + attention output
             lambda c: 2 * c.hidden_size + c.intermediate_size,                             # one layer only
             lambda c: float(ia3_parameter_count(c))]                                       # not an int
    for fn in wrong:
        assert not check_ia3_count(fn, quiet=True)

    def stub(config):
        raise NotImplementedError("write ia3_parameters")
    with pytest.raises(NotImplementedError):
        check_ia3_count(stub, quiet=True)


def test_check_lora_all_linear_count():
    def right(c, r):
        return c.num_hidden_layers * r * (4 * 2 * c.hidden_size + 2 * (c.hidden_size + c.intermediate_size))
    assert check_lora_all_linear_count(right, quiet=True)
    wrong = {"query and value only": lambda c, r: c.num_hidden_layers * r * 2 * 2 * c.hidden_size,
             "attention only": lambda c, r: c.num_hidden_layers * r * 4 * 2 * c.hidden_size,
             "r squared": lambda c, r: right(c, r) * r,
             "one layer": lambda c, r: right(c, r) // c.num_hidden_layers,
             "not an int": lambda c, r: float(right(c, r))}
    for label, fn in wrong.items():
        assert not check_lora_all_linear_count(fn, quiet=True), label
    r = check_lora_all_linear_count(wrong["attention only"], quiet=True)
    assert "r=1: you count" in r.message and "peft trains" in r.message

    def stub(config, r):
        raise NotImplementedError("write lora_all_linear_parameters")
    with pytest.raises(NotImplementedError):
        check_lora_all_linear_count(stub, quiet=True)

def test_check_prompt_pooling():
    def right(hidden, mask):
        return mean_pool(hidden[:, hidden.shape[1] - mask.shape[1]:], mask)
    assert check_prompt_pooling(right, quiet=True)
    slips = {"virtual tokens": lambda h, mask: mean_pool(h[:, :mask.shape[1]], mask),       # the first n positions
             "padding": lambda h, mask: h[:, h.shape[1] - mask.shape[1]:].mean(1),          # mask ignored
             "every position": lambda h, mask: h.mean(1),
             "shape": lambda h, mask: right(h, mask)[0],                                    # one sentence only
             "error": lambda h, mask: mean_pool(h, mask)}                                   # lengths differ: raises
    messages = {k: check_prompt_pooling(fn, quiet=True) for k, fn in slips.items()}
    assert not any(messages.values())
    assert "virtual tokens' outputs" in messages["virtual tokens"].message
    assert "padding is averaged in" in messages["padding"].message
    assert "expected tensor[4, 6]" in messages["shape"].message and "raised" in messages["error"].message

    def stub(hidden, mask):
        raise NotImplementedError("write pool_real_tokens")
    with pytest.raises(NotImplementedError):
        check_prompt_pooling(stub, quiet=True)

