"""Chapter 08's one helper: print the measurements that back an answer, from the chapters' records.

The interview answers cite results as ``results/NN_x.json → key``; :func:`evidence` prints those
values from the committed records (``results/`` of the course folder), so no number from a run is
ever typed into the prose::

    >>> evidence([("01_autoencoders", "acc_scratch"), ("01_autoencoders", "acc_finetuned")])
    results/01_autoencoders.json (cpu profile)
      acc_scratch     [0.45, 0.644, ...]

A key ``verdict:NAME`` prints the chapter's recorded verdict in words (a paired difference over seeds with
its 95 % interval) and whether it stands after Holm's correction for the chapter's number of verdicts.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..results import fmt

__all__ = ["evidence", "records_folder"]


def records_folder() -> Path | None:
    """The course's committed ``results/`` folder: the first one above the working directory that
    sits beside a ``chapters/`` folder, else the one beside this package; None when there is none."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parents[2]):
        if (folder / "results").is_dir() and (folder / "chapters").is_dir():
            return folder / "results"
    return None


def evidence(pairs, folder=None, max_items: int | None = 6) -> list[dict]:
    """Print ``(chapter, key)`` values from the records, grouped by record; return them as rows.

    A missing record or key prints "not recorded" (run that chapter's cpu profile to record it).
    """
    folder = Path(folder) if folder is not None else records_folder()
    rows, shown = [], None
    for chapter, key in pairs:
        path = folder / f"{chapter}.json" if folder is not None else None
        record = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.exists() else None
        value = _verdict(record, key[len("verdict:"):]) if key.startswith("verdict:") else \
            (record["metrics"].get(key) if record else None)
        rows.append({"chapter": chapter, "key": key, "value": value,
                     "profile": record.get("profile") if record else None})
        if chapter != shown:
            shown = chapter
            where = f"results/{chapter}.json"
            print(f"{where} ({record.get('profile')} profile)" if record else f"{where}: not recorded yet")
        if record:
            shown_value = value if isinstance(value, str) else fmt(value, max_items)
            print(f"  {key:<34s} {shown_value if value is not None else 'not recorded'}")
    return rows


def _verdict(record: dict | None, name: str) -> str | None:
    """A recorded verdict in words, with what Holm's correction says; None when the record has none."""
    for v in (record or {}).get("verdicts") or []:
        if v.get("key") == name:
            if v["outcome"] not in ("ahead", "behind"):
                return v["words"]
            return v["words"] + (" (stands after Holm)" if v.get("holm") else " (not after Holm's correction)")
    return None
