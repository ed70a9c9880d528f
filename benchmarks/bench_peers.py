"""Benchmark: the wall time of one on-policy distillation training step, opdlab against its peers.

What is measured: the wall time of one full optimizer update (sample completions from the student, score them
with the teacher, the student's forward with gradient, loss, backward, gradient clipping, optimizer step) on
the same random models and the same prompts, for each arm:

- ``opd``: ``opdlab.training.step.opd_step`` as it runs (the sampler decodes with ``opdlab.lm.decoder.KVDecoder``, the
  teacher and the student score with ``opdlab.lm.packed``, each distinct prompt once);
- ``opd_compiled``: the same ``opd_step`` with ``Runtime.compile_decode``: the decoder's steps run through
  ``torch.compile`` (compiled in the first warm-up step, untimed: the `1st step s` column shows it);
- ``opd_hf_sampler``: the same ``opd_step``, but sampling through the ``transformers`` forward
  (``Runtime(sampler="transformers")`` for this arm only): the difference to ``opd`` is the decoder alone;
- ``plain``: the step as one writes it with ``transformers``: ``model.generate`` (do_sample, temperature 1,
  top_k 0, top_p 1, KV cache), a teacher forward without gradient, a student forward with gradient, the same
  OPD+ reverse-KL advantage with the expected baseline (``opdlab.core.estimators``), REINFORCE loss, backward,
  clip_grad_norm 1.0, AdamW;
- ``trl_gkd``: TRL's on-policy distillation trainer (``trl.DistillationTrainer``, the stable successor of
  ``GKDTrainer``; it always samples from the student, GKD's lmbda = 1) with beta = 1 (reverse KL, the
  divergence of the other arms), configured like them: the same batch, max_new_tokens, temperature 1, no top-k
  or top-p, KV cache, lr 1e-4 constant, clip 1.0, torch AdamW, no gradient checkpointing, bf16 autocast on
  CUDA only (as opdlab);
- ``trl_gkd_defaults``: the same trainer with its own defaults for everything but the workload (batch,
  max_new_tokens, the prompts in order): gradient checkpointing and bf16 on, fused AdamW, linear schedule.

Every arm updates its own copy of one student (same initial weights) against one teacher (TRL's arms get copies,
since accelerate patches the models it prepares). TRL's loss is the full-vocabulary generalised JSD
differentiated through the student (no sampled-token estimator; opdlab's expected baseline also reads the full
distributions). A TRL step is timed inside its own ``trainer.train()`` (a worker thread, paused between
updates, so that the arms still alternate): from ``on_step_begin`` to ``on_step_end``, which covers generation,
teacher scoring, loss, backward, clipping, optimizer and scheduler step; its logging and the fetch of the next
batch of prompt strings fall outside. opdlab's step includes its own bookkeeping (metrics, the exact divergence,
task scoring); the plain step's tokenisation is timed.

Protocol: ``torch.set_num_threads(--threads)``; per size and batch, 2 untimed warm-up steps then ``--steps``
timed ones, the arms in a rotating order every step; per arm the median step time; per arm the ratio
plain / arm as the median over paired steps, with its min and max. Random models (no training) over the
arithmetic task's character vocabulary; they emit <eos> at random (about 1 token in 21), so which completions
end early differs between arms (the ``tokens`` column: sampled tokens per step, <eos> included), while the
batch decodes until every row has ended: at batch 16 and 64 usually all max_new_tokens steps (sometimes a few
fewer at 64 tokens), with 15-22 sampled tokens per row on average. opdlab's decoder stops computing the rows
that ended; ``generate`` keeps them in the batch.

    python benchmarks/bench_peers.py [--sizes nb04 5M/1M] [--batches 16 64] [--samples 1 4] [--steps 10] [--threads 2]
                                     [--device cpu] [--arms opd plain ...]
    python benchmarks/bench_peers.py --quick    # tiny models, one timed step: every arm runs (a test)

The TRL arms need TRL (``pip install -e .[bench]``); without it they are skipped with a message. Writes
benchmarks/results/bench_peers-<device>.json and .png (gitignored).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import queue
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

import opdlab.training.step as opdlab_step
from opdlab.config.recipe import ModelRecipe
from opdlab.config.runtime import Runtime
from opdlab.config.spec import ModelsSpec, RunSpec
from opdlab.core import divergences, estimators
from opdlab.lm.device import autocast, pick_device
from opdlab.lm.modeling import build_model, count_parameters
from opdlab.lm.sampling import sample
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.tasks import get_task

ARMS = ("opd", "opd_compiled", "opd_hf_sampler", "plain", "trl_gkd", "trl_gkd_defaults")
TRL_ARMS = ("trl_gkd", "trl_gkd_defaults")
WARMUP = 2  # untimed steps per arm before the timed ones
LR, GRAD_CLIP = 1e-4, 1.0  # the RunSpec defaults, used by every arm but trl_gkd_defaults
_NB04 = ModelsSpec()  # notebook 04's models: teacher 128 x 4 layers (heads 4, MLP 384), student 96 x 4 (3, 288)
SIZES = {  # name: (teacher recipe, student recipe, max_new_tokens)
    "nb04": (_NB04.recipe("teacher"), _NB04.recipe("student"), 28),
    "5M/1M": (ModelRecipe(hidden=256, layers=6, heads=4, intermediate=640, seed=0),
              ModelRecipe(hidden=128, layers=5, heads=4, intermediate=384, seed=1), 64),
    "tiny": (ModelRecipe(hidden=32, layers=2, heads=2, intermediate=64, seed=0),
             ModelRecipe(hidden=32, layers=1, heads=2, intermediate=64, seed=1), 6),
}


@dataclass
class Case:
    """One size x batch: the task, tokenizer, models and the prompts of every step (the same for every arm)."""

    size: str
    batch: int
    samples: int  # completions per prompt (the batch holds batch / samples distinct prompts)
    max_new_tokens: int
    steps: int  # warm-up + timed
    task: object
    tokenizer: object
    teacher: torch.nn.Module
    student: torch.nn.Module
    prompts: list  # prompts[step]: the batch's prompt strings

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def config(self) -> RunSpec:
        """The opdlab arms' spec: OPD+ reverse KL, expected baseline, ``samples`` completions per prompt, and
        the full max_new_tokens (not the task's automatic budget)."""
        return RunSpec.from_dict(dict(task="arithmetic", divergence="reverse_kl", method="opd_plus",
                                      baseline="expected", steps=self.steps, prompts_per_step=self.batch // self.samples,
                                      samples_per_prompt=self.samples, max_new_tokens=self.max_new_tokens, lr=LR,
                                      grad_clip=GRAD_CLIP, seed=0))


def make_case(size: str, batch: int, steps: int, device: torch.device, samples: int = 1) -> Case:
    """Random teacher and student of ``size`` over the arithmetic task's characters, and the prompts of each
    step: the training examples opdlab's ``Trainer`` would draw (``task.examples("train", ..., seed=0)``), each
    repeated ``samples`` times in a row (as ``Trainer.batch`` groups them)."""
    teacher_recipe, student_recipe, max_new_tokens = SIZES[size]
    task = get_task("arithmetic")
    tok = char_tokenizer(task.alphabet)
    teacher = build_model(teacher_recipe, tok).to(device).eval()
    student = build_model(student_recipe, tok).to(device)
    P = batch // samples
    examples = task.examples("train", steps * P, seed=0)
    prompts = [[ex.prompt for ex in examples[s * P:(s + 1) * P] for _ in range(samples)] for s in range(steps)]
    return Case(size, batch, samples, max_new_tokens, steps, task, tok, teacher, student, prompts)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: torch.device):
    """``fn(step) -> sampled tokens`` as ``step -> (seconds, sampled tokens)``, the wall time between synchronised
    clocks."""
    def run(step: int) -> tuple[float, int]:
        t0 = clock(device)
        tokens = fn(step)
        return clock(device) - t0, tokens
    return run


def opd_arm(case: Case, fast: bool, compiled: bool = False):
    """``opd_step`` on a copy of the student; ``fast=False`` samples with the transformers forward
    (``Runtime.sampler``). Measures the whole call (sampling, teacher, student forward and backward, advantages,
    clipping, AdamW, bookkeeping)."""
    runtime = Runtime(compile_decode=compiled, sampler="fast" if fast else "transformers")
    tr = opdlab_step.Trainer(case.config(), case.task, case.teacher, copy.deepcopy(case.student), case.tokenizer,
                             runtime)
    for s in range(case.steps):  # the same prompts as the other arms
        assert [ex.prompt for ex in tr.batch(s)] == case.prompts[s], "opdlab's Trainer draws other prompts"

    return timed(lambda s: opd_step_tokens(tr, s), case.device)


def opd_step_tokens(tr, s: int) -> int:
    """One ``opd_step``; the number of tokens it sampled."""
    return int(opdlab_step.opd_step(tr, s)["tokens"])


def plain_arm(case: Case):
    """A plain OPD+ step with ``model.generate`` on a copy of the student (see the module doc); measures the whole
    step, tokenisation included, in opdlab's precision (bf16 autocast on CUDA, fp32 on CPU)."""
    student, device, tok = copy.deepcopy(case.student), case.device, case.tokenizer
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    div = divergences.get("reverse_kl")

    def step(s: int) -> int:
        ids, attention = left_padded(tok, case.prompts[s], device)
        student.eval()
        with autocast(device):
            seq = student.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, max_new_tokens=case.max_new_tokens, use_cache=True,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        completion_BT, mask_BT = completion_and_mask(seq, ids.shape[1], tok.eos_token_id)
        full = torch.cat([attention, mask_BT.long()], 1)
        with torch.no_grad():
            logp_teacher_BT, logp_teacher_BTV = completion_logp(case.teacher, seq, full, completion_BT)
        student.train()
        logp_student_BT, logp_student_BTV = completion_logp(student, seq, full, completion_BT)
        adv = estimators.baselined_advantages(div, logp_student_BT.detach(), logp_teacher_BT, mask_BT, "opd_plus",
                                              0.0, "expected", logp_student_BTV.detach(), logp_teacher_BTV)
        loss = estimators.reinforce_loss(logp_student_BT, adv.A_BT, mask_BT)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
        optimizer.step()
        return int(mask_BT.sum())
    return timed(step, device)


def left_padded(tok, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_BP, attention_BP)``: the prompts' tokens, left-padded."""
    rows = [tok.encode(p, add_special_tokens=False) for p in prompts]
    P = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(r)) + r for r in rows], device=device)
    attention = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, attention


def completion_and_mask(seq_BL: torch.Tensor, P: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated columns and their loss mask: 1 up to and including the first <eos>, 0 after it."""
    completion = seq_BL[:, P:]
    is_eos = (completion == eos).long()
    return completion, ((is_eos.cumsum(1) - is_eos) == 0).float()


def completion_logp(model, seq_BL, attention_BL, completion_BT) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BT, logp_BTV)`` of the completion tokens: one forward over prompt + completion (position ids count
    real tokens), the logits at columns P-1 .. L-2."""
    T = completion_BT.shape[1]
    positions = (attention_BL.cumsum(1) - 1).clamp_min(0)
    with autocast(seq_BL.device):
        logits = model(input_ids=seq_BL, attention_mask=attention_BL, position_ids=positions).logits
    logp_BTV = torch.log_softmax(logits[:, -T - 1:-1].float(), -1)
    return logp_BTV.gather(-1, completion_BT[..., None]).squeeze(-1), logp_BTV


def trl_status() -> tuple[object | None, str]:
    """``(trl module or None, one line saying which TRL runs the trl_gkd arms, or why none does)``."""
    try:
        import trl
    except ImportError:
        return None, "TRL is not installed: the trl_gkd arms are skipped (pip install -e .[bench] adds it)"
    if not hasattr(trl, "DistillationTrainer"):
        return None, (f"TRL {trl.__version__} has no DistillationTrainer: the trl_gkd arms are skipped "
                      "(pip install -e .[bench] installs a TRL that has it)")
    return trl, f"TRL {trl.__version__}: trl_gkd arms run trl.DistillationTrainer (on-policy, beta 1 = reverse KL)"


def trl_config(trl, case: Case, output_dir: str, defaults: bool):
    """The ``DistillationConfig`` of ``trl_gkd`` (matched to opdlab's step) or of ``trl_gkd_defaults`` (TRL's
    defaults; only the workload, device and the silencing of logging and saving are set)."""
    workload = dict(output_dir=output_dir, per_device_train_batch_size=case.batch, gradient_accumulation_steps=1,
                    max_completion_length=case.max_new_tokens, max_steps=case.steps, shuffle_dataset=False,
                    use_cpu=case.device.type == "cpu", report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, seed=0)
    if defaults:
        return trl.DistillationConfig(**workload)
    return trl.DistillationConfig(
        **workload, beta=1.0, temperature=1.0, top_k=0, top_p=1.0, learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=GRAD_CLIP, optim="adamw_torch",
        gradient_checkpointing=False, bf16=case.device.type == "cuda", disable_dropout=True,
        generation_kwargs={"use_cache": True})


class TRLArm:
    """A TRL ``DistillationTrainer`` on copies of the teacher and student, trained by its own ``trainer.train()``
    in a worker thread that waits before every optimizer update until ``__call__`` asks for one. The callback
    times ``on_step_begin`` -> ``on_step_end``: generation, teacher scoring, loss, backward, clipping, optimizer
    and scheduler step. The worker reports a step only when it is waiting again (or done), so its logging and
    data loading never overlap another arm."""

    def __init__(self, trl, case: Case, defaults: bool, threads: int):
        from datasets import Dataset
        from transformers import PrinterCallback

        self.case, self.error, self.results, self.go = case, None, queue.Queue(), threading.Semaphore(0)
        self.ready = threading.Event()  # set once train() waits before its first update
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_peers_trl_")
        data = Dataset.from_dict({"prompt": [p for step in case.prompts for p in step]})
        self.trainer = trl.DistillationTrainer(
            model=copy.deepcopy(case.student), teacher_model=copy.deepcopy(case.teacher),
            args=trl_config(trl, case, self.tmp.name, defaults), train_dataset=data,
            processing_class=case.tokenizer, callbacks=[_StepTimer(self, threads)])
        self.trainer.remove_callback(PrinterCallback)
        batches = [[x["prompt"] for x in b] for b in self.trainer.get_train_dataloader()]
        assert batches == case.prompts, "TRL's dataloader gives other prompts than the other arms"
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()
        # accelerate keeps one global state, which the next arm's TrainingArguments resets: let train() prepare
        # this trainer (model, optimizer, autocast) and reach its first update before anything else runs
        self.ready.wait()
        if self.error is not None:
            raise RuntimeError(f"TRL's trainer did not start: {self.error!r}") from self.error

    def _train(self):
        try:
            self.trainer.train()
        except BaseException as err:  # reported to the main thread by __call__
            self.error = err
        finally:
            self.ready.set()
            self.results.put(None)

    def __call__(self, step: int) -> tuple[float, int]:
        self.go.release()
        item = self.results.get()
        if item is None:
            raise RuntimeError(f"TRL's trainer stopped at step {step}: {self.error!r}") from self.error
        return item

    def close(self):
        self.thread.join(timeout=60)
        self.tmp.cleanup()


class _StepTimer(TrainerCallback):
    """Pauses TRL's training loop before each update and times the update (see ``TRLArm``)."""

    def __init__(self, arm: TRLArm, threads: int):
        self.arm, self.threads, self.pending, self.t0 = arm, threads, None, 0.0

    def _report(self):
        if self.pending is not None:
            self.arm.results.put(self.pending)
            self.pending = None

    def on_train_begin(self, args, state, control, **kwargs):
        torch.set_num_threads(self.threads)  # a new thread: give it the benchmark's intra-op threads

    def on_step_begin(self, args, state, control, **kwargs):
        self._report()
        self.arm.ready.set()
        self.arm.go.acquire()
        self.t0 = clock(self.arm.case.device)

    def on_step_end(self, args, state, control, **kwargs):
        seconds = clock(self.arm.case.device) - self.t0
        mean_length = self.arm.trainer._metrics["train"]["completions/mean_length"][-1]
        self.pending = (seconds, int(round(mean_length * self.arm.case.batch)))

    def on_train_end(self, args, state, control, **kwargs):
        self._report()


def make_arms(case: Case, names: list[str], trl, threads: int) -> dict:
    """The arms ``names`` of ``case`` as ``{name: step -> (seconds, sampled tokens)}``."""
    makers = {"opd": lambda: opd_arm(case, fast=True), "opd_hf_sampler": lambda: opd_arm(case, fast=False),
              "opd_compiled": lambda: opd_arm(case, fast=True, compiled=True),
              "plain": lambda: plain_arm(case), "trl_gkd": lambda: TRLArm(trl, case, False, threads),
              "trl_gkd_defaults": lambda: TRLArm(trl, case, True, threads)}
    return {name: makers[name]() for name in names}


def run_case(case: Case, arms: dict, threads: int) -> dict:
    """Every step runs each arm once, in an order rotated by one arm per step; returns per arm its step times
    and sampled tokens (timed steps only)."""
    names = list(arms)
    torch.set_num_threads(threads)
    record = {n: {"times_s": [], "tokens": [], "warmup_s": []} for n in names}
    for s in range(case.steps):
        for name in names[s % len(names):] + names[:s % len(names)]:
            seconds, tokens = arms[name](s)
            if s >= WARMUP:
                record[name]["times_s"].append(seconds)
                record[name]["tokens"].append(tokens)
            else:
                record[name]["warmup_s"].append(seconds)
    for arm in arms.values():
        if isinstance(arm, TRLArm):
            arm.close()
    return record


def summarise(case: Case, record: dict, reference: str = "plain") -> dict:
    """Per arm: median step time, sampled tokens per step, and ``reference`` / arm over paired steps (median, min,
    max) under ``<reference>_over_arm``."""
    plain = record.get(reference, {}).get("times_s")
    arms = {}
    for name, r in record.items():
        arm = dict(median_s=statistics.median(r["times_s"]), times_s=r["times_s"], warmup_s=r["warmup_s"],
                   sampled_tokens_per_step=statistics.mean(r["tokens"]))
        if plain:
            ratios = [p / t for p, t in zip(plain, r["times_s"])]
            arm[f"{reference}_over_arm"] = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
        arms[name] = arm
    return dict(size=case.size, batch=case.batch, samples=case.samples, max_new_tokens=case.max_new_tokens,
                teacher_parameters=count_parameters(case.teacher), student_parameters=count_parameters(case.student),
                arms=arms)


def report(res: dict) -> str:
    """The results as a text table."""
    lines = [f"one training step on {res['device_name']}, torch threads {res['threads']}; median of {res['steps']} "
             f"after {WARMUP} warm-up; plain/arm over paired steps (min-max); tokens: sampled per step",
             f"{'size':<7}{'batch':>6}{'G':>3}{'arm':>18}{'median s':>10}{'plain/arm':>11}{'(min-max)':>14}"
             f"{'tokens':>8}{'1st step s':>11}"]
    for c in res["cases"]:
        for name, a in c["arms"].items():
            r = a.get("plain_over_arm")
            ratio = f"{r['median']:>11.2f}{'(%.2f-%.2f)' % (r['min'], r['max']):>14}" if r else f"{'-':>11}{'':>14}"
            lines.append(f"{c['size']:<7}{c['batch']:>6}{c.get('samples', 1):>3}{name:>18}{a['median_s']:>10.4f}{ratio}"
                         f"{a['sampled_tokens_per_step']:>8.0f}{(a.get('warmup_s') or [float('nan')])[0]:>11.2f}")
    return "\n".join(lines)


def figure(res: dict, path: Path) -> None:
    """Bars of the median step time per arm (whiskers: min and max over the timed steps), one panel per size x
    batch, each bar annotated with plain / arm."""
    import matplotlib.pyplot as plt

    from opdlab.app.plots import grid

    fig, axes = grid(len(res["cases"]), n_cols=2, size=(5.2, 3.4))
    for ax, c in zip(axes, res["cases"]):
        names = list(c["arms"])
        med = [c["arms"][n]["median_s"] for n in names]
        lo = [m - min(c["arms"][n]["times_s"]) for m, n in zip(med, names)]
        hi = [max(c["arms"][n]["times_s"]) - m for m, n in zip(med, names)]
        bars = ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3,
                      color=[f"C{ARMS.index(n)}" for n in names])
        for bar, n in zip(bars, names):
            r = c["arms"][n].get("plain_over_arm")
            if r:
                ax.annotate(f"×{r['median']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("seconds per step (median)")
        ax.set_title(f"{c['size']}, batch {c['batch']} ({c.get('samples', 1)} per prompt), "
                     f"{c['max_new_tokens']} new tokens", fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(f"one OPD training step, {res['device_name']}, torch threads {res['threads']}\n"
                 f"labels: plain / arm (median over paired steps); whiskers: min and max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["nb04", "5M/1M"], choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64], help="sequences per step")
    parser.add_argument("--samples", nargs="+", type=int, default=[1],
                        help="completions per prompt (each batch holds batch / samples distinct prompts)")
    parser.add_argument("--steps", type=int, default=10, help=f"timed steps (after {WARMUP} warm-up steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 2, 1 timed step (a test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder of the JSON and the figure (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or min(args.batches) < 1 or min(args.samples) < 1:
        parser.error("--steps, --threads, every batch and every --samples must be at least 1")
    if any(b % g for b in args.batches for g in args.samples):
        parser.error(f"every batch {args.batches} must be a multiple of every --samples {args.samples}")
    if args.quick:
        args.sizes, args.batches, args.steps = ["tiny"], [2], 1
    return args


def main(argv=None) -> dict:
    """Run the benchmark (arguments as on the command line), print the table, write JSON and figure; return
    the results."""
    args = parse(argv)
    # transformers' renaming notices, raised inside TRL on every step
    warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    trl, trl_line = trl_status()
    print(trl_line)
    names = [n for n in ARMS if n in args.arms and (trl is not None or n not in TRL_ARMS)]
    cases = []
    for size in args.sizes:
        for batch in args.batches:
            for samples in args.samples:
                case = make_case(size, batch, WARMUP + args.steps, device, samples)
                cases.append(summarise(case, run_case(case, make_arms(case, names, trl, args.threads),
                                                      args.threads)))
    res = dict(device=device.type, device_name=device_name(device), threads=torch.get_num_threads(),
               steps=args.steps, warmup=WARMUP, quick=args.quick, torch=torch.__version__,
               transformers=transformers.__version__, trl_version=getattr(trl, "__version__", None), trl=trl_line,
               cases=cases)
    print(report(res))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_peers-{device.type}.json"
    path.write_text(json.dumps(res, indent=2))
    figure(res, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return res


def device_name(device: torch.device) -> str:
    """``cpu (<processor>)`` or the CUDA device's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    main()
