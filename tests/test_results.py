"""ptcourse.report's record: wall time from the notebook's start, load average; Difference's verdicts."""
import json
import subprocess
import sys

import pytest

from ptcourse.results import Difference


@pytest.mark.slow
def test_wall_time_counts_from_the_first_import_of_ptcourse(tmp_path):
    """The record's wall time is the notebook's, not the time since ptcourse.results was first used."""
    code = ("import time, ptcourse; time.sleep(1.5); "
            "ptcourse.report('09_x', {'a': 1}, quiet=True)")
    env = {"PTCOURSE_RESULTS": str(tmp_path), "PTCOURSE_PROFILE": "smoke", "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    rec = json.loads((tmp_path / "09_x.json").read_text())
    assert rec["wall_time_s"] >= 1.5
    assert len(rec["load_avg"]) == 2 and rec["cpu_count"] >= 1


def test_difference_is_paired_by_seed_and_says_when_it_cannot_tell():
    # the same mean gap: consistent across seeds (real) vs noisy (the interval includes 0)
    real = Difference([0.80, 0.82, 0.81], [0.78, 0.80, 0.79])
    noisy = Difference([0.80, 0.86, 0.77], [0.78, 0.78, 0.81])
    assert real.significant and real.low > 0 and "a is better than b" in real.verdict("a", "b")
    assert not noisy.significant and "no clear difference" in noisy.verdict("a", "b")
    # unpaired (Welch) intervals are wider than paired ones on the same numbers
    assert Difference([0.80, 0.82, 0.81], [0.78, 0.80, 0.79], paired=False).low < real.low
    # a baseline that wins is named first, with its lead as a positive number
    lost = Difference([0.70, 0.71, 0.72], [0.75, 0.76, 0.77]).verdict("fine-tuned", "scratch")
    assert lost.startswith("scratch is better than fine-tuned: +5.0 points") and "CI [+" in lost
    assert "too few seeds" in Difference([0.9], [0.8]).verdict()
    with pytest.raises(ValueError, match="one baseline per seed"):
        Difference([0.9, 0.8], [0.8])
