"""Fine-tuning a small part: what is trained, what it costs, and how far it moves the encoder.

A sentence classifier that reads a transformer encoder through mean pooling, and the measurements
chapter 07 puts in one table (trainable parameters by group, optimizer-state memory, the size of
what must be saved per task) plus two ways to say how far fine-tuning moved a representation::

    >>> model = SentenceClassifier(AutoModel.from_pretrained(name, add_pooling_layer=False))
    >>> trainable_parameters(model)                  # (trainable, total)
    (22565632, 22566402)
    >>> parameter_table(model)                       # per group: embeddings, attention, ...
    >>> z = encode(model.encoder, dataset)           # mean-pooled sentence vectors, in order
    >>> linear_cka(z_before, z_after), mean_cosine(z_before, z_after)

and the pieces of its training protocol: the number of optimizer steps at a label budget
(:func:`training_steps`), a linear head trained alone on frozen sentence vectors to choose the
head's own learning rate (:func:`train_head`), and the size of a LoRA model's scaled update
(:func:`lora_update_norm`), which shows how the rank and the scaling rule set that size.

And what one training step holds in memory, part by part (:func:`training_memory`): weights,
gradients, optimizer state and the activations saved for the backward pass, with or without
gradient checkpointing::

    >>> training_memory(model, batch, gradient_checkpointing=True)
    {'weights': ..., 'gradients': ..., 'optimizer': ..., 'activations': ..., 'activations_after_forward': ...}
"""
from __future__ import annotations

import math
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..metrics import count_parameters
from .bert_finetuning import pad_collate


# ----------------------------------------------------------------------------- the model
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` [B, n, d] over the real tokens (``attention_mask`` 1), [B, d].

    This is how ``all-MiniLM-L6-v2`` was trained to make its sentence vectors.

    Example:
        >>> mean_pool(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]]))
        tensor([[1., 1.]])
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def prompt_tokens(encoder: nn.Module) -> int:
    """How many virtual tokens a ``peft`` prompt-learning model puts in front of every sentence (else 0).

    Example:
        >>> prompt_tokens(get_peft_model(encoder, PromptTuningConfig(task_type="FEATURE_EXTRACTION",
        ...                                                         num_virtual_tokens=8)))
        8
    """
    config = getattr(encoder, "active_peft_config", None)
    return int(config.num_virtual_tokens) if config is not None and config.is_prompt_learning else 0


def sentence_vectors(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled sentence vectors [B, d] of ``encoder`` over the sentence's own tokens.

    A prompt-tuned encoder returns its virtual tokens' outputs first ([B, n_virtual + n, d]); they
    are dropped before pooling, so the vector is the mean over the same real tokens as for every
    other method, and the prompt acts only through attention.

    Example:
        >>> sentence_vectors(encoder, batch["input_ids"], batch["attention_mask"]).shape
        torch.Size([16, 384])
    """
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden[:, hidden.shape[1] - attention_mask.shape[1]:], attention_mask)


class SentenceClassifier(nn.Module):
    """``encoder`` (a Hugging Face encoder, e.g. ``BertModel``), mean pooling, a linear ``head``.

    ``forward(input_ids, attention_mask, labels=None)`` returns the logits, so ``ptcourse.fit``
    trains it with ``loss_fn=F.cross_entropy`` on the batches of ``pad_collate``. The encoder may
    be wrapped by ``peft`` (LoRA, IA3, prompt tuning) or partly frozen; the head is always a new
    ``nn.Linear``. Pooling is over the sentence's real tokens only (:func:`sentence_vectors`): a
    prompt-tuned encoder's virtual tokens are not averaged in.

    Example:
        >>> model = SentenceClassifier(AutoModel.from_pretrained(name, add_pooling_layer=False), 2)
        >>> model(**pad_collate([train[0], train[1]])).shape
        torch.Size([2, 2])
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids, attention_mask):
        return sentence_vectors(self.encoder, input_ids, attention_mask)

    def forward(self, input_ids, attention_mask, labels=None, **_):
        return self.head(self.embed(input_ids, attention_mask))


@torch.no_grad()
def encode(encoder: nn.Module, dataset: Dataset, batch_size: int = 64, device=None) -> torch.Tensor:
    """Mean-pooled sentence vectors [N, d] of a ``Tokenized`` dataset, in the dataset's order.

    Sentences are batched by length (little padding) and put back in order. ``encoder`` is a
    Hugging Face encoder (``peft``-wrapped or not) or a :class:`SentenceClassifier` (its encoder is
    used); pooling is that of :func:`sentence_vectors`. Its train/eval
    mode is restored afterwards.

    Example:
        >>> z = encode(AutoModel.from_pretrained(name), Tokenized(texts, labels, tok))
    """
    if isinstance(encoder, SentenceClassifier):
        encoder = encoder.encoder
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    lengths = torch.tensor([len(dataset[i]["input_ids"]) for i in range(len(dataset))])
    order = torch.argsort(lengths, stable=True)
    was_training = encoder.training
    encoder.eval()
    out = torch.empty(len(dataset), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = pad_collate([{"input_ids": dataset[int(i)]["input_ids"]} for i in idx])
        mask = batch["attention_mask"].to(device)
        out[idx] = sentence_vectors(encoder, batch["input_ids"].to(device), mask).float().cpu()
    encoder.train(was_training)
    return out


# ----------------------------------------------------------------------------- IA3 and prompt tuning
#: IA3's modules in a BERT-family encoder: the attention's key and value (their outputs are scaled)
#: and each layer's second feed-forward matrix (its 4d-wide input, the activation after GELU, is
#: scaled). ``layer.N.output.dense`` only: the attention's own ``attention.output.dense`` is not one.
IA3_TARGETS = r".*\.(key|value)$|.*\.layer\.\d+\.output\.dense$"
IA3_FEEDFORWARD = r".*\.layer\.\d+\.output\.dense$"


def add_ia3(encoder: nn.Module) -> nn.Module:
    """``encoder`` wrapped by ``peft``'s IA3 (Liu et al., 2022) on key, value and the feed-forward.

    Three learned vectors per layer, all starting at 1 (so the model starts as the pretrained
    one): ``l_k`` and ``l_v`` multiply the key and value projections' outputs elementwise,
    ``l_ff`` multiplies the input of the second feed-forward matrix. Everything else is frozen.
    ``encoder`` is changed in place: pass a copy.

    Example:
        >>> enc = add_ia3(copy.deepcopy(base))
        >>> trainable_parameters(enc)[0]      # 6 layers x (384 + 384 + 1536)
        13824
    """
    from peft import IA3Config, get_peft_model
    return get_peft_model(encoder, IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD))


def ia3_parameter_count(config) -> int:
    """IA3's trainable parameters on a BERT config: ``layers x (2 hidden + intermediate)``.

    Example:
        >>> ia3_parameter_count(base.config)      # all-MiniLM-L6-v2: 6 x (2 x 384 + 1536)
        13824
    """
    return config.num_hidden_layers * (2 * config.hidden_size + config.intermediate_size)


def add_prompt_tuning(encoder: nn.Module, num_virtual_tokens: int, init_text: str | None = None,
                      tokenizer: str | None = None) -> nn.Module:
    """``encoder`` wrapped by ``peft``'s prompt tuning (Lester et al., 2021): learned input vectors.

    ``num_virtual_tokens`` vectors of the embedding width are put in front of every sentence's
    word embeddings (in front of ``[CLS]``: the sentence's own tokens move back by that many
    positions) and attended to by every token; they are the only trained part of the encoder.
    With ``init_text`` they start as the word embeddings of that text's tokens (repeated or cut to
    length; ``tokenizer`` names the model whose tokenizer reads it), else at random. The wrapped
    encoder returns the virtual tokens' outputs first; :class:`SentenceClassifier` pools without
    them. ``encoder`` is changed in place: pass a copy.

    Example:
        >>> enc = add_prompt_tuning(copy.deepcopy(base), 8, "a movie review", MODEL)
        >>> prompt_tokens(enc), trainable_parameters(enc)[0]      # 8 x 384
        (8, 3072)
    """
    from peft import PromptTuningConfig, get_peft_model
    kwargs = ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": init_text, "tokenizer_name_or_path": tokenizer}
              if init_text else {"prompt_tuning_init": "RANDOM"})
    return get_peft_model(encoder, PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                                                      num_virtual_tokens=num_virtual_tokens, **kwargs))


# ----------------------------------------------------------------------------- what is trained
GROUPS = ("embeddings", "attention", "feed-forward", "LayerNorm", "biases", "LoRA", "IA3", "prompt", "head", "other")


def parameter_group(name: str) -> str:
    """The group of a parameter, from its name in a BERT-family model (and ``peft``'s LoRA, IA3 and
    prompt-tuning names).

    Order matters: a LoRA matrix (or an IA3 vector) inside an attention layer is ``LoRA`` (``IA3``); a LayerNorm's bias is
    ``LayerNorm``; any other ``.bias`` is ``biases``; then embeddings, attention, feed-forward.

    Example:
        >>> parameter_group("encoder.layer.0.attention.self.query.lora_A.default.weight")
        'LoRA'
        >>> parameter_group("encoder.layer.0.attention.self.key.ia3_l.default")
        'IA3'
        >>> parameter_group("prompt_encoder.default.embedding.weight")
        'prompt'
        >>> parameter_group("encoder.layer.3.output.dense.bias")
        'biases'
    """
    if "lora_" in name:
        return "LoRA"
    if "ia3_l" in name:
        return "IA3"
    if "prompt_encoder" in name:
        return "prompt"
    if "LayerNorm" in name or "layer_norm" in name:
        return "LayerNorm"
    if name.startswith("head.") or ".head." in name or "classifier" in name:
        return "head"
    if name.endswith("bias"):
        return "biases"
    if "embeddings" in name:
        return "embeddings"
    if "attention" in name:
        return "attention"
    if "intermediate" in name or ".output." in name:
        return "feed-forward"
    return "other"


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (each shared tensor counted once).

    Example:
        >>> trainable, total = trainable_parameters(model)
        >>> print(f"{trainable:,} of {total:,} ({trainable / total:.2%})")
    """
    return count_parameters(model, trainable_only=True), count_parameters(model)


def parameter_table(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{group: (trainable, total)}`` for the groups of :func:`parameter_group` that occur.

    The first thing to print after freezing: it shows at once whether anything you meant to
    freeze (a LayerNorm, the embeddings) still trains.

    Example:
        >>> parameter_table(model)["embeddings"]
        (0, 11918592)
    """
    table = {g: [0, 0] for g in GROUPS}
    for name, p in model.named_parameters():
        row = table[parameter_group(name)]
        row[1] += p.numel()
        row[0] += p.numel() if p.requires_grad else 0
    return {g: (t, n) for g, (t, n) in table.items() if n}


def format_parameter_table(model: nn.Module) -> str:
    """:func:`parameter_table` as aligned text, with a total line."""
    rows = parameter_table(model)
    trainable, total = trainable_parameters(model)
    lines = [f"{'group':14s}{'trainable':>13s}{'of':>13s}"]
    lines += [f"{g:14s}{t:13,d}{n:13,d}" for g, (t, n) in rows.items()]
    lines.append(f"{'total':14s}{trainable:13,d}{total:13,d}   ({trainable / total:.3%} trainable)")
    return "\n".join(lines)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (AdamW: two moment tensors per trainable parameter).

    The state exists only after the first ``optimizer.step()``.

    Example:
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        >>> loss.backward(); opt.step(); optimizer_state_bytes(opt)
    """
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changed, i.e. what one task must store on top of the base model."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def saved_bytes(tensors: dict[str, torch.Tensor] | nn.Module) -> int:
    """Size in bytes of ``tensors`` written as a ``safetensors`` file (the format ``peft`` saves).

    Given a model, its :func:`trainable_state_dict` is measured.

    Example:
        >>> saved_bytes(model) / 2**20        # MiB to store per task
    """
    from safetensors.torch import save
    if isinstance(tensors, nn.Module):
        tensors = trainable_state_dict(tensors)
    return len(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


# ----------------------------------------------------------------------------- what changed
def mean_cosine(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two [N, d] embedding matrices.

    1.0: every sentence points where it pointed before (lengths may differ).

    Example:
        >>> mean_cosine(z, 2 * z)
        1.0
    """
    return float(F.cosine_similarity(before.double(), after.double(), dim=1).mean())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) between [N, d1] and [N, d2].

    1.0 when ``y`` is ``x`` up to a rotation and a uniform scale (plus a shift); it compares the
    geometry of the two sets of vectors (which sentences are near which), not the coordinates.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``.

    Example:
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> round(linear_cka(z, 3 * z @ q + 1), 6)
        1.0
    """
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def best_time(fn, rounds: int = 3) -> float:
    """The fastest of ``rounds`` calls of ``fn()`` in seconds (after one untimed warm-up call).

    On a shared machine other programs only ever make a run slower, so the minimum is the
    closest to the code's own cost.
    """
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------- the training protocol
def training_steps(n_examples: int, batch_size: int, epochs: int, min_steps: int) -> tuple[int, int]:
    """``(epochs, steps)`` for ``n_examples``: at least ``epochs`` passes and at least ``min_steps`` steps.

    Whole passes only, so every example is seen equally often. Steps never fall as the data grows
    (a larger budget is never trained for fewer steps), and a tiny budget still gets ``min_steps``
    updates instead of one or two.

    Example:
        >>> [training_steps(n, 16, 3, 30) for n in (8, 64, 256)]
        [(30, 30), (8, 32), (3, 48)]
    """
    batches = math.ceil(n_examples / min(batch_size, n_examples))
    passes = max(epochs, math.ceil(min_steps / batches))
    return passes, passes * batches


def train_head(features: torch.Tensor, labels, *, lr: float, steps: int, batch_size: int, seed: int = 0,
               weight_decay: float = 0.01, warmup: float = 0.1, num_classes: int = 2) -> nn.Linear:
    """A new linear head trained alone with AdamW on frozen sentence vectors ``features`` [N, d].

    The same recipe as the chapter's fine-tuning runs (AdamW, ``steps`` optimizer steps over
    shuffled passes of ``batch_size``, linear warmup then linear decay, gradient clipping at 1), so
    its best learning rate is a fair choice for the head of every method. It costs milliseconds:
    the encoder is not run.

    Example:
        >>> head = train_head(torch.randn(40, 8), [0, 1] * 20, lr=1e-2, steps=30, batch_size=16)
        >>> head(torch.randn(3, 8)).shape
        torch.Size([3, 2])
    """
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    y = torch.as_tensor(labels, dtype=torch.long)
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    warm = int(warmup * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: t / max(1, warm) if t < warm else max(0.0, (steps - t) / max(1, steps - warm)))
    order = torch.empty(0, dtype=torch.long)
    bs = min(batch_size, len(x))
    for _ in range(steps):
        if len(order) < bs:
            order = torch.randperm(len(x), generator=g)
        idx, order = order[:bs], order[bs:]
        loss = F.cross_entropy(head(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        schedule.step()
    return head.eval()


@torch.no_grad()
def lora_update_norm(model: nn.Module) -> float:
    """The mean relative size of a LoRA model's update, ``||scaling * B A||_F / ||W||_F``, over its adapted layers.

    ``scaling`` is what the layer multiplies ``B A`` by: ``alpha / r``, or ``alpha / sqrt(r)`` with
    rsLoRA. Works on ``peft`` LoRA layers (``lora_A``, ``lora_B``, ``scaling`` per adapter) and on any
    module with ``A``, ``B``, ``scaling`` and ``base`` (the chapter's ``LoRALinear``). 0 before training
    (B = 0).

    Example:
        >>> lora_update_norm(get_peft_model(encoder, LoraConfig(r=8, target_modules=["query"])))
        0.0
    """
    sizes = []
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "lora_B") and isinstance(getattr(m, "scaling", None), dict):
            for name, scale in m.scaling.items():
                if name in m.lora_A:
                    delta = scale * m.lora_B[name].weight @ m.lora_A[name].weight
                    sizes.append(float(delta.norm() / m.base_layer.weight.norm()))
        elif all(hasattr(m, a) for a in ("A", "B", "scaling", "base")):
            sizes.append(float((m.scaling * m.B @ m.A).norm() / m.base.weight.norm()))
    if not sizes:
        raise ValueError("lora_update_norm: the model has no LoRA layer.")
    return sum(sizes) / len(sizes)


# ----------------------------------------------------------------------------- memory, part by part
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations")


class _SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward (one count per storage).

    Used as ``torch.autograd.graph.saved_tensors_hooks``: ``pack`` sees every tensor an operation
    keeps for its backward; a finaliser on it says when autograd let it go. Storages in ``skip``
    (the parameters: they are counted as weights) are not counted.
    """

    def __init__(self, skip: set[int]):
        self.skip, self.live, self.peak, self.count = skip, 0, 0, {}

    def _release(self, key: int) -> None:
        self.count[key][0] -= 1
        if self.count[key][0] == 0:
            self.live -= self.count.pop(key)[1]

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.skip or storage.nbytes() == 0:
            return t
        if key not in self.count:
            self.count[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.count[key][0] += 1
        weakref.finalize(t, self._release, key)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _tensor_bytes(tensors) -> int:
    """Bytes of ``tensors`` (None skipped). ``model.parameters()`` yields a shared parameter once."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def training_memory(model: nn.Module, batch: dict, *, loss_fn=F.cross_entropy, lr: float = 1e-3,
                    gradient_checkpointing: bool = False) -> dict[str, int]:
    """Bytes held by one training step of ``model`` on ``batch``, by part, measured on any device.

    One forward pass, ``loss_fn(model(**batch), batch["labels"]).backward()`` and one AdamW step over
    the trainable parameters. The model is changed (it takes that step): measure a fresh copy.

    * ``weights``: every parameter (each shared tensor once), trainable or frozen;
    * ``gradients``: the ``.grad`` tensors after backward, one per trainable parameter;
    * ``optimizer``: ``optimizer.state`` after the step (AdamW: two moments per trainable parameter);
    * ``activations``: the peak, over forward and backward, of the tensors autograd saved for the
      backward pass (counted once per storage, parameters excluded), measured exactly with
      ``torch.autograd.graph.saved_tensors_hooks``; ``activations_after_forward`` is what was held
      when the forward pass ended.

    ``gradient_checkpointing=True`` turns on the Hugging Face model's checkpointing inside ``model``
    (the reentrant variant, whose recomputation the hooks can see; the other variant keeps the
    same tensors) for this step and off again: each layer then keeps only its input, and
    recomputes the rest during backward, one layer at a time.

    Not counted: the allocator's temporaries that live inside one operation, and PyTorch's own
    workspace; on a GPU ``torch.cuda.max_memory_allocated`` sees those too.

    Example:
        >>> model = SentenceClassifier(copy.deepcopy(encoder))
        >>> parts = training_memory(model, pad_collate([train[i] for i in range(16)]))
        >>> {k: v / 2**20 for k, v in parts.items()}          # MiB
    """
    from transformers import PreTrainedModel
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if gradient_checkpointing:
        if hf is None:
            raise ValueError("training_memory: gradient checkpointing needs a Hugging Face model inside `model`.")
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    was_training = model.training
    model.train()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    meter = _SavedTensorMeter({p.untyped_storage().data_ptr() for p in params})
    try:
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"})
            loss = loss_fn(logits, batch["labels"])
            after_forward = meter.live
            loss.backward()
            del loss, logits
        gradients = _tensor_bytes(p.grad for p in params)
        optimizer.step()
        parts = {"weights": _tensor_bytes(params), "gradients": gradients,
                 "optimizer": optimizer_state_bytes(optimizer), "activations": meter.peak,
                 "activations_after_forward": after_forward}
    finally:
        if gradient_checkpointing:
            hf.activation_checkpointing_disable()
            if hasattr(hf, "_require_grads_hook"):
                hf.disable_input_require_grads()
        model.train(was_training)
    return parts
