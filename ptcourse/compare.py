"""Choosing on validation and comparing over seeds: the protocol every chapter's experiment follows.

Two questions decide whether a comparison can answer anything:

* **Was each method tuned to its best?** :func:`search` tries every value of a grid on the
  validation split, records every score, picks the best, and flags a choice at an end of the grid
  (the optimum may lie outside it). It can extend a numeric grid by itself until the choice is
  inside, or it records why it stopped. Method and baseline get the same search, counted in trials.
* **Is a difference more than seed noise?** :class:`Difference` (in ``results``) gives the mean
  paired difference over seeds with a confidence interval; :class:`Verdict` turns it into the words
  the prose may use ("ahead by", "behind by", "not told apart"), says what the interval covers and
  what it does not, and :func:`holm` adjusts a chapter's family of verdicts for multiple comparisons.

Example:
    >>> s = search("lr", [1e-3, 3e-3, 1e-2], lambda lr: {1e-3: 0.70, 3e-3: 0.74, 1e-2: 0.72}[lr])
    >>> s.chosen, s.edge
    (0.003, None)
    >>> v = Verdict("ft_vs_scratch", "fine-tuned", "scratch", [0.80, 0.82, 0.81], [0.75, 0.78, 0.76],
    ...             covers="student seeds (data order, initialisation of the head)")
    >>> v.outcome
    'ahead'
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .results import Difference

__all__ = ["Search", "search", "Verdict", "holm", "optional_stopping"]


class Search:
    """The record of one grid search on validation: every value, its score, the choice, an edge flag.

    Built by :func:`search`. ``val`` maps each tried value (in grid order) to its validation score;
    ``edge`` is ``None`` when the choice lies strictly inside the grid, else a sentence saying which
    end it is at and why the grid was not extended further. ``trials`` counts the trainings the
    search cost (grid values × ``trials_per_value``), so that method and baseline can be shown to
    have had the same effort.
    """

    def __init__(self, name, grid, scores, *, maximize=True, edge=None, trials_per_value=1, extended=0):
        self.name, self.grid, self.scores, self.maximize = name, list(grid), list(scores), maximize
        self.trials = len(self.grid) * trials_per_value
        self.extended = extended
        best = (max if maximize else min)(self.scores)
        self.index = self.scores.index(best)  # ties: the first grid value that reaches the best score
        self.chosen, self.best = self.grid[self.index], best
        self.edge = edge

    @property
    def val(self) -> dict:
        return dict(zip(self.grid, self.scores))

    @property
    def at_edge(self) -> bool:
        return len(self.grid) > 1 and self.index in (0, len(self.grid) - 1)

    def to_dict(self) -> dict:
        """The record's entry: ``grid``, ``val`` (one score per grid value), ``chosen``, ``trials``,
        ``extended`` (values added beyond the starting grid) and ``edge`` (None or the reason)."""
        return {"grid": _plain(self.grid), "val": [float(v) for v in self.scores], "chosen": _plain(self.chosen),
                "maximize": self.maximize, "trials": self.trials, "extended": self.extended, "edge": self.edge}

    def __repr__(self) -> str:
        scores = ", ".join(f"{_short(g)}: {s:.4g}" for g, s in zip(self.grid, self.scores))
        flag = f"; at the edge: {self.edge}" if self.edge else ""
        return f"Search({self.name}: {scores} -> {_short(self.chosen)}{flag})"


def search(name: str, grid: Sequence, score: Callable, *, maximize: bool = True, extend: str | Callable | None = None,
           max_extend: int = 2, edge_reason: str | None = None, bound_reason: str | None = None,
           trials_per_value: int = 1) -> Search:
    """Try every value of ``grid`` with ``score(value) -> validation score`` and choose the best.

    Args:
        name: what is chosen ("lr", "temperature"), for the record and the printout.
        grid: the values, in order (numbers ascending, or categories).
        score: trains/evaluates with one value and returns its score on the **validation** split
            (a mean over seeds if you pass several); never the test split.
        maximize: higher is better (accuracy) or lower (loss, perplexity).
        extend: what to do when the best value is at an end of the grid: ``"geometric"`` adds the
            next value beyond that end at the grid's own ratio (``[1e-4, 3e-4, 1e-3]`` -> ``3e-3``),
            ``"linear"`` at its own step, or a function ``(grid, side) -> new value or None``
            (``side`` is ``"low"`` or ``"high"``). ``None``: never extend.
        max_extend: at most this many values are added.
        edge_reason: why a choice left at an edge is acceptable (e.g. "the chapter's time budget",
            "a temperature below 0.1 is unstable"); recorded in ``edge``.
        bound_reason: why a choice at an end of the value's **range** (not of the budget) stays there:
            used instead of ``edge_reason`` when ``extend`` is a function that returns ``None`` for that
            side (nothing lies beyond it, e.g. a weight at 1), whether or not ``max_extend`` was spent.
            Default: the function's own ``bound_reason`` attribute, else "the end of the value's range".
        trials_per_value: trainings behind each score (seeds averaged), counted in ``trials``.

    Returns:
        a :class:`Search`; put ``search.to_dict()`` into the chapter's record.

    Example:
        >>> s = search("C", [0.1, 1.0], lambda c: {0.01: 0.6, 0.1: 0.7, 1.0: 0.65}[c], extend="geometric")
        >>> s.chosen, s.grid     # 0.1 was the lowest value: 0.01 was tried, and 0.1 stays best
        (0.1, [0.01, 0.1, 1.0])
        >>> s = search("C", [1.0, 10.0], lambda c: 1 / c, extend="geometric", max_extend=1)
        >>> s.grid, s.edge is not None
        ([0.1, 1.0, 10.0], True)
        >>> up_to_one = lambda grid, side: None if side == "high" and grid[-1] >= 1 else round(grid[-1] + 0.1, 6)
        >>> search("alpha", [0.8, 0.9, 1.0], lambda a: a, extend=up_to_one, edge_reason="the time budget").edge
        "highest value of the grid: the end of the value's range: nothing lies beyond it"
    """
    grid = list(grid)
    if not grid:
        raise ValueError(f"search({name!r}): the grid is empty.")
    if len(set(map(repr, grid))) != len(grid):
        raise ValueError(f"search({name!r}): the grid {grid} repeats a value.")
    scores = [_score(score, name, v) for v in grid]
    added = 0
    while added < max_extend and extend is not None and len(grid) > 1:
        pick = (max if maximize else min)(scores)
        i = scores.index(pick)
        if i not in (0, len(grid) - 1):
            break
        side = "low" if i == 0 else "high"
        new = _next_value(grid, side, extend)
        if new is None:
            break
        value = _score(score, name, new)
        grid, scores = ([new] + grid, [value] + scores) if side == "low" else (grid + [new], scores + [value])
        added += 1
    result = Search(name, grid, scores, maximize=maximize, trials_per_value=trials_per_value, extended=added)
    if result.at_edge:
        side = "lowest" if result.index == 0 else "highest"
        if callable(extend) and extend(list(grid), "low" if result.index == 0 else "high") is None:
            why = bound_reason or getattr(extend, "bound_reason", None) or \
                "the end of the value's range: nothing lies beyond it"
        else:
            why = edge_reason or ("the grid was not extended" if extend is None else
                                  f"still there after extending the grid by {added} value{'s' * (added != 1)}")
        result.edge = f"{side} value of the grid: {why}"
    return result


def _score(score, name, value) -> float:
    s = float(score(value))
    if not math.isfinite(s):
        raise ValueError(f"search({name!r}): the score of {value!r} is {s}; a search needs finite scores.")
    return s


def _next_value(grid, side, extend):
    if callable(extend):
        return extend(list(grid), side)
    a, b = (grid[0], grid[1]) if side == "low" else (grid[-1], grid[-2])
    if extend == "geometric":
        if a <= 0 or b <= 0:
            raise ValueError("extend='geometric' needs a grid of positive numbers.")
        new = a * (a / b)
    elif extend == "linear":
        new = a + (a - b)
    else:
        raise ValueError(f"extend={extend!r}; use 'geometric', 'linear', a function or None.")
    return type(a)(float(f"{new:.3g}")) if isinstance(a, float) else type(a)(round(new))


class Verdict:
    """A named comparison over paired seeds, in the words the prose may use.

    ``outcome`` is ``"ahead"`` (the method's interval lies above 0), ``"behind"`` (below 0),
    ``"not told apart"`` (the interval includes 0) or ``"too few seeds"``. ``covers`` says what
    varied between the seeds, so what the interval is about (e.g. "student seeds: initialisation and
    data order"); ``fixed`` says what did not vary and so is not covered (e.g. "the single
    pretraining run, the teacher, the 1,000 test images"). After :func:`holm`, ``holm`` says
    whether the verdict stands when the chapter's whole family of verdicts is taken into account.

    Example:
        >>> v = Verdict("kd", "distilled", "scratch", [0.61, 0.63, 0.60], [0.60, 0.64, 0.58])
        >>> v.outcome, v.words.startswith("distilled and scratch are not told apart")
        ('not told apart', True)
    """

    def __init__(self, key: str, method: str, baseline: str, method_scores, baseline_scores, *,
                 covers: str = "seeds", fixed: str = "", unit: float = 100, suffix: str = " points",
                 confidence: float = 0.95):
        self.key, self.method, self.baseline = key, method, baseline
        self.covers, self.fixed, self.unit, self.suffix = covers, fixed, unit, suffix
        self.difference = d = Difference(method_scores, baseline_scores, paired=True, confidence=confidence)
        diffs = np.asarray(method_scores, dtype=float) - np.asarray(baseline_scores, dtype=float)
        self.p = _paired_p(diffs)
        if not math.isfinite(d.low):
            self.outcome = "too few seeds"
        else:
            self.outcome = "ahead" if d.low > 0 else "behind" if d.high < 0 else "not told apart"
        self.holm: bool | None = None

    @property
    def words(self) -> str:
        """The sentence for the prose: "fine-tuned is ahead of scratch by +2.3 points [+1.0, +3.5]"."""
        d, u, s = self.difference, self.unit, self.suffix
        span = f"{d.mean * u:+.1f}{s} [{d.low * u:+.1f}, {d.high * u:+.1f}]"
        if self.outcome == "ahead":
            return f"{self.method} is ahead of {self.baseline} by {span}"
        if self.outcome == "behind":
            return f"{self.method} is behind {self.baseline} by {span}"
        if self.outcome == "not told apart":
            return f"{self.method} and {self.baseline} are not told apart: {span}"
        return f"{self.method} vs {self.baseline}: {d.mean * u:+.1f}{s}, too few seeds for a verdict"

    def to_dict(self) -> dict:
        d = self.difference
        return {"key": self.key, "method": self.method, "baseline": self.baseline, "outcome": self.outcome,
                "mean": d.mean, "low": d.low, "high": d.high, "n": d.n, "p": self.p, "holm": self.holm,
                "confidence": d.confidence, "unit": self.unit, "suffix": self.suffix, "words": self.words,
                "covers": self.covers, "fixed": self.fixed}

    def __repr__(self) -> str:
        return f"Verdict({self.key}: {self.words})"


def _paired_p(diffs) -> float:
    """Two-sided p-value of the paired t-test (NaN with fewer than 2 seeds; 0 or 1 with no spread)."""
    from scipy import stats
    if len(diffs) < 2:
        return math.nan
    if np.all(diffs == diffs[0]):
        return 1.0 if diffs[0] == 0 else 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(verdicts: Sequence[Verdict], alpha: float = 0.05) -> list[Verdict]:
    """Holm's step-down correction over a chapter's family of verdicts; sets each ``verdict.holm``.

    With ``m`` verdicts drawn at 95 %, about ``0.05 * m`` would come out "ahead" or "behind" by
    chance alone if nothing differed. Holm's rule keeps the chance of even one false call at
    ``alpha`` for the whole family: sort the p-values, compare the smallest with ``alpha / m``, the
    next with ``alpha / (m - 1)``, ..., and stop at the first that fails. ``holm`` is True for a
    verdict that still excludes "no difference" under that rule (never for "not told apart").

    Example:
        >>> vs = [Verdict(f"v{i}", "a", "b", [0.8, 0.82, 0.81, 0.83], [0.7, 0.71, 0.72, 0.70]) for i in range(3)]
        >>> [v.holm for v in holm(vs)]
        [True, True, True]
    """
    ranked = sorted((v for v in verdicts if math.isfinite(v.p)), key=lambda v: v.p)
    m, still = len(ranked), True
    for i, v in enumerate(ranked):
        still = still and v.p <= alpha / (m - i)
        v.holm = bool(still and v.outcome in ("ahead", "behind"))
    for v in verdicts:
        if not math.isfinite(v.p):
            v.holm = False
    return list(verdicts)


def optional_stopping(start: int = 5, step: int = 5, stop: int = 30, trials: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> dict:
    """How often "add seeds until the interval clears zero" declares a difference that is not there.

    Simulates ``trials`` experiments with **no true effect** (paired differences drawn from a normal
    distribution with mean 0). Each looks at its interval after ``start`` seeds, and if it includes
    zero adds ``step`` more and looks again, up to ``stop``. Returns the share of experiments that
    declared a difference at the first look (about ``1 - confidence``) and at any look.

    Example:
        >>> r = optional_stopping(trials=400)
        >>> r["false_rate_fixed"] < r["false_rate_peeking"]
        True
    """
    from scipy import stats
    rng = np.random.default_rng(seed)
    looks = list(range(start, stop + 1, step))
    diffs = rng.standard_normal((trials, stop))
    declared_first, declared_any = 0, 0
    for row in diffs:
        for j, n in enumerate(looks):
            x = row[:n]
            half = stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
            if abs(x.mean()) > half:
                declared_first += j == 0
                declared_any += 1
                break
    return {"looks": looks, "trials": trials, "false_rate_fixed": declared_first / trials,
            "false_rate_peeking": declared_any / trials}


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
