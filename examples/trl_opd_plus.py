"""OPD+ inside TRL's DistillationTrainer: forward KL, which collapses under the stop-gradient advantage.

Runs as is on tiny local models (random teacher and student over the arithmetic task's characters, built from
a config: nothing is downloaded), or on your own checkpoints with --teacher DIR --student DIR. Any TRL launcher
works (``accelerate launch`` on GPUs); on two CPU processes (gloo) torchrun starts it:

    python examples/trl_opd_plus.py --steps 5
    torchrun --standalone --nproc_per_node 2 examples/trl_opd_plus.py --steps 5

Writes OUTPUT_DIR/log_history.json (TRL's logged metrics, opdlab's under ``opd/``) on the main process.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset

from opdlab.config.recipe import ModelRecipe
from opdlab.integrations.trl import INTEGRATION_METHODS, OPDConfig, OPDTrainer
from opdlab.lm.modeling import build_model, load_model
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.tasks import get_task


def models(teacher_dir: str | None, student_dir: str | None, task):
    """``(teacher, student, student tokenizer, teacher tokenizer)``: the checkpoints given, or tiny random models."""
    if teacher_dir and student_dir:
        (teacher, teacher_tok), (student, student_tok) = load_model(teacher_dir), load_model(student_dir)
        return teacher, student, student_tok, teacher_tok
    tok = char_tokenizer(task.alphabet)
    teacher = build_model(ModelRecipe(hidden=64, layers=2, heads=2, intermediate=128, max_len=128, seed=1), tok)
    student = build_model(ModelRecipe(hidden=32, layers=2, heads=2, intermediate=64, max_len=128, seed=0), tok)
    return teacher, student, tok, tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--method", default="opd_plus", choices=INTEGRATION_METHODS)
    p.add_argument("--baseline", default="none")
    p.add_argument("--gamma", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="completions per process and step")
    p.add_argument("--output-dir", default="trl_opd_plus_out")
    p.add_argument("--teacher", help="a local checkpoint directory (with --student)")
    p.add_argument("--student", help="a local checkpoint directory (with --teacher)")
    a = p.parse_args(argv)

    task = get_task("arithmetic")
    teacher, student, tok, teacher_tok = models(a.teacher, a.student, task)
    prompts = [ex.prompt for ex in task.examples("train", 64, seed=0)]
    args = OPDConfig(
        output_dir=a.output_dir, divergence=a.divergence, method=a.method, baseline=a.baseline, gamma=a.gamma,
        max_steps=a.steps, per_device_train_batch_size=a.batch, max_completion_length=24, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available())  # use_cpu: gloo across CPU processes
    trainer = OPDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                         teacher_processing_class=teacher_tok, train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    if trainer.accelerator.is_main_process:
        out = Path(a.output_dir) / "log_history.json"
        out.write_text(json.dumps({"num_processes": trainer.accelerator.num_processes,
                                   "log_history": trainer.state.log_history}, indent=1))
        print(f"{a.divergence}/{a.method} on {trainer.accelerator.num_processes} process(es): {out}")


if __name__ == "__main__":
    main()
