"""The OPD training loop, read top to bottom: load the models (``models.load_models``), then for each step
``step.opd_step`` (sample, score, loss, update), evaluate every ``eval_every`` steps (``evaluate.evaluate``; the
start through ``references.evaluate_start``), checkpoint every ``runtime.checkpoint_every``.

What a run computes is its ``RunSpec`` (``opdlab.config.spec``); how it runs (device, cache, threads, sampler,
scorer, compiled decoding, checkpoints, progress) is its ``Runtime`` (``opdlab.config.runtime``), never part of its
name. A run's lifecycle is written once for a run alone and for a run of a cohort (``cohort_loop``): ``begin``
(its trainer, checkpoint and tracker), ``finish_step`` after each step, ``evaluate_and_log``, ``stopped_message``.

A run started again in the same directory resumes from its checkpoint and ends with the same metrics as an
uninterrupted one: the training prompts are a fixed seeded list, sampling uses one explicit generator (one per
rank) whose state is checkpointed, and evaluation draws from a generator seeded by the step. The run directory
(``opdlab.rundir.writer.RunLog``) is locked while a run writes it, and a run resumes only under the fingerprint it
started with (spec, teacher and initial student weights); the runtime may change on resume (a compiled decoder or
another thread count then gives an equal run to float rounding).

Several processes (``torchrun --nproc_per_node N -m opdlab train ...``) train one student data-parallel:
each rank samples its share of the step's prompts, the surrogate is reduced over the global batch and the
gradients summed, and rank 0 alone evaluates and writes the run directory (``opdlab.training.distributed``).
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec
from opdlab.errors import UserError
from opdlab.rundir import layout
from opdlab.rundir.reader import read_metrics
from opdlab.rundir.tracking import Tracker
from opdlab.rundir.writer import RunLog, fingerprint
from opdlab.training import distributed
from opdlab.training.evaluate import evaluate, final_sampled_n
from opdlab.training.models import load_models
from opdlab.training.references import evaluate_start
from opdlab.training.step import Models, Trainer, opd_step

__all__ = ["train", "begin", "finish_step", "evaluate_and_log", "stopped_message", "Interrupted"]


def _rng_state(tr: Trainer) -> dict:
    """The sampling generator's state and device; under a launcher also every rank's state (``ranks``) and the
    world size. A collective: every rank calls it."""
    states = distributed.gather(tr.generator.get_state(), tr.world)
    rng = {"generator": states[0], "device": tr.device.type}
    return rng if tr.world.size == 1 else {**rng, "world_size": tr.world.size, "ranks": states}


def _start(tr: Trainer, log: RunLog, models: Models) -> tuple | None:
    """Rank 0: check and record the run (``RunLog.start``; run.json holds the models' origin and the runtime);
    return its checkpoint as ``(state, weights)``, or None when it has none yet."""
    run = {"models": models.meta, "train_prompts": len(tr.prompts), "world_size": tr.world.size,
           "runtime": tr.runtime.to_dict()}
    log.start(fingerprint(tr.spec, models.teacher, models.student), str(tr.device), run)
    if log.checkpoint is None:
        return None
    state, model = log.checkpoint
    return state, model.state_dict()


def _resume(tr: Trainer, run_dir: Path, loaded: tuple | None, log: RunLog | None) -> int:
    """Load the checkpoint ``(state, weights)`` (None: there is none) into the trainer, this rank's sampling
    generator included; rank 0 (the one with ``log``) drops metric lines logged after it. Return the number of
    completed steps."""
    if loaded is None:
        if log is not None:
            log.truncate_after(-1)  # lines logged before an interruption that came before the first checkpoint
        return 0
    state, weights = loaded
    rng, here, ranks = state["rng"], tr.device.type, tr.world.size
    saved = rng.get("device", here)
    if saved != here:
        raise UserError(f"{run_dir} was started on {saved} and is being resumed on {here}; its sampling "
                        f"generator belongs to {saved}: resume it there (device={saved!r}) or use a new run "
                        "directory")
    if rng.get("world_size", 1) != ranks:
        raise UserError(f"{run_dir} was run by {rng.get('world_size', 1)} process(es) and is being resumed by "
                        f"{ranks}; its checkpoint holds one sampling generator per process: resume it with "
                        f"{rng.get('world_size', 1)} (torchrun --nproc_per_node {rng.get('world_size', 1)}, or "
                        "no launcher for 1) or use a new run directory")
    tr.student.load_state_dict(weights)
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.generator.set_state(rng["ranks"][tr.world.rank] if ranks > 1 else rng["generator"])
    if log is not None:
        log.truncate_after(state["step"])
    return state["step"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``; its message says how to resume."""


def _record(log: RunLog | None, tracker: Tracker | None, record: dict) -> None:
    """Rank 0: one metrics record to metrics.jsonl (the source of truth) and to the runtime's trackers."""
    if log is not None:
        log.log(record)
        tracker.log(record)


def evaluate_and_log(tr: Trainer, log: RunLog | None, tracker, step: int, final: bool,
                     shared: str | Path | None = None) -> None:
    """Rank 0: evaluate at ``step`` and write the metrics line and the per-item records; the final evaluation
    covers ``final_eval_n`` items where the spec asks for more than ``eval_n`` (sampled on ``final_sampled_n``).
    At step 0 the evaluation is kept in and read from ``shared`` (``evaluate_start``)."""
    if log is None:
        return
    n = tr.spec.eval.final_eval_n if final and tr.spec.eval.final_eval_n else None
    sampled_n = final_sampled_n(tr.spec) if n is not None else None
    metrics, items = evaluate_start(tr, n, sampled_n, shared) if step == 0 else evaluate(tr, step, n, sampled_n)
    _record(log, tracker, {"step": step, "kind": "eval", **metrics})
    log.write_items(step, items)


def begin(spec: RunSpec, run_dir: Path, runtime: Runtime, task, models: Models, log: RunLog | None):
    """A run's trainer from ``models`` (the student copied), its checkpoint loaded where it has one (``_start``,
    ``_resume``; a collective under a launcher), and its tracker (rank 0), a stale ``layout.ERROR`` removed.
    Returns ``(trainer, completed steps, tracker or None)``."""
    if log is not None:
        (run_dir / layout.ERROR).unlink(missing_ok=True)
    tr = Trainer(spec, task, models.teacher, copy.deepcopy(models.student), models.tokenizer, runtime)
    w = tr.world
    loaded = distributed.from_main(lambda: _start(tr, log, models), w)
    start = _resume(tr, run_dir, loaded, log)
    tracker = Tracker(run_dir, runtime.report_to, run_dir.name, spec.to_dict(), start) if log is not None else None
    return tr, start, tracker


def finish_step(tr: Trainer, log: RunLog | None, tracker, metrics: dict, done: int, saved: int,
                run_dir: Path) -> int:
    """After step ``done`` of a run: its metrics line; a ``UserError`` where the gradient norm is not finite
    (before the step is checkpointed); the evaluation and the checkpoint where they fall due. Returns the step
    of the run's last checkpoint."""
    spec, steps = tr.spec, tr.spec.optim.steps
    _record(log, tracker, {"step": done, "kind": "train", **metrics})
    if not math.isfinite(metrics["grad_norm"]):  # the global norm: every rank stops here
        raise UserError(f"step {done} of {run_dir}: the gradient norm is {metrics['grad_norm']}, so "
                        f"the run stops before checkpointing it (last checkpoint: step {saved}); "
                        f"lower lr (now {spec.optim.lr}) or set log_u_clip, in a new run directory")
    if done % spec.eval.eval_every == 0 or done == steps:
        evaluate_and_log(tr, log, tracker, done, done == steps)  # the other ranks go on sampling
    if done % tr.runtime.checkpoint_every == 0 or done == steps:
        rng = _rng_state(tr)
        if log is not None:
            log.save_checkpoint(tr.student, tr.tokenizer, tr.optimizer, done, rng)
        saved = done
    return saved


def stopped_message(run_dir: Path, saved: int, steps: int) -> str:
    """What a stopped run says: its last checkpoint and the command that resumes it."""
    return (f"{run_dir} stopped; its last checkpoint is step {saved} of {steps}: run `opdlab train {run_dir}` "
            "again to resume from there")


def train(spec: RunSpec, run_dir: str | Path, runtime: Runtime | None = None, task=None,
          models: Models | None = None, stop_after: int | None = None, heartbeat=None,
          shared: str | Path | None = None) -> pd.DataFrame:
    """Run (or resume) OPD training as ``spec`` says, the way ``runtime`` says, writing ``run_dir``; return its
    metrics DataFrame.

    The run directory is locked for the duration (``opdlab.rundir.writer.RunLog``); a run resumes only under the
    fingerprint it started with (spec, teacher and initial student weights). A non-finite gradient norm stops the
    run with a ``UserError`` before the step is checkpointed; Ctrl-C raises ``Interrupted`` saying how to resume.

    Args:
        task: a task object; default ``opdlab.tasks.get_task(spec.task.task)``.
        models: ``Models`` already loaded (e.g. by ``load_models``); the student is copied, never modified.
        stop_after: stop once this many steps are done (as if interrupted); for tests and benchmarks.
        heartbeat: None, or an ``opdlab.heartbeat.Heartbeat`` that prints a plain line (run, step) at most
            every ``heartbeat.every`` seconds (the sweep's in-process runs).
        shared: None, or a folder where the evaluation of the initial student is kept for the other runs that
            start from it (``evaluate_start``; the sweep's ``runs_dir/references``).
    """
    from opdlab.tasks import get_task

    if not isinstance(spec, RunSpec):
        raise UserError(f"train's spec must be a RunSpec, got {type(spec).__name__}: build one from flat settings "
                        "with opdlab.config.presets.resolve({...}) (which also returns the Runtime)")
    if not (runtime is None or isinstance(runtime, Runtime)):
        raise UserError(f"train's runtime must be None or a Runtime, got {runtime!r}: e.g. Runtime(device='cpu')")
    runtime = runtime or Runtime()
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)
    w = distributed.world()
    distributed.check_share(spec.optim.prompts_per_step, w)
    steps = spec.optim.steps
    with RunLog(run_dir, spec) if w.is_main else contextlib.nullcontext() as log:  # rank 0 writes the run
        run_dir = Path(run_dir)
        task = task if task is not None else get_task(spec.task.task)
        models = models if models is not None else load_models(spec, task, runtime)
        distributed.join(next(models.student.parameters()).device)
        tr, start, tracker = begin(spec, run_dir, runtime, task, models, log)
        saved = start
        try:
            if start == 0:
                evaluate_and_log(tr, log, tracker, 0, steps == 0, shared)
            end = steps if stop_after is None else min(steps, stop_after)
            o = spec.objective
            for step in tqdm(range(start, end), desc=f"OPD {o.divergence}/{o.method}", initial=start, total=steps,
                             disable=not (runtime.progress and w.is_main), leave=False):
                saved = finish_step(tr, log, tracker, opd_step(tr, step), step + 1, saved, run_dir)
                if heartbeat is not None and w.is_main:
                    heartbeat.beat(lambda: f"{run_dir.name}: step {step + 1}/{steps}")
        except KeyboardInterrupt:
            raise Interrupted(stopped_message(run_dir, saved, steps)) from None
        finally:
            if tracker is not None:
                tracker.close()
    return distributed.from_main(lambda: read_metrics(run_dir), w)
