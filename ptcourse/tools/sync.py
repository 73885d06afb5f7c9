"""Results that reach prose only through generated tables, from ``results/*.json``.

* the README's summary and the instructor guide's times: ``python -m ptcourse results --dir results
  --update-readme README.md docs/instructors.md`` rewrites the tables between their markers;
* each chapter's "What we measured" cell: a markdown cell that starts with
  ``<!-- measured:NN_name -->`` is filled from ``results/NN_name.json`` by
  ``python -m ptcourse results --dir results --update-notebooks``;
* :func:`unrecorded_numbers` finds figures in a chapter's prose that its record does not hold.

Tests fail when either table is stale or when prose quotes a number of its own run that the
record does not hold, so a chapter's text cannot drift away from its measurements.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..results import fmt, load_results

# the metrics the README's summary shows per chapter (everything is in results/*.json and
# `python -m ptcourse results`); a chapter not listed here shows all its metrics
HEADLINE = {
    "00_getting_started": ["test_acc", "resume_identical", "steps_per_s"],
    "01_autoencoders": ["labels_per_class", "acc_scratch", "acc_frozen", "acc_finetuned", "acc_knn_dae_code",
                        "acc_knn_pixels"],
    "02_contrastive_learning": ["labels_per_class", "linear_acc_random", "linear_acc_autoencoder", "linear_acc_simclr",
                                "acc_simclr_finetuned", "acc_supervised_scratch", "temperature_chosen",
                                "augment_speedup_median"],
    "03_bert_finetuning": ["budgets", "acc_finetuned", "acc_frozen", "acc_tfidf", "acc_scratch", "gain_over_strongest",
                           "speedup_dynamic", "speedup_grouped"],
    "04_resnet_transfer": ["pretrained", "labels_per_class", "acc_linear_probe", "acc_last_block",
                           "acc_full_finetune", "acc_scratch", "src_shots", "src_acc_near_probe", "src_acc_far_probe",
                           "src_acc_none_probe", "src_acc_near_full", "src_acc_far_full", "src_acc_none_full"],
    "05_knowledge_distillation": ["acc_teacher", "acc_student_scratch", "acc_student_kd", "mnist_acc_scratch",
                                  "mnist_acc_kd_transfer", "size_kb_student", "size_kb_student_quantized",
                                  "latency_ms_student", "latency_ms_student_quantized"],
    "07_parameter_efficient_finetuning": ["per_class", "zero_shot_average", "zero_shot_spread", "linear_probe_test_acc",
                                          "bitfit_test_acc", "lora_r8_test_acc", "full_test_acc",
                                          "lora_r8_trainable_pct", "lora_r8_saved_mb", "full_saved_mb"],
    "08_interview_questions": [],
}


def wall_time(record: dict) -> str:
    """``"6.4 min (load 1.1 → 2.0)"``: the run's wall time with the load average it saw, when recorded."""
    load = record.get("load_avg") or [None, None]
    seen = f" (load {load[0]:.1f} → {load[1]:.1f})" if None not in load else ""
    return f"{record['wall_time_s'] / 60:.1f} min{seen}"


def summary_table(folder=None) -> str:
    """One Markdown row per chapter: profile, headline metrics, wall time (for the README)."""
    lines = ["| chapter | profile | headline results | wall time |", "|---|---|---|---|"]
    for r in load_results(folder):
        keys = [k for k in HEADLINE.get(r["chapter"], r["metrics"]) if k in r["metrics"]]
        cell = "<br>".join(f"`{k}` {fmt(r['metrics'][k])}" for k in keys)
        lines.append(f"| {r['chapter']} | {r['profile']} | {cell} | {wall_time(r)} |")
    return "\n".join(lines)


def times_table(folder=None) -> str:
    """One Markdown row per recorded chapter: profile, device, threads, wall time and load (for the guide)."""
    lines = ["| chapter | profile | device, threads | wall time of the recorded run (load average) | recorded |",
             "|---|---|---|---|---|"]
    for r in load_results(folder):
        lines.append(f"| {r['chapter']} | {r['profile']} | {r['device']}, {r.get('threads', '?')} | "
                     f"{wall_time(r)} | {r['recorded'][:10]} |")
    return "\n".join(lines)


# marker name -> the generated table that goes between <!-- name:start --> and <!-- name:end -->
TABLES = {"results": summary_table, "times": times_table}


def sync_readme(path, folder=None, check: bool = False) -> bool:
    """Regenerate every table of :data:`TABLES` whose markers ``path`` holds (README, instructor guide).

    Returns whether the file was already up to date; with ``check`` nothing is written.
    """
    path = Path(path)
    text = new = path.read_text(encoding="utf-8")
    found = False
    for name, table in TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start in new and end in new:
            found = True
            head, rest = new.split(start, 1)
            _, tail = rest.split(end, 1)
            new = f"{head}{start}\n{table(folder)}\n{end}{tail}"
    if not found:
        raise ValueError(f"{path} has none of the generated sections " + ", ".join(f"<!-- {n}:start -->" for n in TABLES))
    if new != text and not check:
        path.write_text(new, encoding="utf-8")
    return new == text


# ----------------------------------------------------------------------------- chapters
MEASURED = re.compile(r"^<!-- measured:([0-9A-Za-z_]+) -->")


def measured_block(chapter: str, record: dict | None) -> str:
    """The markdown of a chapter's "What we measured" cell, from its record (or a placeholder)."""
    head = f"<!-- measured:{chapter} -->\n#### What we measured\n\n"
    if record is None:
        return head + (f"_No record yet: run this notebook in the `cpu` profile; it writes "
                       f"`results/{chapter}.json`, and `python -m ptcourse results --update-notebooks` "
                       "puts it here._")
    load = record.get("load_avg") or [None, None]
    busy = ("" if load[1] is None else f", load average {load[0]:.1f} → {load[1]:.1f} on "
            f"{record.get('cpu_count', '?')} cores")
    lines = [head + f"Generated from `results/{chapter}.json` (profile `{record['profile']}`, "
             f"{record['device']}, {record['wall_time_s'] / 60:.1f} min{busy}, recorded "
             f"{record['recorded'][:10]}). Your own run prints its numbers above. {_reruns(record)}"]
    lines += _score_lines(record["metrics"], seed_counts(record))
    lines += _verdict_lines(record.get("verdicts") or [])
    lines += _search_lines(record.get("searches") or {})
    lines += ["", "<details><summary>The whole record</summary>", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {fmt(v)} |" for k, v in record["metrics"].items()]
    lines += ["", "</details>"]
    return "\n".join(lines)


def _reruns(record: dict) -> str:
    """What a rerun can expect to reproduce, from the thread count and the CPU kernels the record names."""
    if record.get("profile") == "smoke":
        return "A smoke run: tiny subsets, so its numbers show that the code runs and measure nothing."
    pinned = (record.get("cpu_kernels") or {}).get("pinned")
    if record.get("device") == "cpu" and pinned:
        return (f"This run pinned its CPU kernels to AVX2 on {record.get('threads', '?')} threads, so a rerun "
                "with as many threads on an x86 machine with AVX2 repeats its numbers; elsewhere they differ "
                "in the last digits at first, and training can grow that into the seed-to-seed spread that "
                "the intervals below are about.")
    return ("A run on another machine differs in the last digits at first, and training can grow that into "
            "the seed-to-seed spread that the intervals are about.")


def _numbers(value) -> bool:
    return (isinstance(value, list) and len(value) >= 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


def seed_counts(record: dict) -> set[int]:
    """How many seeds the record's scores were measured over: its verdicts' ``n`` and its ``seeds`` metric.

    >>> seed_counts({"metrics": {"seeds": [0, 1, 2]}, "verdicts": [{"n": 5}]})
    {3, 5}
    """
    counts = {v.get("n") for v in record.get("verdicts") or []}
    seeds = record.get("metrics", {}).get("seeds")
    counts.add(len(seeds) if isinstance(seeds, list) else seeds)
    return {c for c in counts if isinstance(c, int) and not isinstance(c, bool) and c >= 2}


def _mean_sd(values) -> str:
    import statistics
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


_BUDGET_KEYS = ("budgets", "labels_per_class", "per_class", "probe_budgets")


def _score_lines(metrics: dict, seeds: set[int] | None = None) -> list[str]:
    """The chapter's results as a reader wants them: every score measured over seeds as mean ± sd.

    Only lists as long as a seed count of the record (``seeds``: see `seed_counts`) are per-seed scores;
    other lists (a grid, the budgets, a shape) are left to the whole-record table. A metric holding per-seed
    scores is one row; ``key_per_seed`` holding one list per budget is one row with a column per budget; a
    table ``{method: {budget: [per-seed scores]}}`` becomes a methods × budgets table of its own.
    """
    seeds = seed_counts({"metrics": metrics}) if seeds is None else seeds
    per_seed = lambda v: _numbers(v) and len(v) in seeds
    lines, rows = [], []
    for key, table in metrics.items():
        if not (isinstance(table, dict) and table and all(
                isinstance(row, dict) and row and all(per_seed(x) for x in row.values()) for row in table.values())):
            continue
        cols = list(dict.fromkeys(c for row in table.values() for c in row))
        lines += ["", f"**{key.replace('_', ' ')}** (mean ± sd over seeds):", "",
                  "| | " + " | ".join(map(str, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_mean_sd(row[c]) if c in row else "" for c in cols) + " |"
                  for name, row in table.items()]
    nested = {k: v for k, v in metrics.items()
              if isinstance(v, list) and len(v) >= 1 and all(per_seed(x) for x in v)}
    if nested:
        width = max(map(len, nested.values()))
        labels = next((metrics[k] for k in _BUDGET_KEYS if isinstance(metrics.get(k), list)
                       and len(metrics[k]) == width), list(range(1, width + 1)))
        lines += ["", "**Scores over seeds, per budget** (mean ± sd):", "",
                  "| result | " + " | ".join(map(str, labels)) + " |", "|---" * (width + 1) + "|"]
        lines += [f"| {k.replace('_', ' ')} | " + " | ".join(_mean_sd(x) for x in v) + " |" for k, v in nested.items()]
    rows = [(k, v) for k, v in metrics.items() if per_seed(v)]
    if rows:
        lines += ["", "**Scores over seeds:**", "", "| result | mean ± sd | seeds |", "|---|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {_mean_sd(v)} | {len(v)} |" for k, v in rows]
    return lines


def _verdict_lines(verdicts: list) -> list[str]:
    """The chapter's comparisons in words, what their intervals cover, and the multiple-comparison note."""
    if not verdicts:
        return []
    told = sum(v["outcome"] in ("ahead", "behind") for v in verdicts)
    lines = ["", f"**Verdicts** ({len(verdicts)} comparisons over paired seeds, 95 % intervals):", ""]
    for v in verdicts:
        holm = "" if v["outcome"] not in ("ahead", "behind") else \
            (" (stands after Holm)" if v.get("holm") else " (not after Holm's correction)")
        lines.append(f"* {v['words']}{holm}")
    covers = sorted({v.get("covers", "") for v in verdicts} - {""})
    fixed = sorted({v.get("fixed", "") for v in verdicts} - {""})
    lines += ["", f"The intervals cover {'; '.join(covers) or 'the seeds'}"
              + (f", not {'; '.join(fixed)}" if fixed else "") + ". "
              f"With {len(verdicts)} comparisons, about {0.05 * len(verdicts):.1f} would clear zero by chance "
              f"if nothing differed; {told} did. Holm's rule keeps the chance of any false call at 5 % "
              "for the whole set."]
    return lines


def _search_lines(searches: dict) -> list[str]:
    """One row per choice made on validation: the grid, the choice, and a flag at the grid's edge."""
    if not searches:
        return []
    lines = ["", "**Choices made on validation:**", "", "| choice | grid | chosen | trials | at the edge |",
             "|---|---|---|---|---|"]
    for name, e in searches.items():
        lines.append(f"| {name} | {fmt(e['grid'])} | {fmt(e['chosen'])} | {e['trials']} | {e.get('edge') or 'no'} |")
    return lines


def sync_notebooks(root, folder=None, check: bool = False) -> list[Path]:
    """Fill every ``<!-- measured:... -->`` cell of ``root/chapters/*.ipynb``; return the stale ones.

    With ``check`` nothing is written.
    """
    records = {r["chapter"]: r for r in load_results(folder)}
    stale = []
    for path in sorted(Path(root, "chapters").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        changed = False
        for cell in nb["cells"]:
            src = "".join(cell["source"])
            m = MEASURED.match(src)
            if cell["cell_type"] != "markdown" or not m:
                continue
            new = measured_block(m.group(1), records.get(m.group(1)))
            if new != src:
                lines = new.split("\n")
                cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
                changed = True
        if changed:
            stale.append(path)
            if not check:
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return stale


# figures that read as measurements of the course's own run: a percentage or a speed-up with a
# decimal point ("81.0 %", "2.0x"), a rate ("1.5 steps/s") or a fraction with three or more
# decimals ("0.944"); papers' figures are recognised by a citation in the sentence
_FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+)\s?(%|x\b|×|steps/s|images/s|tokens/s)|(?<![\w.])(0\.\d{3,})(?![\d])")
_CITATION = re.compile(r"et al\.|\b(19|20)\d\d\b|arXiv|\[\d+\]")


def _values(metrics) -> list[float]:
    out = []
    for v in metrics.values() if isinstance(metrics, dict) else metrics:
        if isinstance(v, (dict, list)):
            out += _values(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def unrecorded_numbers(notebook, record: dict | None) -> list[str]:
    """Figures in the notebook's markdown (outside its measured cell) that its record does not hold.

    A figure ``a.b %`` matches a recorded value ``v`` when ``100 v`` or ``v`` rounds to it; ``a.bx``
    when ``v`` does. Sentences that cite a paper (``et al.``, a year) are skipped.

    Example:
        >>> nb = {"cells": [{"cell_type": "markdown", "source": "fine-tuned: 81.0 %"}]}
        >>> unrecorded_numbers(nb, {"metrics": {"acc": 0.8096}}), unrecorded_numbers(nb, {"metrics": {}})
        ([], ['81.0 %'])
    """
    nb = json.loads(Path(notebook).read_text(encoding="utf-8")) if not isinstance(notebook, dict) else notebook
    values = _values(record["metrics"]) if record else []
    bad = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] != "markdown" or MEASURED.match(src):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+|\n", src):
            if _CITATION.search(sentence):
                continue
            for m in _FIGURE.finditer(sentence):
                text = m.group(1) or m.group(3)
                shown, decimals = float(text), len(text.split(".")[1])
                scale = (100, 1) if m.group(2) == "%" else (1,)
                if not any(abs(round(v * s, decimals) - shown) < 1e-9 for v in values for s in scale):
                    bad.append(m.group(0))
    return bad


# the prose's comparative words, by the verdict outcome they claim
CLAIM_WORDS = {
    "ahead": ("beats", "beat ", "is ahead", "stays ahead", "outperforms", "helps", "is better than", "a real gain"),
    "behind": ("is behind", "falls behind", "hurts", "is worse than", "loses to"),
    "not told apart": ("not told apart", "no clear difference", "cannot tell", "can't tell", "closes the gap"),
}
VERDICT_TAG = re.compile(r"<!--\s*verdict:\s*([0-9A-Za-z_]+)\s*-->")


def unsupported_claims(notebook, record: dict | None) -> list[str]:
    """Comparative claims in the prose that the record's verdicts do not support.

    A sentence that compares (``beats``, ``helps``, ``is behind``, ``not told apart``, ...) two
    methods of a recorded verdict must carry that verdict's tag, ``<!-- verdict:KEY -->``, and its
    words must say what the verdict says: "beats" for ``ahead``, "not told apart" where the interval
    includes zero. Returned: the offending sentences with the reason. Only chapters whose record holds
    ``verdicts`` are checked.

    Example:
        >>> record = {"verdicts": [{"key": "kd", "method": "distilled", "baseline": "scratch",
        ...                         "outcome": "not told apart"}]}
        >>> nb = {"cells": [{"cell_type": "markdown", "source": "Distilled beats scratch. <!-- verdict:kd -->"}]}
        >>> unsupported_claims(nb, record)[0].startswith("says 'ahead' but verdict kd is 'not told apart'")
        True
    """
    verdicts = {v["key"]: v for v in (record or {}).get("verdicts") or []}
    if not verdicts:
        return []
    nb = json.loads(Path(notebook).read_text(encoding="utf-8")) if not isinstance(notebook, dict) else notebook
    bad = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] != "markdown" or MEASURED.match(src):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?!<!--)|\n\n", src):
            low = sentence.lower()
            said = [o for o, words in CLAIM_WORDS.items() if any(w in low for w in words)]
            tags = VERDICT_TAG.findall(sentence)
            if not said:
                continue
            if not tags:
                names = [v for v in verdicts.values()
                         if v["method"].lower().split(" (")[0] in low and v["baseline"].lower().split(" (")[0] in low]
                if names:
                    bad.append(f"no verdict tag on a comparison of {names[0]['method']} and {names[0]['baseline']}: "
                               f"{sentence.strip()[:160]}")
                continue
            for key in tags:
                v = verdicts.get(key)
                if v is None:
                    bad.append(f"tags verdict {key}, which the record does not hold: {sentence.strip()[:160]}")
                elif v["outcome"] not in said:
                    bad.append(f"says '{said[0]}' but verdict {key} is '{v['outcome']}': {sentence.strip()[:160]}")
    return bad
