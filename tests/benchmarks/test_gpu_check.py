"""benchmarks/gpu_check.py (make gpu-check): without CUDA it says so and exits 0; its dry run takes every step at
toy sizes on the CPU, so the steps cannot rot; a failed or unfinished step makes it exit 1 and is named."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the check would run")
def test_without_cuda_it_says_so_and_exits_0():
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_a_step_that_does_not_run_fails_the_check(tmp_path):
    """No time left for the step: it is reported as failed by name and the exit status is 1."""
    done = _run("--device", "cpu", "--dry-run", "--only", "gap", "--budget-s", "1", "--report", str(tmp_path / "r.txt"))
    assert done.returncode == 1, done.stdout + done.stderr
    report = (tmp_path / "r.txt").read_text()
    assert "FAILED: gap" in report and "no time left" in report


def test_the_report_names_failures_with_their_last_lines():
    gc = _load()
    records = [dict(step="tests", status="ok", seconds=3.0, line="5 passed"),
               dict(step="nb04", status="failed", seconds=9.0, line="RuntimeError: boom",
                    traceback="Traceback\n  File x\nRuntimeError: boom")]
    report = gc.render("head", records, 12.0, 470)
    assert "FAILED: nb04" in report and "  nb04: RuntimeError: boom" in report
    assert "every step that ran passed" in gc.render("head", records[:1], 3.0, 470)
    assert gc._count_words("=== 52 passed, 3 skipped, 1 failed in 9.1s ===") == ["52 passed", "3 skipped", "1 failed"]


@pytest.mark.slow
def test_the_dry_run_takes_every_step_on_the_cpu(tmp_path):
    done = _run("--device", "cpu", "--dry-run", "--budget-s", "900", "--report", str(tmp_path / "gpu_check.txt"),
                timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "gpu_check.txt").read_text().splitlines()
    assert len(report) <= 30, "one screen"
    records = {r["step"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert list(records) == list(_load().STEPS)
    cohort = "ok" if (ROOT / "benchmarks" / "bench_cohort.py").exists() else "skipped"
    assert {k: r["status"] for k, r in records.items()} == {
        "tests": "ok", "nb04": "ok", "gap": "ok", "bench_peers": "ok", "bench_cohort": cohort, "nb06": "ok"}
    assert records["tests"]["numbers"]["counts"]["tests"] > 50  # collected, not run, in the dry run
    nb04 = records["nb04"]["numbers"]
    assert len(nb04["accuracy"]) == 2 and all(math.isfinite(x) for x in nb04["exact_divergence"])
    # on the CPU the sampler and the scorer compute in float32: their log-probabilities agree to rounding
    assert records["gap"]["numbers"]["tokens"] > 0 and records["gap"]["numbers"]["max_abs"] < 1e-4
    assert {"opd", "plain"} <= set(records["bench_peers"]["numbers"]["cases"][0]["arms"])
    nb06 = records["nb06"]["numbers"]
    assert nb06["opd_plus"]["kl"][0] > 0, "the layer-dropped student starts away from its teacher"
