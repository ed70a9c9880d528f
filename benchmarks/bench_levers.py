"""Benchmark: what each of opdlab's speed levers gives, measured by turning it off (or on) in one process.

Arms, each an ``opd_step`` on its own copy of one student against one teacher, on the same prompts
(``bench_peers.make_case``), alternating step by step:

- ``opdlab``: ``opd_step`` as it runs by default;
- ``compiled_decode``: with ``Runtime.compile_decode`` (the decoder's steps through ``torch.compile``;
  compiled in the first warm-up step, untimed);
- ``transformers_sampler``: ``Runtime(sampler="transformers")``, sampling through the ``transformers`` forward
  instead of ``decoder.KVDecoder``;
- ``padded_scorer``: ``Runtime(scorer="padded")``, teacher and student scored by the ``transformers`` forward
  over the padded layout instead of ``opdlab.lm.packed``.

Per arm: the median step time, the median of each phase of ``opd_step`` (sample, teacher, student forward and
backward, optimizer), and ``opdlab / arm`` as the median over paired steps with min and max (below 1:
the arm is slower, so the lever it turns off gains the inverse). Every arm draws the same tokens (the ``tokens``
column), so the steps do the same work.

    python benchmarks/bench_levers.py [--sizes nb04 5M/1M] [--batch 64] [--samples 4] [--steps 8] [--threads 2]

Writes benchmarks/results/bench_levers-cpu.json (gitignored).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import SIZES, WARMUP, clock, make_case, run_case, summarise  # noqa: E402

import opdlab.training.step as opdlab_step  # noqa: E402
from opdlab.config.runtime import Runtime  # noqa: E402

ARMS = ("opdlab", "compiled_decode", "transformers_sampler", "padded_scorer")
PHASES = ("sample", "teacher", "student_forward", "student_backward", "optimizer")


RUNTIMES = {"opdlab": Runtime(), "compiled_decode": Runtime(compile_decode=True),
            "transformers_sampler": Runtime(sampler="transformers"), "padded_scorer": Runtime(scorer="padded")}
"""Each arm is a ``Runtime``: the lever is turned off (or on) by name, not by patching opdlab."""


def make_arm(case, arm: str, phases: dict):
    """``step -> (seconds, sampled tokens)`` for ``arm``; each timed step's phase times go to ``phases[arm]``."""
    tr = opdlab_step.Trainer(case.config(), case.task, case.teacher, copy.deepcopy(case.student), case.tokenizer,
                             RUNTIMES[arm])
    phases[arm] = []

    def step(s: int) -> tuple[float, int]:
        t0 = clock(case.device)
        metrics = opdlab_step.opd_step(tr, s)
        seconds = clock(case.device) - t0
        if s >= WARMUP:
            phases[arm].append({p: metrics[f"time_{p}"] for p in PHASES})
        return seconds, int(metrics["tokens"])
    return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["nb04", "5M/1M"], choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--steps", type=int, default=8, help=f"timed steps (after {WARMUP} warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or args.batch < 1 or args.samples < 1 or args.batch % args.samples:
        parser.error("--steps, --threads, --batch and --samples must be at least 1, the batch a multiple of "
                     "--samples")
    torch.set_num_threads(args.threads)
    cases, lines = [], [f"one OPD step, torch threads {args.threads}, batch {args.batch} ({args.samples} per "
                        f"prompt); median of {args.steps} after {WARMUP} warm-up; opdlab/arm over paired steps",
                        f"{'size':<7}{'arm':>22}{'step s':>8}{'opdlab/arm':>11}{'(min-max)':>13}{'tokens':>8}"
                        + "".join(f"{p[:12]:>13}" for p in PHASES)]
    for size in args.sizes:
        case = make_case(size, args.batch, WARMUP + args.steps, torch.device("cpu"), args.samples)
        phases = {}
        record = run_case(case, {arm: make_arm(case, arm, phases) for arm in ARMS}, args.threads)
        res = summarise(case, record, reference="opdlab")
        for arm, a in res["arms"].items():
            a["phases_s"] = {p: statistics.median(r[p] for r in phases[arm]) for p in PHASES}
            r = a["opdlab_over_arm"]
            lines.append(f"{size:<7}{arm:>22}{a['median_s']:>8.3f}{r['median']:>11.2f}"
                         f"{'(%.2f-%.2f)' % (r['min'], r['max']):>13}{a['sampled_tokens_per_step']:>8.0f}"
                         + "".join(f"{a['phases_s'][p]:>13.4f}" for p in PHASES))
        cases.append(res)
    print("\n".join(lines))
    out = dict(threads=args.threads, steps=args.steps, warmup=WARMUP, torch=torch.__version__, cases=cases)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_levers-cpu.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
