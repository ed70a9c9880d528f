"""Throughput of the advantage computation and the time of a Monte Carlo study. Prints; asserts nothing.

    python benchmarks/bench_estimators.py [--repeats 20]

Writes the numbers to benchmarks/results/estimators.json as well.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from opdlab.core.estimators import compute_advantages
from opdlab.experiments.montecarlo import categorical_study, sequence_study

RESULTS = Path(__file__).resolve().parent / "results" / "estimators.json"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def advantage_throughput(batch: int, length: int, repeats: int, dtype: torch.dtype) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    logp_student_BT = -torch.rand(batch, length, generator=g, dtype=dtype) * 5
    logp_teacher_BT = -torch.rand(batch, length, generator=g, dtype=dtype) * 5
    mask_BT = torch.ones(batch, length, dtype=dtype)
    rows = []
    for gamma in (0.0, 0.5, 1.0):
        for method in ("opd", "opd_plus"):
            seconds = median_seconds(lambda: compute_advantages("forward_kl", logp_student_BT, logp_teacher_BT, mask_BT,
                                                                method=method, gamma=gamma), repeats)
            rows.append(dict(batch=batch, length=length, dtype=str(dtype).removeprefix("torch."), gamma=gamma,
                             method=method, median_s=seconds, tokens_per_s=batch * length / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = []
    for dtype in (torch.float32, torch.float64):
        rows += advantage_throughput(64, 4096, args.repeats, dtype)
    for r in rows:
        print(f"compute_advantages {r['batch']}x{r['length']} {r['dtype']:7s} gamma={r['gamma']:.1f} {r['method']:8s} "
              f"{r['median_s'] * 1e3:7.2f} ms  {r['tokens_per_s'] / 1e6:7.1f} M tokens/s")
    studies = {}
    start = time.perf_counter()
    categorical_study(n_samples=(1, 4, 16, 64, 256, 1024), n_repeats=200)
    studies["categorical_study_9_divergences_200x1024"] = time.perf_counter() - start
    start = time.perf_counter()
    sequence_study(n_repeats=400)
    studies["sequence_study_3_divergences_5_gammas_3_baselines_400x16"] = time.perf_counter() - start
    for name, seconds in studies.items():
        print(f"{name}: {seconds:.2f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                       advantages=rows, studies_s=studies), indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
