"""Executing an exercise notebook must fail exactly at its first stub, and nowhere earlier."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_exercise_stops_at_first_stub(path):
    nb = nbformat.read(path, as_version=4)
    first_stub = next(i for i, c in enumerate(nb.cells)
                      if c.cell_type == "code" and "raise NotImplementedError(" in c.source)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    failed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed, "no cell recorded an error"
    assert failed[0] >= first_stub, f"cell {failed[0]} failed before the first stub (cell {first_stub}):\n{info.value}"
    assert info.value.ename == "NotImplementedError", info.value
    assert json.dumps(info.value.evalue, ensure_ascii=False) in nb.cells[first_stub].source, info.value.evalue
