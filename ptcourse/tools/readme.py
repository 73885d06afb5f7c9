"""The README's generated parts: the results summary, from ``results/*.json``.

``python -m ptcourse results --dir results --update-readme README.md`` rewrites the table between
the README's ``results`` markers; a test fails when it is stale.
"""
from __future__ import annotations

from pathlib import Path

from ..results import _fmt, load_results

# the metrics the README's summary shows per chapter (everything is in results/*.json and
# `python -m ptcourse results`); a chapter not listed here shows all its metrics
HEADLINE = {
    "00_getting_started": ["test_acc", "resume_identical", "steps_per_s"],
    "01_autoencoders": ["labels_per_class", "acc_scratch", "acc_frozen", "acc_finetuned", "acc_knn_dae_code",
                        "acc_knn_pixels", "recon_mse"],
    "02_contrastive_learning": ["labels_per_class", "knn_acc_random", "knn_acc_simclr", "linear_acc_random",
                                "linear_acc_simclr", "acc_supervised_scratch", "augment_images_per_s_v2_per_image",
                                "augment_images_per_s_batched"],
    "03_bert_finetuning": ["model", "dataset", "n_train", "acc_frozen", "acc_finetuned", "acc_scratch",
                           "padding_fraction_fixed", "padding_fraction_dynamic", "speedup_dynamic", "speedup_grouped"],
    "04_resnet_transfer": ["pretrained", "labels_per_class", "acc_linear_probe", "acc_last_block",
                           "acc_full_finetune", "acc_scratch"],
    "05_knowledge_distillation": ["acc_teacher", "acc_student_scratch", "acc_student_kd", "mnist_acc_scratch",
                                  "mnist_acc_kd_transfer", "size_kb_student", "size_kb_student_quantized",
                                  "latency_ms_student", "latency_ms_student_quantized",
                                  "latency_ms_per_image_b64_student", "latency_ms_per_image_b64_student_quantized"],
}


def summary_table(folder=None) -> str:
    """One Markdown row per chapter: profile, headline metrics, wall time (for the README)."""
    lines = ["| chapter | profile | headline results | wall time |", "|---|---|---|---|"]
    for r in load_results(folder):
        keys = [k for k in HEADLINE.get(r["chapter"], r["metrics"]) if k in r["metrics"]]
        cell = "<br>".join(f"`{k}` {_fmt(r['metrics'][k])}" for k in keys)
        lines.append(f"| {r['chapter']} | {r['profile']} | {cell} | {r['wall_time_s'] / 60:.0f} min |")
    return "\n".join(lines)


def sync_readme(readme, folder=None, check: bool = False) -> bool:
    """Put :func:`summary_table` between the README's ``results`` markers.

    Returns whether the README was already up to date; with ``check`` nothing is written.
    """
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{start}\n{summary_table(folder)}\n{end}{tail}"
    if new != text and not check:
        readme.write_text(new, encoding="utf-8")
    return new == text
