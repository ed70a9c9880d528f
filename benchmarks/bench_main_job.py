"""Benchmark: a FLOP account of the main job (``make figures``): where its minutes go, and its lower bound at peak.

The job's training is notebook 04 (its preset and arms: tasks x arms x seeds, each run its own ``steps`` OPD steps
and an evaluation every ``eval_every`` steps and at the end) and notebook 09 (its preset, trained variants x seeds,
the runs notebook 04 already trained read back, and the step noise of every variant), on teachers and warm-up
students trained once per recipe (``opdlab.lm.cache``), and notebook 06 (its preset, methods x seeds, from
SmolLM2-135M-Instruct to its layer-dropped student, whose supervised warm-up counts as that notebook's ``sft``;
``--tiny`` leaves it out, as SmolLM2 has no tiny version). Every count is read
from the presets and the notebooks' ``parameters`` cells (``opdlab.app.notebooks.notebook_parameters``), never typed
here. The other notebooks, SmolLM2's conversion, the reference accuracies (the sweep's, and each newly trained
model's held-out score) and what runs outside these phases (processes starting, checkpoints, plots) are not in
the account.

What it measures, in one process at ``--threads`` threads (a sweep worker runs at one), on the real models:
per notebook, task and arm kind (OPD+, OPD+ from a top-k teacher, stop-gradient OPD, full vocabulary, supervised
KD), ``--warmup`` untimed
then ``--steps`` timed ``opd_step``s, and per phase the median seconds and model FLOPs:

- ``decode``: sampling (the prompts' prefill, every decoding step, the output head);
- ``teacher``, ``student_forward``: scoring by the runtime's scorer (packed: each distinct prompt once plus every
  real completion token; padded: the whole padded batch);
- ``student_backward``: the student's backward;
- ``optimizer``: gradient clip and AdamW, counted as ``ADAMW_FLOPS_PER_PARAMETER`` elementwise FLOPs per
  parameter (memory-bound: its bound at the matmul peak is far from reachable);
- ``rest``: advantages, masking and metrics (no model FLOPs are counted for it);
- ``evaluation``: ``training.evaluate.evaluate`` (greedy and sampled decoding, teacher and student scoring) on the
  warm-up student, per task, a start shared by the runs of one seed and divergence counted once; ``final_evaluation``
  where ``final_eval_n`` differs;
- ``step_noise``: ``noise.step_noise`` of every notebook-09 variant, and of every notebook-04 arm, in one call each
  (each batch decoded and scored once, differentiated once per variant or arm);
- ``sft``: supervised steps of each teacher and warm-up recipe (``lm.sft``: forward and backward over the padded
  batch it runs), counted by the steps the cache recorded (``sft_steps_taken``); ``sft_check``: a
  warm-up's accuracy check every ``SFT_CHECK_EVERY`` steps (``lm.cache``).

Model FLOPs are those of the matrix products and attention the models actually ran, counted by PyTorch's
``torch.utils.flop_counter.FlopCounterMode`` (2 x rows x columns per product and token; attention as the kernel
computes it, every query against every key of its row, its backward 2.5 forwards as the scores are recomputed;
elementwise work and embedding lookups count nothing), with PyTorch's attention formulas given for the CPU kernel
it does not count by itself (``CPU_ATTENTION``). They are counted on an untimed replay right after each timed call:
the same inputs, the sampling generator back at the state the timed call started from, so the replay runs the
same tokens (checked); a training step is replayed through ``step.sample``, ``score``, ``loss`` and ``update`` on
a second trainer holding the student's weights from before the timed ``opd_step``. Nothing of ``opdlab`` is
wrapped or replaced. This is not the ``tokens x 2 x parameters`` convention of ``bench_train``: the count adds the
prompts' prefill and the attention, and runs the output head only where logits are computed (neither counts the
embedding lookups; on notebook 04's arithmetic models at initialisation, about 1.8x that convention's decoding
FLOPs and 1.1-1.2x its scoring FLOPs).
The optimizer is counted as ``ADAMW_FLOPS_PER_PARAMETER`` per parameter, which the counter would count as zero;
the rest counts none. Seconds come from the timed calls only. Seconds and FLOPs are multiplied by the job's
counts; the bound of a phase is its FLOPs at the fp32 matmul peak measured in the same process
(``bench_train.matmul_peak``, the better of a measurement before and one after). Seconds are one process's at
``--threads`` threads: the sweep spreads its runs over worker processes, so its wall time is about the total over
the workers, and so is its bound. The per-step costs are those of the warm-up student's first steps; a student's
completions lengthen or shorten as it trains.

    python benchmarks/bench_main_job.py [--threads 1] [--steps 3] [--warmup 1] [--device auto] [--tiny]

Writes benchmarks/results/main_job.csv (one row per notebook, phase, task and arm) and main_job.png; ``--tiny``
measures tiny recipes in a temporary cache (seconds on a CPU; the counts stay the job's) and writes to a
temporary directory unless ``--out`` says otherwise. The last line reads
``main job: measured X min, bound at peak Y min``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import matmul_peak  # noqa: E402

from opdlab.app.notebooks import notebook_parameters, resolve_notebook  # noqa: E402
from opdlab.config import presets
from opdlab.config.recipe import SFT_CHECK_EVERY  # noqa: E402
from opdlab.config.runtime import Runtime  # noqa: E402
from opdlab.config.spec import ModelsSpec, RunSpec, run_name  # noqa: E402
from opdlab.core import objective  # noqa: E402
from opdlab.experiments import noise  # noqa: E402
from opdlab.experiments.sweep import runs  # noqa: E402
from opdlab.lm.cache import target_reached  # noqa: E402
from opdlab.lm.device import pick_device  # noqa: E402
from opdlab.lm.modeling import build_model, count_parameters  # noqa: E402
from opdlab.lm.sft import sft  # noqa: E402
from opdlab.tasks import get_task  # noqa: E402
from opdlab.training.evaluate import evaluate, final_sampled_n  # noqa: E402
from opdlab.training.models import load_models  # noqa: E402
from opdlab.training.step import Trainer, loss, opd_step, sample, score, update  # noqa: E402

COLUMNS = ("notebook", "phase", "task", "arm", "count", "seconds_each", "seconds_total", "gflop_total",
           "gflops_per_s", "peak_fraction", "bound_seconds", "threads", "peak_gflops")
STEP_PHASES = {"decode": ("sample",), "teacher": ("teacher",), "student_forward": ("student_forward",),
               "student_backward": ("student_backward",), "optimizer": ("optimizer",),
               "rest": ("advantage", "bookkeeping")}
"""Each phase of a training step and the ``opd_step`` clock laps it is made of."""
ADAMW_FLOPS_PER_PARAMETER = 17
"""Clip (squared norm 2, scale 1) and AdamW (decay 1, first moment 3, second moment 4, denominator 3, update 3)."""
TINY_FIELDS = ("prompts_per_step", "samples_per_prompt", "eval_n", "eval_samples", "max_new_tokens",
               *(f.name for f in dataclasses.fields(ModelsSpec)))
"""What ``--tiny`` takes from the ``smoke`` preset: its models, batch and evaluation size (steps, evaluation
schedule, arms and seeds stay the job's)."""


@dataclass(frozen=True)
class Study:
    """One notebook's runs on one task: the shared ``spec``, every run it trains (a run another notebook already
    trained is read back there, so it counts once, where it is first trained), and its step noise (one call of
    ``noise_calls`` trainers on ``noise_batches`` batches)."""

    notebook: str
    """The notebook's file name without its suffix, e.g. ``04_real_students``."""
    task: str
    spec: RunSpec
    runs: tuple
    noise_calls: int = 0
    noise_batches: int = 0
    starts: int = 0
    """Evaluations of initial students that these runs compute: runs of one seed and divergence share theirs
    (``references.evaluate_start``), with each other and with an earlier study's runs."""
    pretrained: dict | None = None
    """Notebook 06's parameters, whose teacher (SmolLM2, converted) and layer-dropped, warmed-up student come from
    ``opdlab.lm.pretrained`` (``with_pretrained`` resolves them); None for the task-trained models of 04 and 09."""


def studies(tiny: bool = False) -> list[Study]:
    """The job's studies, from the notebooks' parameters and presets (``--tiny``: the smoke preset's sizes); the
    runs are the sweeps' own (``sweep.runs``), each counted once by its run name."""
    smoke = presets.get("smoke").spec.to_dict()
    shrink = {k: smoke[k] for k in TINY_FIELDS} if tiny else {}
    nb4, nb9 = resolve_notebook("04"), resolve_notebook("09")
    p4 = notebook_parameters(nb4)
    preset4 = presets.get(p4["preset"])
    seen, started, out = set(), set(), []

    def new(specs) -> tuple:
        fresh = tuple(s for s in specs if run_name(s) not in seen)
        seen.update(run_name(s) for s in fresh)
        return fresh

    def starts(specs, runs_dir) -> int:  # what references.evaluate_start keys on, less what a study's runs all share
        keys = {(runs_dir, s.task, s.models, s.eval, s.optim.seed, s.objective.divergence) for s in specs} - started
        started.update(keys)
        return len(keys)

    base4 = preset4.spec.replace(**p4["overrides"])
    task_overrides = {t: {**preset4.per_task.get(t, {}), **p4["overrides"], **shrink} for t in p4["tasks"]}
    for t in p4["tasks"]:
        specs = runs(base4, [t], [], [], seeds(p4, preset4), task_overrides, p4["arms"])
        noisy = sum(objective.get(arm["method"]).samples_from == "student" for arm in p4["arms"])  # step noise
        fresh = new(specs)
        out.append(Study(nb4.stem, t, base4.replace(task=t, **task_overrides[t]), fresh, noisy, p4["n_batches"],
                         starts(fresh, p4["runs_dir"])))
    p9 = notebook_parameters(nb9)
    preset9 = presets.get(p9["preset"])
    base9 = preset9.spec.replace(**{"method": "opd_plus", **p9["overrides"], **shrink})
    noise_variants = len(p9["gammas"]) * len(p9["baselines"]) * len(p9["clips"])
    trained = [dict(gamma=g, baseline="expected", log_u_clip=c) for c in p9["clips"] for g in p9["trained_gammas"]]
    specs = runs(base9, [base9.task.task], [base9.objective.divergence], ["opd_plus"], seeds(p9, preset9), None, (),
                 trained)
    fresh = new(specs)
    out.append(Study(nb9.stem, base9.task.task, base9, fresh, noise_variants, p9["n_batches"],
                     starts(fresh, p9["runs_dir"])))
    if not tiny:  # notebook 06's models are SmolLM2's own: there is no tiny version of them
        nb6 = resolve_notebook("06")
        p6 = notebook_parameters(nb6)
        preset6 = presets.get(p6["preset"])
        base6 = preset6.spec.replace(**p6["overrides"])
        specs = runs(base6, [base6.task.task], [base6.objective.divergence], p6["methods"], seeds(p6, preset6))
        out.append(Study(nb6.stem, base6.task.task, base6, tuple(specs), starts=starts(specs, p6["runs_dir"]),
                         pretrained=p6))
    return out


def with_pretrained(study: Study, runtime: Runtime) -> Study:
    """Notebook 06's study with its teacher and student paths set as the notebook sets them (converted and warmed
    up into the cache on a miss, as the notebook would)."""
    from opdlab.lm.pretrained import layer_dropped_student, smollm2_teacher

    p = study.pretrained
    teacher = p["teacher_path"] or str(smollm2_teacher(runtime.cache, progress=False))
    student = p["student_path"] or str(layer_dropped_student(
        teacher, _layers(p, teacher), runtime.cache, warmup_task=get_task(study.task), warmup_steps=p["warmup_steps"],
        warmup_lr=p["warmup_lr"], warmup_source=p["warmup_source"], progress=False))
    paths = dict(teacher_path=teacher, student_path=student)
    return dataclasses.replace(study, spec=study.spec.replace(**paths),
                               runs=tuple(s.replace(**paths) for s in study.runs))


def _layers(parameters: dict, teacher: str) -> tuple:
    from opdlab.lm.modeling import load_model
    from opdlab.lm.pretrained import spread_layers

    return spread_layers(load_model(teacher)[0].config.num_hidden_layers, parameters["student_layers"])


def seeds(parameters: dict, preset) -> list:
    """A notebook's seeds: its ``seeds`` parameter, or where that is None its preset's."""
    return list(preset.seeds) if parameters["seeds"] is None else parameters["seeds"]


def kinds(specs) -> dict[tuple, list]:
    """``(method, teacher_topk)`` -> the runs of that kind: a step's cost depends on the method and on whether the
    teacher is sparse, little on the divergence or the baseline."""
    out: dict[tuple, list] = {}
    for spec in specs:
        out.setdefault((spec.objective.method, spec.objective.teacher_topk), []).append(spec)
    return out


def kind_name(method: str, topk) -> str:
    return method if topk is None else f"{method}_top{topk}"


def evaluations(spec: RunSpec) -> tuple[int, int]:
    """``(regular, final)`` evaluations of one run, as ``training.loop.train`` schedules them: step 0, every
    ``eval_every`` steps and the last step; the last is counted apart where ``final_eval_n`` changes its size."""
    steps, every = spec.optim.steps, spec.eval.eval_every
    total = 1 + sum(1 for done in range(1, steps + 1) if done % every == 0 or done == steps)
    separate = int(steps > 0 and spec.eval.final_eval_n not in (None, spec.eval.eval_n))
    return total - separate, separate


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}
"""PyTorch's own attention formulas for the CPU attention kernel, which ``FlopCounterMode`` does not count by
itself (it counts the CUDA kernels, and the math path through its ``bmm``s)."""


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` counting the CPU attention kernel too (``CPU_ATTENTION``), printing nothing."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


class FlopLaps:
    """A clock for ``step.score`` and ``step.update`` that, inside a ``flop_counter``, charges to each lap the
    FLOPs counted since the previous one (``times``: ``time_<phase>`` -> FLOPs, as ``opd_step`` names its laps)."""

    def __init__(self, counter: FlopCounterMode):
        self.counter, self.times, self.at = counter, {}, counter.get_total_flops()

    def lap(self, phase: str) -> None:
        now = self.counter.get_total_flops()
        self.times[f"time_{phase}"] = self.times.get(f"time_{phase}", 0) + now - self.at
        self.at = now


def _median(values) -> float:
    return statistics.median(values)


def replay_step(shadow: Trainer, examples: list, state: torch.Tensor, step: int, tokens: int) -> dict:
    """FLOPs per phase of an OPD step, counted on ``shadow`` (a trainer holding the timed student's weights from
    before its step) by running ``step.sample`` from the generator ``state`` the timed step started from (so the
    same tokens), ``score``, ``loss`` and ``update`` under ``flop_counter``. ``tokens``: the timed step's sampled
    tokens, which the replay must match."""
    spec = shadow.spec
    shadow.generator.set_state(state)
    with flop_counter() as counter:
        rollout = sample(shadow, examples)
        decode = counter.get_total_flops()
        laps = FlopLaps(counter)
        scores = score(shadow.teacher, shadow.student, rollout, shadow.runtime.scorer, laps)
        value, _ = loss(spec.objective, shadow.div, scores, rollout.mask_BT, spec.optim.samples_per_prompt)
        update(shadow, value, step, laps)
    if rollout.n_sampled != tokens:
        raise RuntimeError(f"the replayed step sampled {rollout.n_sampled} tokens, the timed step {tokens}")
    return dict(decode=decode, teacher=laps.times["time_teacher"],
                student_forward=laps.times["time_student_forward"],
                student_backward=laps.times["time_student_backward"])


def measure_steps(spec: RunSpec, task, models, runtime: Runtime, warmup: int, steps: int) -> dict:
    """phase -> ``(seconds, FLOPs)`` of one training step: medians over ``steps`` timed ``opd_step``s after
    ``warmup``, each step's FLOPs counted on its replay (``replay_step``)."""
    tr = Trainer(spec, task, models.teacher, copy.deepcopy(models.student), models.tokenizer, runtime)
    shadow = Trainer(spec, task, models.teacher, copy.deepcopy(models.student), models.tokenizer, runtime)
    n_student = count_parameters(tr.student)
    seconds, flops = {p: [] for p in STEP_PHASES}, {p: [] for p in STEP_PHASES}
    for step in range(warmup + steps):
        shadow.student.load_state_dict(tr.student.state_dict())
        state = tr.generator.get_state()
        metrics = opd_step(tr, step)
        if step < warmup:
            continue
        step_flops = dict(replay_step(shadow, tr.batch(step), state, step, metrics["tokens"]),
                          optimizer=ADAMW_FLOPS_PER_PARAMETER * n_student, rest=0)
        for phase, laps in STEP_PHASES.items():
            seconds[phase].append(sum(metrics[f"time_{lap}"] for lap in laps))
            flops[phase].append(step_flops[phase])
    return {p: (_median(seconds[p]), _median(flops[p])) for p in STEP_PHASES}


def timed(fn, device: torch.device, generator: torch.Generator | None = None,
          repeats: int = 1) -> tuple[float, float]:
    """``(seconds, FLOPs)`` of ``fn()``, medians of ``repeats``: each call timed, then replayed untimed under
    ``flop_counter`` with ``generator`` (the one ``fn`` draws from, if any) back at the state the timed call
    started from, so that the replay runs the same tokens."""
    seconds, flops = [], []
    for _ in range(repeats):
        state = None if generator is None else generator.get_state()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - t)
        end = None if generator is None else generator.get_state()
        if generator is not None:
            generator.set_state(state)
        with flop_counter() as counter:
            fn()
        if generator is not None and not torch.equal(generator.get_state(), end):
            raise RuntimeError("the replay drew other random numbers than the timed call")
        flops.append(counter.get_total_flops())
    return _median(seconds), _median(flops)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimes:
    """An ``sft`` heartbeat that records, at the end of each step, the clock (after the step's kernels finished)
    and, where ``counter`` is given, the FLOPs counted so far."""

    def __init__(self, device: torch.device, counter: FlopCounterMode | None = None):
        self.device, self.counter, self.ends, self.flops = device, counter, [time.perf_counter()], [0]

    def beat(self, message) -> bool:
        _sync(self.device)
        self.ends.append(time.perf_counter())
        if self.counter is not None:
            self.flops.append(self.counter.get_total_flops())
        return False


def measure_sft(recipe, models, task, device, warmup: int, steps: int) -> tuple[float, float]:
    """``(seconds, FLOPs)`` of one supervised step of ``recipe`` from scratch: medians after ``warmup`` steps,
    the FLOPs counted on a replay of the same steps from the same initial weights."""
    model = build_model(recipe, models.tokenizer).to(device)
    return measure_sft_of(model, models.tokenizer, task, device, warmup, steps, recipe.sft_batch, recipe.sft_lr,
                          recipe.seed)


def measure_sft_of(model, tokenizer, task, device, warmup: int, steps: int, batch: int, lr: float,
                   seed: int) -> tuple[float, float]:
    """``measure_sft`` of a given ``model`` (left as it was) at ``batch`` and ``lr``."""
    model, initial = copy.deepcopy(model), copy.deepcopy(model)
    clock = _StepTimes(device)
    sft(model, tokenizer, task, warmup + steps, batch, lr, seed, progress=False, heartbeat=clock)
    with flop_counter() as counter:
        replay = _StepTimes(device, counter)
        sft(initial, tokenizer, task, warmup + steps, batch, lr, seed, progress=False, heartbeat=replay)
    per_step = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup:]
    per_flops = [b - a for a, b in zip(replay.flops, replay.flops[1:])][warmup:]
    return _median(per_step), _median(per_flops)


def measure_study(study: Study, runtime: Runtime, args, trained: set) -> list[dict]:
    """Rows ``notebook, phase, task, arm, count, seconds_each, flops_each`` of one study; SFT rows for each
    cached recipe not yet in ``trained`` (a recipe trains once for the whole job)."""
    task = get_task(study.task)
    if study.pretrained is not None:
        study = with_pretrained(study, runtime)
    models = load_models(study.spec, task, runtime)
    device = next(models.student.parameters()).device
    rows = []

    def row(phase, arm, count, seconds, flops):
        rows.append(dict(notebook=study.notebook, phase=phase, task=study.task, arm=arm, count=count,
                         seconds_each=seconds, flops_each=flops))

    p = study.pretrained
    if p is not None and p["student_path"] is None and p["warmup_steps"] and p["warmup_source"] == "task":
        import inspect

        from opdlab.lm.modeling import load_model
        from opdlab.lm.pretrained import drop_layers, layer_dropped_student

        bare = drop_layers(load_model(study.spec.models.teacher_path)[0], _layers(p, study.spec.models.teacher_path))
        defaults = inspect.signature(layer_dropped_student).parameters  # the batch and seed the notebook leaves
        row("sft", "warm-up", p["warmup_steps"], *measure_sft_of(
            bare.to(device), models.tokenizer, task, device, args.warmup, args.steps,
            defaults["warmup_batch"].default, p["warmup_lr"], defaults["seed"].default))

    for role, arm in (("teacher", "teacher"), ("student", "warm-up")):
        meta, recipe = models.meta.get(role, {}), study.spec.models.recipe(role)
        if "recipe" not in meta or (study.task, recipe) in trained:
            continue  # a local checkpoint, or a recipe another study already trained
        trained.add((study.task, recipe))
        taken = meta["sft_steps_taken"]
        row("sft", arm, taken, *measure_sft(recipe, models, task, device, args.warmup, args.steps))
        if recipe.sft_target is not None and taken >= SFT_CHECK_EVERY:
            check = target_reached(task, models.tokenizer, recipe)
            model = models.student if role == "student" else models.teacher
            with torch.no_grad():
                row("sft_check", arm, taken // SFT_CHECK_EVERY, *timed(lambda: check(model.eval()), device))
    for (method, topk), specs in kinds(study.runs).items():
        count = sum(spec.optim.steps for spec in specs)
        for phase, (seconds, flops) in measure_steps(specs[0], task, models, runtime, args.warmup, args.steps).items():
            row(phase, kind_name(method, topk), count, seconds, flops)
    spec = study.spec
    tr = Trainer(spec, task, models.teacher, copy.deepcopy(models.student), models.tokenizer, runtime)
    regular = sum(evaluations(s)[0] for s in study.runs) - len(study.runs) + study.starts  # shared starts once
    final = sum(evaluations(s)[1] for s in study.runs)
    if regular:
        row("evaluation", "every arm", regular,
            *timed(lambda: evaluate(tr, 0), device, repeats=args.eval_repeats))
    if final:
        row("final_evaluation", "every arm", final,
            *timed(lambda: evaluate(tr, spec.optim.steps, spec.eval.final_eval_n, final_sampled_n(spec)), device,
                   repeats=args.eval_repeats))
    if study.noise_calls:  # one call for every arm or variant: each batch drawn and scored once, one backward each
        noisy = [Trainer(spec, task, models.teacher, tr.student, models.tokenizer, runtime)
                 for _ in range(study.noise_calls)]

        def noise_call():  # every trainer's generator where the first's is (timed resets only the first's)
            for t in noisy[1:]:
                t.generator.set_state(noisy[0].generator.get_state())
            return noise.step_noise(noisy, study.noise_batches)
        row("step_noise", spec.objective.method, 1, *timed(noise_call, device, noisy[0].generator))
    return rows


def account(rows: list[dict], peak_gflops: float, threads: int) -> pd.DataFrame:
    """The tidy table (``COLUMNS``): each row's per-occurrence cost times its count, and its bound at peak."""
    job = pd.DataFrame(rows)
    job["seconds_total"] = job["seconds_each"] * job["count"]
    job["gflop_total"] = job["flops_each"] * job["count"] / 1e9
    job["gflops_per_s"] = job["flops_each"] / job["seconds_each"] / 1e9
    job["peak_fraction"] = job["gflops_per_s"] / peak_gflops
    job["bound_seconds"] = job["gflop_total"] / peak_gflops
    job["threads"], job["peak_gflops"] = threads, peak_gflops
    return job[list(COLUMNS)]


def by_phase(job: pd.DataFrame) -> pd.DataFrame:
    """Measured and bound minutes per phase, largest first."""
    phases = job.groupby("phase")[["seconds_total", "bound_seconds"]].sum() / 60
    return phases.rename(columns={"seconds_total": "measured_min", "bound_seconds": "bound_min"}).sort_values(
        "measured_min", ascending=False)


def figure(job: pd.DataFrame, path: Path) -> None:
    """Measured minutes per phase beside the bound at peak."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = by_phase(job)[::-1]
    y = range(len(phases))
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(phases) + 1.8))
    ax.barh([i + 0.2 for i in y], phases["measured_min"], height=0.4, label="measured")
    ax.barh([i - 0.2 for i in y], phases["bound_min"], height=0.4, label="bound at the matmul peak")
    ax.set_yticks(list(y), phases.index)
    ax.set_xlabel(f"minutes of one process at {int(job['threads'].iloc[0])} thread(s)")
    ax.set_title(f"main job: measured {phases['measured_min'].sum():.1f} min, bound at peak "
                 f"{phases['bound_min'].sum():.1f} min\n(fp32 matmul peak {job['peak_gflops'].iloc[0]:.0f} GFLOP/s, "
                 "same process)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker runs at 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm kind and task (and SFT)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--eval-repeats", type=int, default=2, help="timed evaluations per task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", default=None, help="model cache (default: $OPDLAB_CACHE or ~/.cache/opdlab)")
    parser.add_argument("--tiny", action="store_true", help="tiny recipes in a temporary cache: seconds on a CPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default benchmarks/results; with --tiny a temporary one)")
    return parser.parse_args(argv)


def main(argv=None) -> pd.DataFrame:
    """Measure, multiply, write the CSV and the figure, print the summary; return the table."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(cache=tmp if args.tiny else args.cache, device=args.device, progress=False)
        out = args.out or (Path(tempfile.mkdtemp(prefix="main_job-")) if args.tiny
                           else Path(__file__).resolve().parent / "results")
        device = pick_device(args.device)
        peaks = [matmul_peak(device)]
        rows, trained = [], set()
        for study in studies(args.tiny):
            rows += measure_study(study, runtime, args, trained)
        peaks.append(matmul_peak(device))
    job = account(rows, max(peaks), torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    job.to_csv(out / "main_job.csv", index=False)
    figure(job, out / "main_job.png")
    phases = by_phase(job)
    print(f"fp32 matmul peak {max(peaks):.1f} GFLOP/s ({job['threads'].iloc[0]} thread(s), before and after: "
          f"{peaks[0]:.1f}, {peaks[1]:.1f}); minutes of one process:")
    print(phases.round(2).to_string())
    print(f"wrote {out / 'main_job.csv'} and main_job.png")
    measured, bound = phases["measured_min"].sum(), phases["bound_min"].sum()
    print(f"main job: measured {measured:.2f} min, bound at peak {bound:.2f} min")
    return job


if __name__ == "__main__":
    main()
