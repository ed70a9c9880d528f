"""benchmarks/bench_make_figures.py reads the seconds per notebook from `make figures`' output."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_make_figures as bench  # noqa: E402


def test_the_parts_add_up_to_the_wall_time_and_a_log_without_notebooks_is_refused(tmp_path):
    log = ("python3 -m venv .venv\nExecuting: 50%|\r01_bias_derivation.ipynb: 6.5 s -> /x/01.ipynb\n"
           "noise 04_real_students.ipynb: 3 s -> no\n04_real_students.ipynb: 900.0 s -> /x/04.ipynb\nwrote docs\n")
    frame = bench.parts(log, 1000.0, "abc1234")
    assert list(frame["part"]) == ["01_bias_derivation", "04_real_students", "setup and report", "total"]
    assert frame.loc[frame["part"] == "setup and report", "seconds"].item() == pytest.approx(93.5)
    assert frame["seconds"].iloc[:-1].sum() == pytest.approx(1000.0) and set(frame["commit"]) == {"abc1234"}
    with pytest.raises(SystemExit, match="no 'NAME.ipynb"):
        bench.parts("make: nothing to be done\n", 10.0, "abc1234")
