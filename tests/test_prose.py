"""The chapters' prose matches their records: generated "What we measured" cells, no stray figures."""
import json
from pathlib import Path

import pytest

from ptcourse.tools.sync import MEASURED, _score_lines, measured_block, seed_counts, sync_notebooks, unrecorded_numbers, unsupported_claims

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def _record(chapter):
    path = ROOT / "results" / f"{chapter}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_has_its_generated_measured_cell(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    names = [MEASURED.match("".join(c["source"])).group(1) for c in cells
             if c["cell_type"] == "markdown" and MEASURED.match("".join(c["source"]))]
    assert names == [path.stem], f"{path.name} needs one markdown cell starting <!-- measured:{path.stem} -->"


def test_measured_cells_match_the_records():
    stale = sync_notebooks(ROOT, ROOT / "results", check=True)
    assert not stale, ("stale 'What we measured' cells in " + ", ".join(p.name for p in stale) +
                       ": python -m ptcourse results --dir results --update-notebooks")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_prose_quotes_only_recorded_figures(path):
    bad = unrecorded_numbers(path, _record(path.stem))
    assert not bad, (f"{path.name} quotes figures that results/{path.stem}.json does not hold: {bad}. "
                     "Print them from the run, or let the generated cell show them.")


def test_a_planted_wrong_number_and_a_stale_table_are_caught(tmp_path):
    """The mechanism can fail: a figure typed into the prose, and a record changed after the fact."""
    chapter = "01_autoencoders"
    record = _record(chapter) or {"chapter": chapter, "metrics": {"acc": 0.5}, "profile": "cpu",
                                  "device": "cpu", "wall_time_s": 60.0, "recorded": "2026-01-01T00:00"}
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "Learning rate 3e-4, std 0.02."}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    assert unrecorded_numbers(nb, record) == []
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": "Fine-tuning reaches 12.3 % here."})
    assert "12.3 %" in unrecorded_numbers(nb, record)
    # a paper's figure with its citation is allowed
    nb["cells"][-1]["source"] = "Hinton et al. (2015) report 12.3 % here."
    assert "12.3 %" not in unrecorded_numbers(nb, record)

    (tmp_path / "chapters").mkdir()
    (tmp_path / "results").mkdir()
    nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": measured_block(chapter, record)})
    (tmp_path / "chapters" / f"{chapter}.ipynb").write_text(json.dumps(nb))
    (tmp_path / "results" / f"{chapter}.json").write_text(json.dumps(record))
    assert sync_notebooks(tmp_path, tmp_path / "results", check=True) == []
    record["metrics"] = {**record["metrics"], "planted": 0.123}
    (tmp_path / "results" / f"{chapter}.json").write_text(json.dumps(record))
    assert [p.name for p in sync_notebooks(tmp_path, tmp_path / "results", check=True)] == [f"{chapter}.ipynb"]
    sync_notebooks(tmp_path, tmp_path / "results")
    assert sync_notebooks(tmp_path, tmp_path / "results", check=True) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_prose_comparisons_are_the_records_verdicts(path):
    bad = unsupported_claims(path, _record(path.stem))
    assert not bad, f"{path.name}: comparative claims no verdict of its record supports:\n" + "\n".join(bad)


def test_a_planted_comparative_claim_is_caught():
    record = {"verdicts": [
        {"key": "kd_vs_scratch", "method": "distilled", "baseline": "scratch", "outcome": "not told apart"},
        {"key": "transfer_vs_scratch", "method": "kd_transfer", "baseline": "scratch", "outcome": "ahead"}]}

    def nb(text):
        return {"cells": [{"cell_type": "markdown", "metadata": {}, "source": text}]}
    honest = ("Distilled and scratch are not told apart. <!-- verdict:kd_vs_scratch --> "
              "With a transfer set, kd_transfer beats scratch. <!-- verdict:transfer_vs_scratch -->")
    assert unsupported_claims(nb(honest), record) == []
    planted = "Distillation helps: distilled beats scratch. <!-- verdict:kd_vs_scratch -->"
    assert "says 'ahead' but verdict kd_vs_scratch is 'not told apart'" in unsupported_claims(nb(planted), record)[0]
    untagged = "Here distilled beats scratch by a wide margin."
    assert unsupported_claims(nb(untagged), record)[0].startswith("no verdict tag on a comparison of distilled")
    unknown = "kd_transfer beats scratch. <!-- verdict:made_up -->"
    assert "which the record does not hold" in unsupported_claims(nb(unknown), record)[0]
    assert unsupported_claims(nb(planted), {"metrics": {}}) == []   # a record without verdicts: not checked


def test_the_measured_cell_shows_scores_over_seeds_as_mean_and_spread():
    """Per-seed lists become 'mean ± sd' rows and a {method: {budget: seeds}} table a methods × budgets grid."""
    metrics = {"seeds": 2, "acc_scratch": [0.5, 0.7], "budgets": [4, 32, 64], "note": "x",
               "acc": {"lora": {"4": [0.5, 0.7], "32": [0.8, 0.8]}, "probe": {"4": [0.1, 0.3]}},
               "acc_full_per_seed": [[0.5, 0.7], [0.6, 0.6], [0.9, 0.7]]}
    text = "\n".join(_score_lines(metrics))
    assert "| lora | 0.6 ± 0.14 | 0.8 ± 0 |" in text
    assert "| probe | 0.2 ± 0.14 |  |" in text            # a budget a method was not run at stays empty
    assert "| acc scratch | 0.6 ± 0.14 | 2 |" in text
    assert "| result | 4 | 32 | 64 |" in text and "| acc full per seed | 0.6 ± 0.14 | 0.6 ± 0 | 0.8 ± 0.14 |" in text
    assert "budgets |" not in text                         # a list as long as no seed count is not a score
    assert _score_lines({"shape": [6, 12], "acc": [0.5, 0.7]}) == []   # no seed count known: no score rows
    assert _score_lines({"acc": [0.5], "n": 3}) == []
    assert seed_counts({"metrics": {"seeds": [0, 1, 2]}, "verdicts": [{"n": 5}, {"n": 1}]}) == {3, 5}



def test_no_chapter_leaves_a_result_placeholder_unfilled():
    """Sentences that depend on a run are written as `<!-- after-record: ... -->` until the record exists;
    a published chapter has none left."""
    left = {p.name: p.read_text(encoding="utf-8").count("after-record:") for p in CHAPTERS}
    assert not {k: v for k, v in left.items() if v}, f"unfilled result placeholders: {left}"
