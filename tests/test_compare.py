"""The search protocol and the verdicts: choices on validation with edge flags, comparisons in words."""
import json
import math

import numpy as np
import pytest

from ptcourse import compare, results


def test_search_scores_every_value_and_chooses_the_best_inside_the_grid():
    seen = []

    def score(lr):
        seen.append(lr)
        return -abs(math.log10(lr) + 3)  # best at 1e-3
    s = compare.search("lr", [1e-4, 1e-3, 1e-2], score)
    assert seen == [1e-4, 1e-3, 1e-2] and s.chosen == 1e-3 and s.edge is None and not s.at_edge
    entry = s.to_dict()
    assert entry["grid"] == [1e-4, 1e-3, 1e-2] and entry["chosen"] == 1e-3 and entry["trials"] == 3
    assert entry["val"] == [score(v) for v in entry["grid"]]


def test_a_choice_at_the_edge_is_flagged_when_the_grid_is_not_extended():
    s = compare.search("temperature", [0.1, 0.5, 1.0], lambda t: -t)   # keeps improving downwards
    assert s.chosen == 0.1 and s.at_edge and s.edge.startswith("lowest value of the grid")
    s = compare.search("steps", [150, 450], lambda n: n, edge_reason="the chapter's 15-minute budget")
    assert s.chosen == 450 and "15-minute budget" in s.edge


def test_the_grid_is_extended_until_the_optimum_is_inside():
    s = compare.search("lr", [1e-4, 3e-4, 1e-3], lambda lr: -abs(math.log10(lr) + 2.5), extend="geometric")
    assert s.edge is None and s.extended >= 1 and s.grid[0] == 1e-4 and s.chosen > 1e-3
    assert s.grid == sorted(s.grid) and s.trials == len(s.grid)
    # an optimum out of reach: extension stops at max_extend and says so
    s = compare.search("lr", [1e-4, 1e-3], lambda lr: lr, extend="geometric", max_extend=2)
    assert len(s.grid) == 4 and "after extending the grid by 2 values" in s.edge
    # minimising (perplexity), and extending downwards with a function
    s = compare.search("ppl", [4, 8], lambda h: abs(h - 2), maximize=False,
                       extend=lambda grid, side: grid[0] // 2 if side == "low" and grid[0] > 1 else None)
    assert s.grid == [1, 2, 4, 8] and s.chosen == 2 and s.edge is None


def test_a_choice_at_a_natural_bound_records_the_bound_not_the_budget():
    weight = lambda grid, side: (None if grid[0] <= 0 else max(0.0, grid[0] - 0.25)) if side == "low" else \
        (None if grid[-1] >= 1 else min(1.0, grid[-1] + 0.25))
    for grid, max_extend in (([0.5, 0.75, 1.0], 2), ([0.5, 0.75, 1.0], 0), ([0.25, 0.5, 0.75], 2)):
        s = compare.search("alpha", grid, lambda a: a, extend=weight, max_extend=max_extend,
                           edge_reason="the chapter's time budget")
        assert s.chosen == 1.0 and s.edge == "highest value of the grid: the end of the value's range: nothing lies beyond it"
    s = compare.search("alpha", [0.0, 0.5, 1.0], lambda a: -a, extend=weight, bound_reason="a weight is at least 0")
    assert s.chosen == 0.0 and s.edge == "lowest value of the grid: a weight is at least 0"
    # the budget, not a bound: the rule could go on, max_extend stopped it
    s = compare.search("alpha", [0.25, 0.5], lambda a: a, extend=weight, max_extend=1, edge_reason="the time budget")
    assert s.grid == [0.25, 0.5, 0.75] and s.edge == "highest value of the grid: the time budget"


def test_search_refuses_what_it_cannot_rank():
    with pytest.raises(ValueError, match="empty"):
        compare.search("lr", [], lambda v: 0)
    with pytest.raises(ValueError, match="nan"):
        compare.search("lr", [1, 2], lambda v: float("nan"))
    with pytest.raises(ValueError, match="repeats"):
        compare.search("lr", [1, 1], lambda v: v)


def test_verdict_words_follow_the_interval():
    ahead = compare.Verdict("a", "fine-tuned", "scratch", [0.80, 0.82, 0.81, 0.83], [0.75, 0.76, 0.77, 0.75])
    assert ahead.outcome == "ahead" and ahead.words.startswith("fine-tuned is ahead of scratch by +")
    behind = compare.Verdict("b", "frozen", "scratch", [0.70, 0.71, 0.69], [0.75, 0.76, 0.74])
    assert behind.outcome == "behind" and behind.words.startswith("frozen is behind scratch by -")
    tie = compare.Verdict("c", "kd", "scratch", [0.61, 0.63, 0.60], [0.60, 0.64, 0.58])
    assert tie.outcome == "not told apart" and "[-" in tie.words and "+" in tie.words
    assert compare.Verdict("d", "x", "y", [0.5], [0.4]).outcome == "too few seeds"
    d = ahead.difference
    assert ahead.to_dict()["low"] == d.low and ahead.to_dict()["words"] == ahead.words
    assert 0 < ahead.p < 0.05 and tie.p > 0.05


def test_holm_keeps_only_what_survives_the_family():
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.01, 5)
    strong = compare.Verdict("strong", "m", "b", base + 0.05, base)
    weak = compare.Verdict("weak", "m", "b", base + np.array([0.02, 0.001, 0.015, 0.004, 0.01]), base)
    nothing = [compare.Verdict(f"n{i}", "m", "b", base + rng.normal(0, 0.01, 5), base) for i in range(8)]
    assert weak.outcome == "ahead" and 0.05 / 9 < weak.p < 0.05   # ahead on its own at 95 % ...
    compare.holm([strong, weak, *nothing])
    assert strong.holm is True
    assert weak.holm is False       # ... but not among 10 verdicts: its p is above alpha / (10 - its rank)
    assert all(v.holm is False for v in nothing if v.outcome == "not told apart")


def test_optional_stopping_inflates_false_discoveries():
    r = compare.optional_stopping(trials=3000, seed=1)
    assert abs(r["false_rate_fixed"] - 0.05) < 0.015           # one look: the nominal 5 %
    assert r["false_rate_peeking"] > 2 * r["false_rate_fixed"]  # looking six times: far more


def test_report_records_searches_and_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("PTCOURSE_RESULTS", str(tmp_path))
    s = compare.search("lr", [1e-3, 1e-2, 1e-1], lambda lr: {1e-3: 0.6, 1e-2: 0.7, 1e-1: 0.5}[lr])
    v = compare.Verdict("ft_vs_scratch", "fine-tuned", "scratch", [0.8, 0.82, 0.81], [0.7, 0.71, 0.72],
                        covers="student seeds", fixed="one pretraining run")
    compare.holm([v])
    path = results.report("99_test", {"acc": 0.8}, searches=[s], verdicts=[v], quiet=True)
    record = json.loads(path.read_text())
    assert record["searches"]["lr"]["chosen"] == 0.01 and record["searches"]["lr"]["edge"] is None
    assert record["verdicts"][0]["outcome"] == "ahead" and record["verdicts"][0]["holm"] is True
    assert record["verdicts"][0]["fixed"] == "one pretraining run"
