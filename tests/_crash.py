"""A training loss that raises at a chosen optimizer step: a crash mid-epoch, for the resume tests."""
import torch


class Crash(Exception):
    pass


def crash_at(step):
    """A cross-entropy loss that raises :class:`Crash` at training step ``step`` (validation batches,
    run without gradients, are not counted)."""
    count = {"n": 0}

    def loss_fn(logits, y):
        count["n"] += torch.is_grad_enabled()
        if count["n"] == step:
            raise Crash
        return torch.nn.functional.cross_entropy(logits, y)
    return loss_fn
