"""Cohort training: R runs trained in lockstep by ``cohort.cohort_step``, each in its own run directory as
``loop.train`` writes it, so that a run of a cohort resumes, is read back and is swept like a run alone."""
from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import torch

from opdlab.config.runtime import Runtime
from opdlab.errors import UserError
from opdlab.rundir import layout
from opdlab.rundir.reader import read_metrics
from opdlab.rundir.writer import RunLog
from opdlab.tasks import get_task
from opdlab.training import cohort
from opdlab.training.loop import Interrupted, begin, evaluate_and_log, finish_step, stopped_message, train
from opdlab.training.models import load_models

__all__ = ["train_cohort", "RUN_ERRORS"]

RUN_ERRORS = (UserError, OSError, RuntimeError, ValueError)
"""What a run's own work may raise and fail alone with (bad numbers, a full disk, torch refusing an input);
programming errors (TypeError, AttributeError, ...) keep their traceback and stop the cohort."""


def _fail(member: dict, step: int | None, err: BaseException) -> None:
    """Record why ``member`` failed at ``step`` in its run directory (``layout.ERROR``), drop it from the cohort."""
    member["error"] = err
    record = dict(step=step, type=type(err).__name__, message=str(err),
                  traceback="".join(traceback.format_exception(err)) if not isinstance(err, UserError) else None)
    with contextlib.suppress(OSError):  # a disk too full for the record too: the error is still returned
        member["log"].write_json(layout.ERROR, record)


def train_cohort(specs, run_dirs, runtime=None, task=None, models=None, stop_after: int | None = None,
                 shared=None) -> list:
    """Train (or resume) R runs in lockstep, ``cohort_step`` stepping every run due at a step; each run writes its
    own run directory as ``loop.train`` would, so it resumes, is read back and is swept like a single run.

    The runs share one task and one pair of models (their ``task`` and ``models`` specs must be equal) and may
    differ in anything else. A run resumed at step s joins the cohort at step s; one of fewer steps leaves it at
    its end. Failure stays inside one run: a run whose own step fails (a non-finite gradient norm, its
    evaluation, its checkpoint write) is recorded in its ``layout.ERROR`` and leaves the cohort; where the shared
    step itself fails, the cohort stops and every run still going continues alone (``loop.train``, from its last
    checkpoint), so the failing one fails alone. Returns, per run, its metrics DataFrame or the exception it
    failed with. Ctrl-C raises ``loop.Interrupted`` naming every run's last checkpoint; a kill at any point leaves
    every run resumable from its last checkpoint, as a single run is. ``shared``: as ``loop.train``'s, where
    the evaluations of the initial students are kept.
    """
    specs, run_dirs = list(specs), [Path(d) for d in run_dirs]
    distinct = len({d.resolve() for d in run_dirs})
    if not specs or len(specs) != len(run_dirs) or distinct != len(run_dirs):
        raise UserError(f"train_cohort needs one distinct run directory per spec, got {len(specs)} specs and "
                        f"{len(run_dirs)} directories ({distinct} distinct)")
    kinds = sorted({str(cohort.key(s)) for s in specs})
    if len(kinds) > 1:
        raise UserError("the runs of a cohort share one task spec (task and completion budget), one models spec and "
                        "one number of completions per step (prompts_per_step x samples_per_prompt); these differ: "
                        + "; ".join(kinds))
    runtime = runtime or Runtime()
    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)
    task = task if task is not None else get_task(specs[0].task.task)
    models = models if models is not None else load_models(specs[0], task, runtime)
    members = [dict(spec=s, dir=d, error=None, log=None, tracker=None) for s, d in zip(specs, run_dirs)]
    with contextlib.ExitStack() as stack:
        for i, m in enumerate(members):
            try:
                m["log"] = stack.enter_context(RunLog(m["dir"], m["spec"]))
                m["tr"], m["start"], m["tracker"] = begin(m["spec"], m["dir"], runtime, task, models, m["log"])
                if m["tracker"] is not None:
                    stack.callback(m["tracker"].close)
                steps = m["spec"].optim.steps
                m["saved"], m["end"] = m["start"], steps if stop_after is None else min(steps, stop_after)
            except RUN_ERRORS as err:  # refused, unreadable or a damaged checkpoint: this run only
                if m["log"] is None:
                    m["error"] = err
                else:
                    _fail(m, 0, err)
            except KeyboardInterrupt:  # the run directories are released as the stack unwinds
                raise Interrupted(f"interrupted while setting up run {i + 1} of the cohort's {len(members)}, before "
                                  "any of them took a step; run the cohort again to resume each run from its last "
                                  f"checkpoint ({', '.join(str(d) for d in run_dirs)})") from None
        alive, shared_failure = [m for m in members if m["error"] is None], None
        if alive:
            cohort.check([m["tr"] for m in alive])  # one teacher, tokenizer, task, budget, batch: else none starts
        try:
            for m in list(alive):
                if m["start"] == 0:
                    try:
                        evaluate_and_log(m["tr"], m["log"], m["tracker"], 0, m["spec"].optim.steps == 0, shared)
                    except RUN_ERRORS as err:
                        _fail(m, 0, err)
            first = min((m["start"] for m in alive if m["error"] is None), default=0)
            last = max((m["end"] for m in alive if m["error"] is None), default=0)
            for step in range(first, last):
                due = [m for m in alive if m["error"] is None and m["start"] <= step < m["end"]]
                if not due:
                    continue
                try:
                    metrics = cohort.cohort_step([m["tr"] for m in due], step)
                except RUN_ERRORS as err:  # not any one run's: go on run by run, and say so
                    shared_failure = err
                    print(f"the cohort's shared step {step + 1} failed ({type(err).__name__}: {err}); each of its "
                          "runs goes on alone from its last checkpoint\n" + "".join(traceback.format_exception(err)),
                          file=sys.stderr, flush=True)
                    break
                for m, values in zip(due, metrics):
                    try:
                        m["saved"] = finish_step(m["tr"], m["log"], m["tracker"], values, step + 1, m["saved"],
                                                 m["dir"])
                    except RUN_ERRORS as err:
                        _fail(m, step + 1, err)
        except KeyboardInterrupt:
            raise Interrupted("; ".join(stopped_message(m["dir"], m["saved"], m["spec"].optim.steps)
                                        for m in alive if m["error"] is None)) from None
    if shared_failure is not None:  # the locks are released: each run still going resumes alone
        for m in alive:
            if m["error"] is None:
                try:
                    train(m["spec"], m["dir"], runtime, task, models, stop_after=stop_after, shared=shared)
                except RUN_ERRORS as err:
                    m["error"] = err
                    with contextlib.suppress(*RUN_ERRORS), RunLog(m["dir"], m["spec"]) as log:  # held elsewhere: not
                        m["log"] = log                                                           # recorded, returned
                        _fail(m, None, err)
    return [m["error"] if m["error"] is not None else read_metrics(m["dir"]) for m in members]
