"""Benchmark: run-steps per second of a cohort (R runs stepped together, ``opdlab.training.cohort``) against today's
sweep workers, each stepping one run.

What is measured, per size and task and R in {1, 2, 4, 8, 16, 32}: the wall time of one ``cohort.cohort_step`` of R
runs (R students of one size, each sampling its own completions with its own generator from one stacked decoder,
the teacher scoring all runs' samples in one forward, the students' forward and backward in one stacked forward,
each run's own advantage, clip and AdamW), as R / (median step time) run-steps per second. ``--scoring`` chooses
whether teacher and students score all runs in one forward or run by run (the default follows
``cohort.scores_together``: together on CUDA, run by run on CPU); sampling is always stacked. The runs mix notebook
04's arms (reverse KL, forward KL, JSD, each stop-gradient and OPD+, with the preset's expected baseline and log u
clip 2) and seeds. Beside it, the baseline: today's sweep, which gives each worker process one run
(``opdlab.experiments.sweep.resolve_workers("auto")``: as many single-threaded workers as CPUs, here 2; on CUDA one process),
all stepping ``step.opd_step`` at once; its run-steps per second is the sum over workers of 1 / (median step time).
``ratio`` = cohort / baseline: above 1 the cohort wins.

Sizes: notebook 04's (the ``notebook04`` preset: teacher 128 x 4 layers, student 96 x 4; arithmetic 64 prompts x 4
samples, tool use 32 x 4; the task's completion budget) and bench_peers.py's 4.6M / 1.1M (256 x 6 / 128 x 5,
arithmetic, 16 x 4, 64 tokens). The models are random (no teacher is trained): their completions run to the budget
far more often than a warm-up student's, so the sampling phase weighs more here than in a real run.

GFLOP/s counts model FLOPs as bench_train.py does (2 N per token forward, 4 N backward; sampling over the
sampled tokens, scoring over the packed tokens), summed over runs, over the median step time; ``peak_fraction``
divides it by a matmul peak measured in the same process (fp32 on CPU, bf16 on CUDA, where the package computes
under bf16 autocast). ``peak_rss_mb`` is the process's peak resident memory: each (size, task, R) runs in a
fresh process, so it is that point's own.

    python benchmarks/bench_cohort.py [--quick] [--device cpu] [--R 1 2 4 8 16 32] [--steps 3]
                                      [--scoring auto|together|apart] [--case nb04/tool_use] [--out PATH]
    python benchmarks/bench_cohort.py --quick   # notebook 04's arithmetic size, R in 1, 2, 4: a test

Writes benchmarks/results/cohort.csv (``--quick`` writes no CSV unless ``--out`` names one, so that it never
replaces the committed measurement); the last line printed is
``cohort ratio at notebook 04 size: X.XX``, the best R against the baseline on notebook 04's arithmetic.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_train import matmul_peak, model_flops_per_token

from opdlab.config import presets
from opdlab.config.recipe import ModelRecipe
from opdlab.experiments.sweep import resolve_workers
from opdlab.lm import packed
from opdlab.lm.device import pick_device
from opdlab.lm.modeling import build_model
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.tasks import get_task
from opdlab.training.cohort import cohort_step, sample_runs
from opdlab.training.step import Trainer, opd_step

_NB04 = presets.get("notebook04")
SIZES = {  # name: (teacher recipe, student recipe)
    "nb04": (_NB04.spec.models.recipe("teacher"), _NB04.spec.models.recipe("student")),
    "4.6M/1.1M": (ModelRecipe(hidden=256, layers=6, heads=4, intermediate=640, seed=0),
                  ModelRecipe(hidden=128, layers=5, heads=4, intermediate=384, seed=1)),
    "tiny": (ModelRecipe(hidden=32, layers=1, heads=2, intermediate=64, seed=0),  # for tests only (--case)
             ModelRecipe(hidden=32, layers=1, heads=2, intermediate=64, seed=1)),
}
CASES = {  # (size, task): notebook 04's spec for the task (batch, learning rate, clip), or bench_peers.py's workload
    ("nb04", "arithmetic"): _NB04.spec_for("arithmetic"),
    ("nb04", "tool_use"): _NB04.spec_for("tool_use"),
    ("4.6M/1.1M", "arithmetic"): _NB04.spec_for("arithmetic").replace(prompts_per_step=16, lr=1e-4, max_new_tokens=64),
}
EXTRA = {("tiny", "arithmetic"): _NB04.spec_for("arithmetic").replace(prompts_per_step=4, samples_per_prompt=2,
                                                                       max_new_tokens=6)}
"""Cases run only when named (``--case tiny/arithmetic``): tiny models for a test of the script itself."""
ARMS = [(d, m) for d in ("reverse_kl", "forward_kl", "jsd") for m in ("opd", "opd_plus")]
COLUMNS = ("size", "task", "R", "run_steps_per_s", "baseline_run_steps_per_s", "ratio", "gflops",
           "peak_fraction", "peak_rss_mb")
HEADLINE = ("nb04", "arithmetic")


def trainers(size: str, task_name: str, R: int, steps: int, device: torch.device) -> list[Trainer]:
    """R runs of ``size`` on ``task_name`` sharing one random teacher and starting from one random student:
    run r has arm ``ARMS[r % 6]`` and seed r."""
    task = get_task(task_name)
    tok = char_tokenizer(task.alphabet)
    teacher_recipe, student_recipe = SIZES[size]
    teacher = build_model(teacher_recipe, tok).to(device).eval()
    student = build_model(student_recipe, tok).to(device)
    out = []
    for r in range(R):
        divergence, method = ARMS[r % len(ARMS)]
        spec = {**CASES, **EXTRA}[(size, task_name)].replace(divergence=divergence, method=method, steps=steps,
                                                              seed=r, eval_n=1)
        out.append(Trainer(spec, task, teacher, copy.deepcopy(student), tok))
    return out


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def step_flops(trs: list[Trainer], step: int) -> float:
    """Model FLOPs of one cohort step on the prompts of ``step``, counted on a fresh sample of every run (with
    copies of their generators, so the timed runs are untouched)."""
    first = trs[0]
    gens = [torch.Generator(device=tr.device).set_state(tr.generator.get_state()) for tr in trs]
    rollouts = sample_runs([tr.student for tr in trs], first.tokenizer, [[ex.prompt for ex in tr.batch(step)]
                                                                         for tr in trs],
                           first.task, first.max_new_tokens, gens)
    fs, ft = model_flops_per_token(first.student), model_flops_per_token(first.teacher)
    total = 0.0
    for r in rollouts:
        scored = len(packed.pack_rollout(r)[0].ids_N)
        total += fs * r.n_sampled + (ft + 3 * fs) * scored
    return total


def point(size: str, task: str, R: int, steps: int, device: torch.device, scoring: str = "auto") -> dict:
    """One cohort of R: median step time over ``steps`` timed steps after one untimed one; ``scoring`` as
    ``cohort_step``'s ``score_together`` (``auto``: the device's default)."""
    trs = trainers(size, task, R, steps + 1, device)
    together = {"auto": None, "together": True, "apart": False}[scoring]
    times = []
    for step in range(steps + 1):
        t0 = synced(device)
        cohort_step(trs, step, score_together=together)
        times.append(synced(device) - t0)
    median = statistics.median(times[1:])
    flops = step_flops(trs, steps)
    peak = matmul_peak(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return dict(run_steps_per_s=R / median, gflops=flops / median / 1e9, peak_fraction=flops / median / 1e9 / peak,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step_s=median,
                matmul_peak_gflops=peak, threads=torch.get_num_threads(),
                gpu_peak_mb=torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None)


def worker(size: str, task: str, steps: int, device: torch.device) -> dict:
    """One sweep worker's run: ``opd_step`` of one run (the first arm), median step time after one untimed."""
    tr = trainers(size, task, 1, steps + 1, device)[0]
    times = []
    for step in range(steps + 1):
        t0 = synced(device)
        opd_step(tr, step)
        times.append(synced(device) - t0)
    return dict(run_steps_per_s=1 / statistics.median(times[1:]))


def spawn(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, *args, "--threads", str(threads)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen) -> dict:
    """The JSON line a child printed last, or ``{"error": ...}`` with its last line of stderr."""
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(lines[-1])


def baseline(size: str, task: str, steps: int, device: str) -> dict:
    """Today's sweep workers, all stepping their own run at once; their run-steps per second summed."""
    workers = resolve_workers("auto", device)
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [spawn(["--worker", size, task, "--steps", str(steps), "--device", device], threads)
             for _ in range(workers)]
    results = [collect(p) for p in procs]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    return dict(run_steps_per_s=sum(r["run_steps_per_s"] for r in results), workers=workers, threads=threads)


def fmt(x, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="notebook 04's arithmetic, R in 1, 2, 4, 2 steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--R", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (after one untimed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of a cohort")
    parser.add_argument("--case", action="append", metavar="SIZE/TASK",
                        help="only this case (repeatable), e.g. nb04/tool_use; default: every case")
    parser.add_argument("--out", help="the CSV to write (default benchmarks/results/cohort.csv; --quick: none)")
    parser.add_argument("--scoring", choices=("auto", "together", "apart"), default="auto",
                        help="score all runs in one forward (together), run by run (apart), or the device's "
                             "default (auto: together on CUDA, apart on CPU)")
    parser.add_argument("--point", nargs=3, metavar=("SIZE", "TASK", "R"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.point or args.worker:  # a child process: one measurement, printed as JSON
        device = pick_device(args.device)
        res = point(*args.point[:2], int(args.point[2]), args.steps, device, args.scoring) if args.point else \
            worker(*args.worker, args.steps, device)
        print(json.dumps(res))
        return
    device = str(pick_device(args.device))
    cases, Rs, steps = list(CASES), args.R, args.steps
    if args.quick:
        cases, Rs, steps = [HEADLINE], [1, 2, 4], 2
    if args.case:
        cases = [tuple(c.rsplit("/", 1)) for c in args.case]  # the last "/" ends the size (4.6M/1.1M/arithmetic)
        unknown = [c for c in cases if c not in {**CASES, **EXTRA}]
        if unknown:
            parser.error(f"unknown case(s) {['/'.join(c) for c in unknown]}; known: "
                         f"{', '.join('/'.join(c) for c in {**CASES, **EXTRA})}")
    rows, best = [], None
    print(f"cohort step against today's sweep workers on {device}, cohort threads {args.threads}, scoring "
          f"{args.scoring}, median of {steps} steps after one untimed")
    print(f"{'size':<10}{'task':<11}{'R':>3}{'run-steps/s':>13}{'baseline':>10}{'ratio':>7}{'GFLOP/s':>9}"
          f"{'of peak':>9}{'RSS MB':>9}")
    for size, task in cases:
        base = baseline(size, task, steps, device)
        if "error" in base:
            print(f"{size:<10}{task:<11}baseline failed: {base['error']}")
        for R in Rs:
            res = collect(spawn(["--point", size, task, str(R), "--steps", str(steps), "--device", device,
                                 "--scoring", args.scoring], args.threads))
            if "error" in res:
                print(f"{size:<10}{task:<11}{R:>3}  failed: {res['error']}")
                rows.append(dict(size=size, task=task, R=R))
                continue
            b = base.get("run_steps_per_s")
            ratio = res["run_steps_per_s"] / b if b else None
            rows.append(dict(size=size, task=task, R=R, run_steps_per_s=res["run_steps_per_s"],
                             baseline_run_steps_per_s=b, ratio=ratio, gflops=res["gflops"],
                             peak_fraction=res["peak_fraction"], peak_rss_mb=res["peak_rss_mb"]))
            print(f"{size:<10}{task:<11}{R:>3}{res['run_steps_per_s']:>13.3f}{fmt(b, 3):>10}{fmt(ratio, 2):>7}"
                  f"{res['gflops']:>9.1f}{res['peak_fraction']:>9.1%}{res['peak_rss_mb']:>9.0f}"
                  + (f"  GPU {res['gpu_peak_mb']:.0f} MB" if res.get("gpu_peak_mb") is not None else ""),
                  flush=True)
            if (size, task) == HEADLINE and ratio is not None:
                best = ratio if best is None else max(best, ratio)
    path = Path(args.out) if args.out else None if args.quick else \
        Path(__file__).resolve().parent / "results" / "cohort.csv"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(",".join(COLUMNS) + "\n")
            for row in rows:
                f.write(",".join("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float)
                                                                else str(row[c])) for c in COLUMNS) + "\n")
        print(f"wrote {path}")
    print(f"cohort ratio at notebook 04 size: {fmt(best, 2) or 'n/a'}")


if __name__ == "__main__":
    main()
