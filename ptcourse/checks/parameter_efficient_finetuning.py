"""Checks for the exercises of chapter 07 (fine-tuning a small part: LoRA, BitFit, zero-shot).

Example:
    >>> from ptcourse.checks.parameter_efficient_finetuning import check_lora_linear
    >>> check_lora_linear(LoRALinear)
    ✅ check_lora_linear: zero at the start, only A and B train, equal to peft's LoRA on 4 layers.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import CheckResult, _describe, attempt, compare, result
from ..chapters.parameter_efficient_finetuning import (SentenceClassifier, add_ia3, parameter_group, trainable_parameters,
                                                       training_memory)

__all__ = ["ReferenceLoRALinear", "reference_bitfit", "reference_zero_shot", "check_lora_linear",
           "check_bitfit", "check_zero_shot", "check_lora_search", "tiny_bert_classifier",
           "reference_static_memory", "check_static_memory", "check_ia3_count", "check_lora_all_linear_count",
           "check_prompt_pooling"]


_result = result


# ----------------------------------------------------------------------------- LoRA
class ReferenceLoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``base`` frozen, A [r, in] random, B [out, r] zero.

    The initialisation is ``peft``'s default: A Kaiming-uniform (as ``nn.Linear`` initialises its
    weight), B zero, so the layer starts as exactly ``base``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling


class _Holder(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft_lora(base: nn.Linear, r: int, alpha: float):
    """``base`` wrapped by peft's LoRA (a copy); returns ``(module, lora_A weight, lora_B weight)``."""
    from peft import LoraConfig, inject_adapter_in_model
    holder = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0),
                                     _Holder(copy.deepcopy(base)))
    layer = holder.lin
    return holder, layer.lora_A["default"].weight, layer.lora_B["default"].weight


_LORA_HINT = ("keep `base` and freeze its parameters; A = nn.Parameter [r, in_features] initialised randomly "
              "(nn.init.kaiming_uniform_(A, a=math.sqrt(5)) like peft), B = nn.Parameter [out_features, r] of "
              "zeros; forward: base(x) + (x @ A.T @ B.T) * (alpha / r).")


def check_lora_linear(lora_cls, quiet=False) -> CheckResult:
    """``lora_cls(base: nn.Linear, r, alpha)`` against peft's LoRA layer on the same weights.

    Checks, on four layer shapes: attributes ``A`` [r, in] and ``B`` [out, r]; the output equals
    ``base`` before training (B starts at zero) while A is random; only A and B train
    (``r * (in + out)`` parameters); with B set to random values (copied, with A, from a peft LoRA
    layer) the outputs equal peft's, for 2-D and 3-D inputs; gradients reach A and B, not ``base``.
    """
    name = "check_lora_linear"
    fail = lambda msg: _result(name, False, msg, _LORA_HINT, quiet)
    g = torch.Generator().manual_seed(0)
    configs = ((16, 12, 4, 8.0), (32, 32, 8, 16.0), (10, 20, 1, 1.0), (24, 8, 2, 32.0))
    for i, (n_in, n_out, r, alpha) in enumerate(configs, 1):
        torch.manual_seed(100 + i)
        base = nn.Linear(n_in, n_out)
        original = copy.deepcopy(base)
        layer, error = attempt(lora_cls, base, r, alpha)
        if error:
            return fail(f"LoRALinear(base, r={r}, alpha={alpha}) {error}")
        A, B = getattr(layer, "A", None), getattr(layer, "B", None)
        if not (isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter)):
            return fail("the layer needs two nn.Parameter attributes, `A` and `B`.")
        if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
            return fail(f"A is {list(A.shape)} and B is {list(B.shape)} for a Linear({n_in}, {n_out}) with r={r}; "
                        f"expected A [{r}, {n_in}] and B [{n_out}, {r}].")
        trainable = {id(p) for p in layer.parameters() if p.requires_grad}
        base_params = [p for p in layer.parameters() if p is not A and p is not B]
        if any(id(p) in trainable for p in base_params) or any(p.requires_grad for p in base.parameters()):
            return fail("the base layer's weight or bias still trains; freeze it (requires_grad_(False)): "
                        "LoRA trains only A and B.")
        count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        if count != r * (n_in + n_out):
            return fail(f"{count} trainable parameters; a rank-{r} adapter on Linear({n_in}, {n_out}) has "
                        f"r * (in + out) = {r * (n_in + n_out)}.")
        x = torch.randn(5, n_in, generator=g)
        with torch.no_grad():
            try:
                start = layer(x)
            except Exception as err:  # noqa: BLE001
                return fail(f"forward raised {type(err).__name__}: {err} on input {_describe(x)}")
            if not torch.allclose(start, original(x), atol=1e-6):
                return fail("before any training the layer's output differs from the base layer's: the adapter "
                            "changes the pretrained model at step 0. B must start at zero (and A random).")
            if float(A.abs().max()) == 0:
                return fail("A starts at zero: with A = 0 and B = 0 both gradients are zero and nothing ever "
                            "trains. Initialise A randomly and only B at zero.")
        ref, ref_A, ref_B = _peft_lora(original, r, alpha)
        with torch.no_grad():
            ref_B.normal_(0, 0.5, generator=g)
            A.copy_(ref_A)
            B.copy_(ref_B)
        for xs in (torch.randn(7, n_in, generator=g), torch.randn(2, 3, n_in, generator=g)):
            with torch.no_grad():
                got, expected = layer(xs), ref(xs)
            if got.shape != expected.shape:
                return fail(f"output shape {list(got.shape)} for input {list(xs.shape)}; expected {list(expected.shape)}.")
            if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
                with torch.no_grad():
                    ratio = float((got - original(xs)).norm() / (expected - original(xs)).norm().clamp(min=1e-12))
                extra = (f" Your update is {ratio:.3g}x peft's, and alpha / r = {alpha / r:.3g} here: is the "
                         "alpha / r scaling missing or wrong?" if abs(ratio - 1) > 1e-3 else "")
                return fail(f"with the same A and B your output differs from peft's LoRA (r={r}, alpha={alpha}), "
                            f"largest difference {float((got - expected).abs().max()):.3g}.{extra}")
        layer.zero_grad()
        layer(torch.randn(4, n_in, generator=g)).square().sum().backward()
        if A.grad is None or B.grad is None or float(B.grad.abs().max()) == 0:
            return fail("no gradient reaches A or B (detached, or computed under torch.no_grad()?).")
    return _result(name, True, f"zero at the start, only A and B train, equal to peft's LoRA (alpha / r scaling) "
                               f"on {len(configs)} layer shapes.", quiet=quiet)


# ----------------------------------------------------------------------------- BitFit
def tiny_bert_classifier(seed: int = 0, all_trainable: bool = True) -> SentenceClassifier:
    """A randomly initialised 2-layer BERT (hidden 16) in a :class:`SentenceClassifier`, for checks."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = SentenceClassifier(BertModel(cfg, add_pooling_layer=False), 2)
    for p in model.parameters():
        p.requires_grad_(all_trainable)
    return model


def reference_bitfit(model: nn.Module) -> nn.Module:
    """BitFit (Ben Zaken et al., 2022): train every bias term and the new head, freeze all else."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.startswith("head."))
    return model


def check_bitfit(select_fn, quiet=False) -> CheckResult:
    """``select_fn(model)`` must leave exactly the biases and the head trainable, in place.

    Run on a small random BERT classifier twice: once with every parameter trainable and once with
    every parameter frozen (the function must set both directions). What differs is named by group.
    """
    name = "check_bitfit"
    hint = ("loop over model.named_parameters() and set p.requires_grad_(...) for EVERY parameter: True for "
            "names ending in '.bias' and for the head ('head.'), False for everything else (LayerNorm "
            "weights and embeddings included).")
    for start in (True, False):
        model = tiny_bert_classifier(all_trainable=start)
        expected = reference_bitfit(tiny_bert_classifier(all_trainable=start))
        out, error = attempt(select_fn, model)
        if error:
            return _result(name, False, error, hint, quiet)
        model = out if isinstance(out, nn.Module) else model
        want = {n for n, p in expected.named_parameters() if p.requires_grad}
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        if got != want:
            extra = sorted({parameter_group(n) + (" weights" if n.endswith("weight") else "") for n in got - want})
            missing = sorted({parameter_group(n) for n in want - got})
            where = "a fully trainable model" if start else "a fully frozen model"
            parts = ([f"still trainable but should be frozen: {', '.join(extra)}"] if extra else []) + \
                    ([f"frozen but should train: {', '.join(missing)}"] if missing else [])
            example = sorted(got ^ want)[0]
            return _result(name, False, f"on {where}, " + "; ".join(parts) + f" (e.g. {example}).", hint, quiet)
    n_train = sum(p.numel() for p in expected.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in expected.parameters())
    return _result(name, True, f"exactly the biases and the head train ({n_train:,} of {n_all:,} parameters in the "
                               "test model), starting from a trainable and from a frozen model.", quiet=quiet)


# ----------------------------------------------------------------------------- zero-shot
def reference_zero_shot(text_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
    """Class ids [N]: the class whose description is most cosine-similar to each text.

    ``label_emb`` is [C, d] (one description per class) or [C, K, d] (K phrasings per class: the
    class vector is the mean of the unit-length phrasing vectors).
    """
    labels = F.normalize(label_emb.float(), dim=-1)
    if labels.dim() == 3:
        labels = labels.mean(1)
    sims = F.normalize(text_emb.float(), dim=-1) @ F.normalize(labels, dim=-1).T
    return sims.argmax(1)


def _zero_shot_cases(seed=0):
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n, c, k, d in ((40, 2, 0, 8), (60, 3, 0, 16), (50, 2, 3, 8), (80, 4, 5, 12)):
        shape = (c, d) if k == 0 else (c, k, d)
        labels = torch.randn(*shape, generator=g)
        # very different lengths, so that a dot product without normalising picks other classes
        labels = labels * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
        texts = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
        cases.append((texts, labels))
    return cases


def check_zero_shot(zero_shot_fn, quiet=False) -> CheckResult:
    """``zero_shot_fn(text_emb [N, d], label_emb [C, d] or [C, K, d]) -> class ids [N]``."""
    return compare("check_zero_shot", zero_shot_fn, reference_zero_shot, _zero_shot_cases(), quiet=quiet,
                   hint="cosine similarity = dot product of unit vectors (F.normalize on both sides); with K "
                        "phrasings, average the unit phrasing vectors of each class first; argmax over the "
                        "classes; return a LongTensor of class ids.")


# ----------------------------------------------------------------------------- the open experiment
def _behind(gap: float) -> str:
    return f"{100 * abs(gap):.1f} points " + ("behind" if gap > 0 else "ahead of")


def check_lora_search(trials, chosen, full_val_acc: float, *, max_gap: float, max_fraction: float,
                      chosen_test_acc: float | None = None, full_test_acc: float | None = None,
                      quiet=False) -> CheckResult:
    """Judge a LoRA rank / learning-rate search.

    ``trials`` is a list of dicts with ``r``, ``lr``, ``val_acc`` and ``trainable_fraction`` (one
    per configuration tried, all on the same training set); ``chosen`` is one of them. Passes when
    at least two configurations were tried, the trials carry no test accuracy (test is used once,
    after choosing), ``chosen`` has the best validation accuracy among the trials under
    ``max_fraction`` trainable parameters, and it is within ``max_gap`` (a fraction, 0.02 = 2
    points) of full fine-tuning's validation accuracy. The test accuracies, when given, are
    printed for information.
    """
    name = "check_lora_search"
    hint = ("try several (r, lr) pairs with trial(r, lr), keep every record in a list, choose the one with the "
            "highest val_acc among those under the parameter limit; never look at test while choosing.")
    fail = lambda msg: _result(name, False, msg, hint, quiet)
    trials = list(trials or [])
    if len(trials) < 2:
        return fail(f"{len(trials)} configuration(s) tried; a search needs at least two to choose from.")
    for t in trials:
        missing = {"r", "lr", "val_acc", "trainable_fraction"} - set(t)
        if missing:
            return fail(f"a trial record lacks {sorted(missing)}: {t}")
        if any("test" in str(k).lower() for k in t):
            return fail("a trial record holds a test accuracy: the choice must be made on validation only; "
                        "measure test once, for the configuration you chose.")
    if not any(chosen is t or chosen == t for t in trials):
        return fail("`chosen` is not one of the trials.")
    allowed = [t for t in trials if t["trainable_fraction"] < max_fraction]
    if chosen["trainable_fraction"] >= max_fraction:
        return fail(f"the chosen configuration trains {chosen['trainable_fraction']:.2%} of the parameters; the "
                    f"limit is {max_fraction:.2%}. Try smaller ranks.")
    best = max(t["val_acc"] for t in allowed)
    if chosen["val_acc"] < best:
        return fail(f"the chosen configuration (r={chosen['r']}, lr={chosen['lr']:g}) has validation accuracy "
                    f"{chosen['val_acc']:.3f}, but another allowed one reached {best:.3f}: choose by validation.")
    gap = full_val_acc - chosen["val_acc"]
    test = ""
    if chosen_test_acc is not None and full_test_acc is not None:
        test = (f" On test (used once, after choosing): {chosen_test_acc:.3f} vs full fine-tuning "
                f"{full_test_acc:.3f} ({_behind(full_test_acc - chosen_test_acc)}).")
    if gap > max_gap:
        return _result(name, False,
                       f"best of {len(trials)} trials: r={chosen['r']}, lr={chosen['lr']:g}, validation "
                       f"{chosen['val_acc']:.3f}, {100 * gap:.1f} points behind full fine-tuning ({full_val_acc:.3f}); "
                       f"the goal is at most {100 * max_gap:.1f}. Try other learning rates or ranks." + test,
                       "learning rate matters more than rank: LoRA usually wants a 3-10x larger LR than full "
                       "fine-tuning.", quiet)
    return _result(name, True, f"r={chosen['r']}, lr={chosen['lr']:g} chosen on validation from {len(trials)} trials: "
                               f"{chosen['val_acc']:.3f}, {_behind(gap)} full fine-tuning with "
                               f"{chosen['trainable_fraction']:.2%} of the parameters trainable." + test, quiet=quiet)


# ----------------------------------------------------------------------------- memory by part
def reference_static_memory(model: nn.Module) -> dict[str, int]:
    """What training ``model`` with AdamW holds besides activations, from its parameters alone.

    ``weights``: every parameter; ``gradients``: one ``.grad`` per trainable parameter;
    ``optimizer``: AdamW's two moments (``exp_avg``, ``exp_avg_sq``) per trainable parameter, in the
    parameter's dtype. Bytes; each shared tensor counted once.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    trainable = [p for p in params if p.requires_grad]
    return {"weights": nbytes(params), "gradients": nbytes(trainable), "optimizer": 2 * nbytes(trainable)}


def _memory_models():
    """Small models with different trainable parts: (description, model, a batch)."""
    from peft import LoraConfig, get_peft_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (4, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    full = tiny_bert_classifier(seed=1)
    bitfit = reference_bitfit(tiny_bert_classifier(seed=2))
    lora = tiny_bert_classifier(seed=3)
    lora.encoder = get_peft_model(lora.encoder, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           lora_dropout=0.0))
    head_only = tiny_bert_classifier(seed=4)
    head_only.encoder.requires_grad_(False)
    return [("full fine-tuning", full, batch), ("BitFit", bitfit, batch), ("LoRA (peft, query and value)", lora, batch),
            ("head only", head_only, batch)]


def check_static_memory(predict_fn, quiet=False) -> CheckResult:
    """``predict_fn(model) -> {"weights", "gradients", "optimizer"}`` in bytes, before any training.

    Each prediction is compared with what one AdamW training step really holds
    (:func:`~ptcourse.chapters.parameter_efficient_finetuning.training_memory`) on four small BERT
    classifiers: fully trainable, BitFit, LoRA on query and value, head only.
    """
    name = "check_static_memory"
    hint = ("weights: numel() * element_size() of EVERY parameter; gradients: the same for the parameters with "
            "requires_grad only; optimizer: AdamW keeps two tensors (exp_avg, exp_avg_sq) of each trainable "
            "parameter's size.")
    for title, model, batch in _memory_models():
        got, error = attempt(predict_fn, copy.deepcopy(model))
        if error:
            return _result(name, False, error, hint, quiet)
        if not isinstance(got, dict) or not {"weights", "gradients", "optimizer"} <= set(got):
            return _result(name, False, f"returned {_describe(got)}; expected a dict with the keys 'weights', "
                                        "'gradients' and 'optimizer'.", hint, quiet)
        measured = training_memory(copy.deepcopy(model), batch)
        wrong = [f"{part}: predicted {int(got[part]):,} bytes, measured {measured[part]:,}"
                 for part in ("weights", "gradients", "optimizer") if int(got[part]) != measured[part]]
        if wrong:
            return _result(name, False, f"on {title}, " + "; ".join(wrong) + ".", hint, quiet)
    return _result(name, True, "weights, gradients and AdamW state predicted to the byte on 4 models "
                               "(full, BitFit, LoRA, head only).", quiet=quiet)


# ----------------------------------------------------------------------------- counting what an adapter trains
def _small_bert_configs():
    """Small BERT configs whose layer count, width and feed-forward width all differ."""
    from transformers import BertConfig
    shapes = ((2, 16, 32), (3, 8, 40), (1, 12, 24), (4, 20, 20))
    return [BertConfig(vocab_size=50, hidden_size=d, num_hidden_layers=n, num_attention_heads=2, intermediate_size=f,
                       max_position_embeddings=32) for n, d, f in shapes]


def _check_count(name, count_fn, adapt, extra_args, what, hint, quiet) -> CheckResult:
    """``count_fn(config, *extra)`` against the trainable count of ``adapt(BertModel(config), *extra)``
    on the small BERT configs, for each tuple ``extra`` of ``extra_args``."""
    from transformers import BertModel
    for config in _small_bert_configs():
        for extra in extra_args:
            torch.manual_seed(0)
            want = trainable_parameters(adapt(BertModel(config, add_pooling_layer=False), *extra))[0]
            got, error = attempt(count_fn, config, *extra)
            if error:
                return _result(name, False, error, hint, quiet)
            if not isinstance(got, (int, np.integer)) or isinstance(got, bool):
                return _result(name, False, f"returned {_describe(got)}; expected an int.", hint, quiet)
            if int(got) != want:
                return _result(name, False, f"for {config.num_hidden_layers} layers, hidden_size {config.hidden_size}, "
                                            f"intermediate_size {config.intermediate_size}"
                                            + "".join(f", r={r}" for r in extra)
                                            + f": you count {int(got):,}, peft trains {want:,}.", hint, quiet)
    return _result(name, True, f"equal to peft's trainable {what} count on 4 BERT shapes.", quiet=quiet)


def check_ia3_count(count_fn, quiet=False) -> CheckResult:
    """``count_fn(config) -> int``: IA3's trainable parameters in a BERT encoder of that config.

    Compared with the trainable count of the real ``peft`` IA3 model (key, value and each layer's
    second feed-forward matrix, :func:`~ptcourse.chapters.parameter_efficient_finetuning.add_ia3`) on
    four small random BERTs whose layer count, width and feed-forward width differ.
    """
    hint = ("per layer one vector for the key's outputs and one for the value's (hidden_size numbers each), and one "
            "for the INPUT of the second feed-forward matrix (intermediate_size numbers); times num_hidden_layers. "
            "No matrices, no biases, and the attention's output projection is not adapted.")
    return _check_count("check_ia3_count", count_fn, add_ia3, [()], "IA3", hint, quiet)


def _lora_all_linear(model, r):
    import warnings
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():        # peft asks transformers about checkpointing in words v6 renames
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))


def check_lora_all_linear_count(count_fn, quiet=False) -> CheckResult:
    """``count_fn(config, r) -> int``: the trainable parameters of rank-``r`` LoRA on every linear
    layer of a BERT encoder of that config (``peft``'s ``target_modules="all-linear"``).

    Compared with ``peft``'s trainable count on four small random BERTs and ranks 1, 4 and 8.
    """
    hint = ("a rank-r adapter on a d_in -> d_out matrix trains A [r, d_in] and B [d_out, r]: r (d_in + d_out). "
            "Each layer has six linear layers: query, key, value and the attention output (hidden -> hidden), "
            "then hidden -> intermediate and intermediate -> hidden; times num_hidden_layers. No biases.")
    return _check_count("check_lora_all_linear_count", count_fn, _lora_all_linear, [(1,), (4,), (8,)],
                        "LoRA (all linear)", hint, quiet)


# ----------------------------------------------------------------------------- prompt tuning: pooling
def check_prompt_pooling(pool_fn, quiet=False) -> CheckResult:
    """``pool_fn(hidden, attention_mask) -> [B, d]``: the mean over a sentence's own tokens of a
    prompt-tuned encoder's output.

    ``hidden`` is [B, m + n, d]: the outputs of the ``m`` virtual tokens first, then those of the
    sentence's ``n`` positions, whose ``attention_mask`` [B, n] marks the real tokens (1) and the
    padding (0). Compared with :func:`~ptcourse.chapters.parameter_efficient_finetuning.mean_pool`
    over ``hidden[:, m:]`` for m = 0, 3 and 8 virtual tokens and sentences of different lengths;
    the two usual slips (the virtual tokens or the padding averaged in) get their own message.
    """
    from ..chapters.parameter_efficient_finetuning import mean_pool
    name = "check_prompt_pooling"
    hint = ("m = hidden.shape[1] - attention_mask.shape[1] virtual tokens come FIRST: drop them "
            "(hidden[:, m:]), then average over the positions where attention_mask is 1.")
    g = torch.Generator().manual_seed(0)
    for m in (0, 3, 8):
        lengths = torch.tensor([5, 2, 7, 1])
        mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
        hidden = torch.randn(4, m + 7, 6, generator=g)
        want = mean_pool(hidden[:, m:], mask)
        got, error = attempt(pool_fn, hidden.clone(), mask.clone())
        if error:
            return _result(name, False, f"with {m} virtual tokens: {error}", hint, quiet)
        if not torch.is_tensor(got) or tuple(got.shape) != tuple(want.shape):
            return _result(name, False, f"with {m} virtual tokens: returned {_describe(got)}; expected "
                                        f"tensor{list(want.shape)} (one vector per sentence).", hint, quiet)
        if torch.allclose(got, want, atol=1e-5):
            continue
        if m and torch.allclose(got, mean_pool(hidden[:, :7], mask), atol=1e-5):
            return _result(name, False, f"with {m} virtual tokens your vectors average the first positions of "
                                        "`hidden`, which are the virtual tokens' outputs.", hint, quiet)
        if torch.allclose(got, hidden[:, m:].mean(1), atol=1e-5):
            return _result(name, False, "the padding is averaged in: a sentence of 2 tokens gets the mean over "
                                        "all 7 positions.", hint, quiet)
        return _result(name, False, f"with {m} virtual tokens: the vectors differ from the mean over the real "
                                    f"tokens by up to {(got - want).abs().max():.3g}.", hint, quiet)
    return _result(name, True, "the mean over the real tokens only, with 0, 3 and 8 virtual tokens in front.",
                   quiet=quiet)
