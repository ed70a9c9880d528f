"""Benchmark: where an OPD training step spends its time, and how close the model compute gets to the machine.

Runs a few OPD steps (after warm-up steps that are not timed) with the notebook-04 model sizes and prints,
per phase (sampling, teacher scoring, student forward, student backward, optimizer, advantages,
bookkeeping), the median time, tokens per second, and the achieved GFLOP/s of the model phases against a
matrix-multiply peak measured in the same run (fp32, and bf16 for reference). Model FLOPs are counted as 2 * N * tokens for a forward and
4 * N * tokens for a backward (N = non-embedding parameters + the output head), the usual estimate, over the
tokens the models actually run on (sampling: the sampled tokens; scoring: the packed tokens of one rollout of the
same batch, ``opdlab.lm.packed``);
attention's T^2 term is small at these lengths and left out. "Overhead" is what is not model compute:
advantages, masking and logging (the ``advantage`` and ``bookkeeping`` phases); it must stay under 10%.

    python benchmarks/bench_train.py [--steps 8] [--task arithmetic] [--device auto]

Writes benchmarks/results/bench_train-<device>.json (gitignored).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from opdlab.config.presets import resolve
from opdlab.lm import packed
from opdlab.lm.modeling import count_parameters
from opdlab.lm.sampling import sample
from opdlab.tasks import get_task
from opdlab.training.models import load_models
from opdlab.training.step import Trainer, opd_step

PHASES = ("sample", "teacher", "student_forward", "student_backward", "optimizer", "advantage", "bookkeeping")
OVERHEAD = ("advantage", "bookkeeping")


def matmul_peak(device: torch.device, n: int = 1024, repeats: int = 20, dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an n x n matrix multiply in ``dtype`` (the median of ``repeats``)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[3:]) / 1e9


def model_flops_per_token(model) -> float:
    """2 * (parameters touched per token): all parameters except the input embedding, whose row lookup is free,
    but with the (tied) output head counted."""
    n = count_parameters(model) - model.get_input_embeddings().weight.numel()
    return 2.0 * (n + model.get_output_embeddings().weight.numel())


def run(args) -> dict:
    config, runtime = resolve(dict(task=args.task, divergence="forward_kl", method="opd_plus", steps=args.steps + 2,
                                   device=args.device, prompts_per_step=args.prompts, samples_per_prompt=args.samples,
                                   baseline=args.baseline))
    task = get_task(config.task.task)
    teacher, student, tok, meta = load_models(config, task, runtime)
    tr = Trainer(config, task, teacher, copy.deepcopy(student), tok, runtime)
    records = [opd_step(tr, step) for step in range(config.optim.steps)][2:]  # two untimed warm-up steps
    peak = matmul_peak(tr.device)
    peak_bf16 = matmul_peak(tr.device, dtype=torch.bfloat16)
    fs, ft = model_flops_per_token(student), model_flops_per_token(teacher)
    med = {p: statistics.median(r[f"time_{p}"] for r in records) for p in PHASES}
    step_time = sum(med.values())
    # tokens that pass through the models per step: the sampled completions, and when scoring the tokens the packed
    # forward runs on (each distinct prompt once, then every real completion token), counted on one fresh rollout
    gen_tokens = statistics.median(r["tokens"] for r in records)
    rollout = sample(tr.student, tok, [ex.prompt for ex in tr.batch(0)], task, tr.max_new_tokens, tr.generator)
    L = len(packed.pack_rollout(rollout)[0].ids_N) if packed.supports(student) else rollout.full()[0].numel()
    flops = {"sample": fs * gen_tokens, "teacher": ft * L, "student_forward": fs * L,
             "student_backward": 2 * fs * L}
    phases = {p: dict(median_s=med[p], share=med[p] / step_time,
                      gflops=flops[p] / med[p] / 1e9 if p in flops else None,
                      tokens_per_s=(gen_tokens if p == "sample" else L) / med[p] if p in flops else None)
              for p in PHASES}
    return dict(device=str(tr.device), threads=torch.get_num_threads(), task=config.task.task,
                batch=config.optim.prompts_per_step * config.optim.samples_per_prompt, max_new_tokens=tr.max_new_tokens,
                student_parameters=count_parameters(student), teacher_parameters=count_parameters(teacher),
                step_s=step_time, sampled_tokens_per_step=gen_tokens, tokens_per_s=gen_tokens / step_time,
                matmul_peak_gflops=peak, matmul_peak_bf16_gflops=peak_bf16,
                model_gflops=sum(flops.values()) / step_time / 1e9,
                overhead_share=sum(med[p] for p in OVERHEAD) / step_time, phases=phases)


def report(res: dict) -> str:
    lines = [f"OPD step on {res['device']} ({res['threads']} threads), task {res['task']}, batch {res['batch']}, "
             f"student {res['student_parameters']:,} / teacher {res['teacher_parameters']:,} parameters",
             f"{'phase':<18}{'median s':>10}{'share':>8}{'tokens/s':>12}{'GFLOP/s':>10}{'of peak':>9}"]
    for p, r in res["phases"].items():
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        gf = f"{r['gflops']:.1f}" if r["gflops"] else "-"
        pk = f"{r['gflops'] / res['matmul_peak_gflops']:.0%}" if r["gflops"] else "-"
        lines.append(f"{p:<18}{r['median_s']:>10.4f}{r['share']:>8.1%}{tps:>12}{gf:>10}{pk:>9}")
    lines.append(f"step {res['step_s']:.3f} s, {res['tokens_per_s']:,.0f} sampled tokens/s, model compute "
                 f"{res['model_gflops']:.1f} GFLOP/s: {res['model_gflops'] / res['matmul_peak_gflops']:.0%} of the "
                 f"fp32 matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s, "
                 f"{res['model_gflops'] / res['matmul_peak_bf16_gflops']:.0%} of the bf16 peak "
                 f"{res['matmul_peak_bf16_gflops']:.0f} GFLOP/s; "
                 f"overhead (advantages, masking, logging) {res['overhead_share']:.1%} of a step")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--baseline", default="expected", help="none, expected (notebook 04's default) or loo")
    args = parser.parse_args()
    res = run(args)
    print(report(res))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"bench_train-{res['device'].split(':')[0]}-{args.baseline}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")
    assert res["overhead_share"] < 0.10, f"non-model work is {res['overhead_share']:.1%} of a step (limit 10%)"


if __name__ == "__main__":
    main()
