"""``History``: what ``fit`` returns; one row per epoch plus the loss of every step.

Example:
    >>> h = History()
    >>> h.log({"epoch": 1, "train_loss": 0.9, "val_acc": 0.7})
    >>> h.log({"epoch": 2, "train_loss": 0.5, "val_acc": 0.8})
    >>> h.best("val_acc")["epoch"], h["train_loss"]
    (2, [0.9, 0.5])
"""
from __future__ import annotations


class History:
    """The record of a training run: ``epochs`` (a dict per epoch: ``train_loss``, ``val_*``, ``lr``,
    ``time_s``) and ``steps`` (the training loss of every batch)."""

    def __init__(self, epochs=None, steps=None):
        self.epochs: list[dict] = list(epochs or [])
        self.steps: list[float] = list(steps or [])

    def log(self, row: dict) -> None:
        self.epochs.append(dict(row))

    def __getitem__(self, key: str) -> list:
        """One column over the epochs, e.g. ``history["val_acc"]``."""
        return [row.get(key) for row in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def best(self, metric: str, mode: str | None = None) -> dict:
        """The epoch row with the best ``metric`` (lowest for names containing 'loss', else highest)."""
        rows = [r for r in self.epochs if r.get(metric) is not None]
        if not rows:
            raise KeyError(f"no epoch recorded {metric!r}; columns are {sorted(self.epochs[0]) if self.epochs else []}")
        mode = mode or ("min" if "loss" in metric else "max")
        return (min if mode == "min" else max)(rows, key=lambda r: r[metric])

    def to_dict(self) -> dict:
        return {"epochs": [dict(r) for r in self.epochs], "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(d.get("epochs"), d.get("steps"))

    def plot(self, smooth: int = 20):
        """Training loss per step (smoothed) and per-epoch validation curves, side by side."""
        from .plots import history_figure
        return history_figure(self, smooth=smooth)

    def __repr__(self) -> str:
        if not self.epochs:
            return "History(empty)"
        cols = [k for k in self.epochs[0] if k != "time_s"]
        lines = ["  ".join(f"{c:>10}" for c in cols)]
        for r in self.epochs:
            lines.append("  ".join(f"{r.get(c, float('nan')):>10.4g}" if isinstance(r.get(c), float)
                                   else f"{str(r.get(c)):>10}" for c in cols))
        return "\n".join(lines)

