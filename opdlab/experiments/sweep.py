"""Many OPD runs at once: one student per (task, divergence, method, seed), the experiment of notebook 04.

``sweep`` works in three phases:

1. the teacher and the warm-up student of each task are loaded from the cache or trained
   (``training.models.load_models``), in this process with all its threads;
2. their held-out greedy accuracies on the evaluation examples become the reference lines;
3. every run is trained (``training.loop.train``) in its own directory ``runs_dir/<config.spec.run_name(spec)>``;
   a finished run is read back, an interrupted one resumes. The runs that start from one student (the arms of
   a seed and divergence) evaluate that start once, kept in ``runs_dir/references``
   (``training.references.evaluate_start``).

Workers. An OPD step (sampling token by token, batches of short sequences) keeps the cores busier as
single-threaded processes than as one process with several threads, so the runs go to ``workers`` spawned
processes, each with ``cpu_count // workers`` threads. Supervised training (batches of whole sequences) is the
other way round, so phase 1 stays in this process. ``workers="auto"`` is the number of CPUs on CPU and 1 on
CUDA (one process owns the GPU); there are never more workers than runs. With ``workers=1``
everything runs in this process with per-run progress bars. A run's numbers depend on its thread count
only through floating-point summation order, so a rerun with the same ``workers`` reproduces them exactly.

Cohorts. ``cohort=R`` steps up to R runs of one task, pair of models and batch size together in one process
(``training.cohort_loop.train_cohort``): each run still writes its own directory, resumes and is read back as a
run alone does, and ends as it would alone, to float rounding. ``cohort="auto"`` is ``AUTO_COHORT`` of the
device's type: 1 (no cohorts) on CPU, where ``benchmarks/bench_cohort.py`` found every size slower than the
worker processes, and on CUDA until that benchmark has run there. A run of a cohort that fails fails alone (its
``error.json`` says why); the sweep finishes the others and then names every failed run.

Progress. With ``progress`` on, the sweep prints plain lines (``opdlab notebooks`` streams them live): one per
finished run and, between those, one naming the step each running run has reached, at most
``heartbeat.EVERY`` seconds apart.

Under a launcher (``torchrun --nproc_per_node N``, ``opdlab.training.distributed``) every process runs the sweep,
and the runs go one after another, each data-parallel over the N processes (``workers`` must be 1 or ``"auto"``); rank
0 prints.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec, run_name
from opdlab.errors import UserError
from opdlab.files import write_atomic
from opdlab.heartbeat import Heartbeat
from opdlab.lm.device import pick_device
from opdlab.rundir import layout
from opdlab.rundir.reader import CONFIG_COLUMNS, last_step, read_items, read_metrics, results, stored_config
from opdlab.tasks import get_task
from opdlab.training import distributed
from opdlab.training.cohort import key as cohort_key
from opdlab.training.cohort_loop import RUN_ERRORS, train_cohort
from opdlab.training.evaluate import final_sampled_n
from opdlab.training.loop import train
from opdlab.training.models import load_models
from opdlab.training.references import evaluate_start
from opdlab.training.step import Trainer

__all__ = ["sweep", "runs", "arm_fields", "resolve_workers", "resolve_cohort", "item_results", "reference_items",
           "reference_key", "AUTO_COHORT"]


def resolve_workers(workers, device: str = "auto") -> int:
    """The number of worker processes: ``workers`` itself (a positive int), or for ``"auto"`` the CPU count
    on CPU and 1 on CUDA; under a launcher 1 (each run is shared by its processes)."""
    ranks = distributed.world().size
    if ranks > 1:
        if workers not in ("auto", 1):
            raise UserError(f"workers = {workers!r} under a launcher with {ranks} processes: each run is already "
                            "shared by them, one run at a time; use workers=1 or 'auto'")
        return 1
    if workers == "auto":
        return 1 if pick_device(device).type == "cuda" else max(1, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be a positive int or 'auto', got {workers!r}")
    return workers


def _init_worker(threads: int, parent: int | None = None) -> None:
    """A worker's thread count; on Linux it also asks to be ended when the process that spawned it ends (a killed
    notebook kernel would otherwise leave its workers training for nobody). The run it leaves resumes from its
    last checkpoint."""
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:  # no glibc (e.g. musl): the worker ends when its queue closes instead
            return
        if parent is not None and os.getppid() != parent:  # the parent ended before the request took effect
            os._exit(1)


def _run(group: list[tuple], runtime: Runtime, task=None, models=None, heartbeat=None,
         alone: bool = True) -> list[tuple]:
    """Train (or resume, or read back) a group of ``(spec, run_dir)``: one run alone (``loop.train``), several as
    one cohort (``cohort_loop.train_cohort``). Returns ``(run_dir, exception or None)`` per run; a run trained alone
    raises its failure where ``alone`` (a sweep without cohorts), else it is returned like a cohort member's."""
    if len(group) == 1:
        (spec, run_dir), = group
        try:
            train(spec, run_dir, runtime, task, models, heartbeat=heartbeat, shared=_shared(run_dir))
        except RUN_ERRORS as err:
            if alone:
                raise
            return [(run_dir, err)]
        return [(run_dir, None)]
    out = train_cohort([s for s, _ in group], [d for _, d in group], runtime, task, models,
                       shared=_shared(group[0][1]))
    return [(d, r if isinstance(r, BaseException) else None) for (_, d), r in zip(group, out)]


def _shared(run_dir) -> Path:
    """Where a sweep keeps its runs' evaluations of their initial students (``references.evaluate_start``),
    beside its reference evaluations: the arms of one seed start from one student and evaluate it once."""
    return layout.references(Path(run_dir).parent)


AUTO_COHORT = {"cpu": 1, "cuda": 1}
"""``cohort="auto"`` by device type (a type not named: 1): the size ``benchmarks/bench_cohort.py`` showed to pay,
1 on CPU, where every cohort size measured was slower than the sweep's worker processes
(``benchmarks/results/cohort.csv``), and 1 on CUDA until the benchmark has been run there."""


def resolve_cohort(cohort, device: str = "auto") -> int:
    """Runs per cohort (``opdlab.training.cohort_loop.train_cohort``): ``cohort`` itself (a positive int), or for
    ``"auto"`` ``AUTO_COHORT`` of the type of ``pick_device(device)`` (pass a size to use cohorts). A
    ``UserError`` for another value, or for a device ``pick_device`` refuses."""
    if cohort == "auto":
        return AUTO_COHORT.get(pick_device(device).type, 1)
    if isinstance(cohort, bool) or not isinstance(cohort, int) or cohort < 1:
        raise UserError(f"cohort must be a positive int or 'auto', got {cohort!r}")
    return cohort


def _groups(jobs: list[tuple], size: int) -> list[list[tuple]]:
    """``jobs`` in groups of at most ``size`` that can step as one cohort (one ``cohort.key`` per group), in the
    jobs' order within each kind (size 1: every job alone, in order)."""
    if size == 1:
        return [[job] for job in jobs]
    kinds: dict = {}
    for spec, run_dir in jobs:
        kinds.setdefault(cohort_key(spec), []).append((spec, run_dir))
    return [same[i:i + size] for same in kinds.values() for i in range(0, len(same), size)]


def reference_key(spec: RunSpec) -> str:
    """12 hex digits standing for what a sweep's reference records of ``spec``'s task depend on: the task spec,
    the models' spec, the item count of the final evaluation, the split, the samples per item and, where only
    some items are sampled, their count (``evaluate.final_sampled_n``)."""
    n, sampled_n = spec.eval.final_eval_n or spec.eval.eval_n, final_sampled_n(spec)
    named = [asdict(spec.task), asdict(spec.models), n, spec.eval.eval_split, spec.eval.eval_samples]
    return layout.key(named + ([] if sampled_n is None else [sampled_n]), 12)


def _references(spec: RunSpec, task, models, runs_dir: Path) -> list[dict]:
    """The teacher's and the warm-up student's held-out greedy accuracy on the items of a run's final evaluation
    (``final_eval_n`` items where the spec asks for more than ``eval_n``, as ``evaluate.evaluate`` scores them),
    and the path of their per-item records (``evaluate.evaluate``'s, sampled on ``evaluate.final_sampled_n`` of
    the items), written once to ``layout.reference_items(runs_dir, task, role, reference_key(spec))`` and read
    back after."""
    n, sampled_n, key = spec.eval.final_eval_n or spec.eval.eval_n, final_sampled_n(spec), reference_key(spec)
    rows = []
    for role, model in (("teacher", models.teacher), ("student", models.student)):
        path = layout.reference_items(runs_dir, spec.task.task, role, key)
        if path.exists():
            items = pd.read_csv(path)
        else:
            tr = Trainer(spec, task, models.teacher, model.eval(), models.tokenizer, Runtime(progress=False))
            # kept for the runs whose first evaluation this is (the warm-up's, where they run at this thread count)
            _, items = evaluate_start(tr, n, sampled_n, layout.references(runs_dir))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, items.to_csv(index=False))
        rows.append(dict(task=spec.task.task, role=role, value=float(items["correct"].mean()), items=len(items),
                         path=str(path)))
    return rows


def arm_fields(arm) -> dict:
    """An arm as flat RunSpec fields: a ``(divergence, method)`` pair, or a dict that names both and may set any
    other field for this arm alone (e.g. ``{"divergence": "jsd", "method": "opd", "steps": 20}``)."""
    if isinstance(arm, dict) and {"divergence", "method"} <= set(arm) and not {"task", "seed"} & set(arm):
        return dict(arm)
    if isinstance(arm, (list, tuple)) and len(arm) == 2:
        return dict(divergence=arm[0], method=arm[1])
    raise UserError(f"an arm is a (divergence, method) pair or a dict of flat RunSpec fields naming divergence and "
                    f"method (and not task or seed, which the sweep sets), got {arm!r}")


def item_results(run_dirs) -> pd.DataFrame:
    """Every per-item evaluation record of ``run_dirs`` (``reader.read_items``) with the columns that tell runs
    apart (``reader.CONFIG_COLUMNS``, from each run's config) and ``run``: the frame paired comparisons read. The
    records' own ``divergence`` (the run's divergence to the teacher per item) is ``exact_divergence`` here, since
    ``divergence`` names the run's divergence."""
    frames = []
    for d in run_dirs:
        items = read_items(d).rename(columns={"divergence": "exact_divergence"})
        if len(items):
            config = stored_config(d) or {}
            frames.append(items.assign(run=Path(d).name, **{k: config.get(k) for k in CONFIG_COLUMNS}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def reference_items(references: pd.DataFrame) -> pd.DataFrame:
    """The per-item records of a sweep's ``references`` (teacher and warm-up student), with ``task`` and ``role``."""
    return pd.concat([pd.read_csv(r.path).assign(task=r.task, role=r.role) for r in references.itertuples()],
                     ignore_index=True)


def runs(base: RunSpec, tasks, divergences, methods, seeds, task_overrides: dict | None = None, extra_arms=(),
         variants=None) -> list[RunSpec]:
    """Every run of a ``sweep`` with these arguments, in its order (see ``sweep``); a ``UserError`` for an empty
    list, a malformed arm or variant, or two runs with the same spec."""
    return _plan(base, tasks, divergences, methods, seeds, task_overrides, extra_arms, variants)[1]


def _plan(base: RunSpec, tasks, divergences, methods, seeds, task_overrides, extra_arms,
          variants) -> tuple[list[RunSpec], list[RunSpec]]:
    """``(configs, specs)``: each task's spec (``base`` with the task and its overrides), built once, and every
    run of the sweep (``runs``)."""
    for name, values in (("tasks", tasks), ("divergences", divergences), ("methods", methods), ("seeds", seeds)):
        empty_ok = name in ("divergences", "methods") and extra_arms  # the arms may all be extra_arms
        if not isinstance(values, (list, tuple)) or not (values or empty_ok):
            raise UserError(f"{name} must be a non-empty list, got {values!r}: a sweep of nothing would still "
                            "train its teachers")
    configs = [base.replace(task=t, **(task_overrides or {}).get(t, {})) for t in tasks]
    arms = [dict(divergence=d, method=m) for d in divergences for m in methods]
    arms += [a for a in map(arm_fields, extra_arms) if a not in arms]
    grid = {"task", "divergence", "method", "seed"}  # set by the sweep's own arguments
    if variants is None:
        variants = [{}]
    elif (not isinstance(variants, (list, tuple)) or not variants
          or not all(isinstance(v, dict) and not grid & set(v) for v in variants)):
        raise UserError(f"variants must be a non-empty list of dicts of flat RunSpec fields other than "
                        f"{sorted(grid)}, got {variants!r}")
    specs = [c.replace(**{**arm, **v}, seed=s) for c in configs for arm in arms for v in variants for s in seeds]
    names = [run_name(spec) for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"two runs of this sweep would share the directory {twice[0]}: their specs are the "
                        "same; drop the duplicate seed, arm or variant")
    return configs, specs


def sweep(base: RunSpec, tasks, divergences, methods, seeds, runs_dir: str | Path, runtime: Runtime | None = None,
          task_overrides: dict | None = None, workers: int | str = 1, extra_arms=(), variants=None,
          cohort: int | str = "auto"):
    """Train one student per (task, divergence, method, seed) from ``base``; return ``(evals, references)``.

    ``task_overrides`` maps a task name to flat RunSpec fields that differ for it (e.g. fewer SFT steps for a
    task with longer sequences). ``workers``: processes to use, see the module doc. ``extra_arms``: more arms run
    for every task and seed besides the grid: ``(divergence, method)`` pairs, e.g. the reference methods
    ``("reverse_kl", "full_vocabulary")``, or dicts of flat RunSpec fields that name both and set others for that
    arm alone, e.g. ``{"divergence": "jsd", "method": "opd", "steps": 20}`` or ``{..., "teacher_topk": 1,
    "baseline": "tail"}``. ``variants``: None, or a list of dicts of flat RunSpec fields (e.g. ``{"gamma": 0.5,
    "log_u_clip": 2.0}``), each crossed with every arm and seed, so that one pool trains them all (notebook 09).
    ``cohort``: runs stepped together in one process (``resolve_cohort``); a run of a cohort that fails fails
    alone, and the sweep names every such run once the others are done.

    ``evals`` holds every evaluation record of every run (``reader.results``); ``references`` has rows
    ``task, role, value, items, path``: the teacher's and the warm-up student's held-out greedy accuracy on the
    items of the runs' final evaluation, and the CSV of their per-item records (``reference_items`` reads them).
    A run whose directory already holds a finished run is read back, not retrained.
    """
    runtime = runtime or Runtime()
    configs, specs = _plan(base, tasks, divergences, methods, seeds, task_overrides, extra_arms, variants)
    workers = resolve_workers(workers, runtime.device)
    progress = runtime.progress and distributed.world().is_main
    jobs = [(run, str(Path(runs_dir) / run_name(run))) for run in specs]
    size = resolve_cohort(cohort, runtime.device)
    groups = _groups(jobs, size) if jobs else []
    workers = min(workers, len(groups)) or 1
    refs, loaded = [], {}
    for config in configs:  # supervised training wants every thread of one process
        task, start = get_task(config.task.task), time.perf_counter()
        loaded[config.task.task] = task, load_models(config, task, runtime.replace(progress=progress))
        refs += _references(config, task, loaded[config.task.task][1], Path(runs_dir))
        _log(progress, f"{config.task.task}: teacher {refs[-2]['value']:.2f}, warm-up student "
                       f"{refs[-1]['value']:.2f} held-out greedy accuracy ({time.perf_counter() - start:.0f} s)")
    failed = []
    if workers == 1:
        beat, done = Heartbeat(enabled=progress), 0
        for group in groups:
            task, models = loaded[group[0][0].task.task]
            for run_dir, err in _run(group, runtime.replace(progress=progress), task, models, beat, size == 1):
                done += 1
                failed += _finished(progress, done, len(jobs), run_dir, err)
            beat.reset()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker,
                                 (threads, os.getpid())) as pool:
            failed = _wait(pool, groups, runtime, f"runs ({workers} workers)", progress, size == 1)
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} runs failed (each alone, the others are done): "
                        + "; ".join(failed))
    return results([run_dir for _, run_dir in jobs], kind="eval"), pd.DataFrame(refs)


def _finished(progress: bool, done: int, n: int, run_dir: str, err) -> list[str]:
    """The line of a finished run; for a failed one (in a cohort) nothing but its entry in the sweep's list."""
    if err is None:
        _log(progress, _summary(done, n, run_dir))
        return []
    recorded = f" (recorded in its {layout.ERROR})" if (Path(run_dir) / layout.ERROR).exists() else ""
    return [f"{Path(run_dir).name}: {type(err).__name__}: {err}{recorded}"]


def _log(progress: bool, message: str) -> None:
    """A plain line on stdout: ``opdlab notebooks`` streams it live, where a notebook's progress bars stay
    inside the notebook."""
    if progress:
        print(message, flush=True)


def _summary(i: int, n: int, run_dir: str) -> str:
    """``[i/n] <run name>: greedy accuracy <first> -> <last> in <seconds> s``, from the run's metrics."""
    df = read_metrics(run_dir)
    evals = df[df["kind"] == "eval"]
    seconds = df.filter(regex=r"^time_(?!.*_per_s$)").sum().sum()  # durations, not the rates
    return (f"[{i:>{len(str(n))}}/{n}] {Path(run_dir).name}: greedy accuracy {evals['greedy_accuracy'].iloc[0]:.2f}"
            f" -> {evals['greedy_accuracy'].iloc[-1]:.2f} ({seconds:.0f} s)")


def _wait(pool: ProcessPoolExecutor, groups: list[list[tuple]], runtime: Runtime, desc: str,
          progress: bool, alone: bool = True) -> list[str]:
    """Train the groups of ``(config, run_dir)`` pairs in ``pool`` (``_run``) and wait for all, with a progress
    bar, a line per finished run and, between those, a line on the running runs at least every
    ``heartbeat.EVERY`` seconds; re-raise the first failure without cohorts (``alone``), else return them all."""
    pending = {pool.submit(_run, group, runtime.replace(progress=False), alone=alone): group for group in groups}
    n, done, failed = sum(len(g) for g in groups), 0, []
    beat, started = Heartbeat(enabled=progress), time.time()
    try:
        with tqdm(total=n, desc=desc, disable=not progress) as bar:
            while pending:
                finished, _ = wait(pending, timeout=max(0.05, beat.remaining()) if progress else None,
                                   return_when=FIRST_COMPLETED)
                for future in finished:
                    for run_dir, err in future.result():  # a failed run alone raises here
                        done += 1
                        bar.update(1)
                        failed += _finished(progress, done, n, run_dir, err)
                    pending.pop(future)
                    beat.reset()
                beat.beat(lambda: _running(done, n, [r for f, g in pending.items() if f.running() for r in g],
                                           started))
    except BaseException:  # an error or an interrupt: drop the queued jobs; running ones end at a checkpoint
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return failed


def _running(done: int, n: int, running: list[tuple], since: float) -> str:
    """``<done>/<n> runs done; running: <name> step s/steps, ...`` for the ``(config, run_dir)`` pairs whose
    metrics were written after ``since`` (a ``time.time()``): the pool also marks a queued run as running, and
    a queued run may have metrics from an earlier sweep that it resumes or reads back."""
    parts = []
    for run, run_dir in running:
        metrics = Path(run_dir) / layout.METRICS
        try:
            if metrics.stat().st_mtime >= since:
                parts.append(f"{Path(run_dir).name} step {last_step(run_dir)}/{run.optim.steps}")
        except OSError:
            continue
    return f"{done}/{n} runs done; running: " + (", ".join(parts) if parts else "(starting)")
