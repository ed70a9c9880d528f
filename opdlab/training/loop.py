"""The OPD training loop, read top to bottom: load the models, then for each step ``step.opd_step`` (sample,
score, loss, update), evaluate every ``eval_every`` steps, checkpoint every ``runtime.checkpoint_every``.

What a run computes is its ``RunSpec`` (``opdlab.config.spec``); how it runs (device, cache, threads, sampler, scorer,
compiled decoding, checkpoints, progress) is its ``Runtime`` (``opdlab.config.runtime``), never part of its name.

``evaluate`` measures held-out greedy accuracy, sampled avg@k and the exact per-token divergence to the teacher
over the vocabulary, and returns one record per held-out item (``ITEM_COLUMNS``): every run of a task sees the
same items in the same order, so arms compare item by item (``opdlab.experiments.stats``). ``train`` writes these records
into the run directory (``runlog.RunLog.write_items``; read back with ``runread.read_items``).

A run started again in the same directory resumes from its checkpoint and ends with the same metrics as an
uninterrupted one: the training prompts are a fixed seeded list, sampling uses one explicit generator (one per
rank) whose state is checkpointed, and evaluation draws from a generator seeded by the step. The run directory
(``runlog.RunLog``) is locked while a run writes it, and a run resumes only under the fingerprint it started
with (spec, teacher and initial student weights); the runtime may change on resume (a compiled decoder or
another thread count then gives an equal run to float rounding).

Several processes (``torchrun --nproc_per_node N -m opdlab train ...``) train one student data-parallel:
each rank samples its share of the step's prompts, the surrogate is reduced over the global batch and the
gradients summed, and rank 0 alone evaluates and writes the run directory (``opdlab.training.distributed``).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from opdlab.training import distributed

from opdlab.core import divergences
from opdlab.errors import UserError
from opdlab.lm.cache import teacher_and_student
from opdlab.files import write_atomic
from opdlab.lm.modeling import load_model, weights_digest
from opdlab.lm.sampling import completion_logits, gather_logp, sample
from opdlab.lm.tokenizer import check_compatible, check_task_tokenizer
from opdlab.rundir.writer import RunLog, fingerprint
from opdlab.rundir.reader import read_metrics
from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec, run_name
from opdlab.training.step import EVAL_SEED, Models, Trainer, eval_examples, max_new_tokens, opd_step
from opdlab.rundir.tracking import Tracker

__all__ = ["train", "evaluate", "evaluate_start", "load_models", "run_name", "Interrupted", "ITEM_COLUMNS"]

ITEM_COLUMNS = ("item", "item_id", "correct", "sampled_correct", "length", "hit_cap", "kl_reverse", "kl_forward",
                "divergence")
"""One evaluation record per held-out item: its index in the evaluation order and a stable id (sha256 of the
prompt, 12 hex), greedy correctness (0/1), the mean correctness of its ``eval_samples`` sampled completions,
the greedy completion's length in tokens and whether it hit the token budget, and the exact per-token reverse
KL, forward KL and run divergence to the teacher along its sampled completions (mean over their tokens)."""


def load_models(spec: RunSpec, task, runtime: Runtime | None = None) -> Models:
    """The run's ``Models``: local checkpoints where the spec names them, else the task-trained teacher and
    warm-up student from the cache (trained on a miss). Under a launcher rank 0 loads them first (training a
    cache miss), then the other ranks, each on its own device."""
    runtime = runtime or Runtime()
    device = distributed.device(runtime.device)
    with distributed.main_first(distributed.join(device)):
        return _load_models(spec, task, device, runtime)


def check_before_training(spec: RunSpec, task, runtime: Runtime) -> None:
    """What can be checked before a teacher or warm-up trains: the cache path is a directory (or can be one), and
    the recipes of the models to be built build (on the meta device: no memory, no time). A ``UserError`` names
    the setting."""
    from opdlab.lm.cache import cache_dir
    from opdlab.lm.modeling import build_model
    from opdlab.lm.tokenizer import char_tokenizer

    root = cache_dir(runtime.cache)
    for parent in (root, *root.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cache = {str(root)!r}: {parent} is a file, not a directory; give another cache "
                                "directory (-p cache DIR or $OPDLAB_CACHE)")
            break
    m = spec.models
    roles = [r for r, path in (("teacher", m.teacher_path), ("student", m.student_path)) if path is None]
    if not roles or not hasattr(task, "alphabet"):
        return
    tokenizer = char_tokenizer(task.alphabet)
    for role in roles:
        recipe = m.recipe(role)
        try:
            with torch.device("meta"):
                build_model(recipe, tokenizer)
        except Exception as err:  # transformers and torch each refuse a shape in their own words
            raise UserError(f"the {role} of hidden {recipe.hidden}, {recipe.layers} layers, {recipe.heads} heads "
                            f"cannot be built ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
                            f"change {role}_hidden or {role}_layers") from None


def _load_models(spec: RunSpec, task, device, runtime: Runtime) -> Models:
    m = spec.models
    teacher, student, tokenizer, meta = None, None, None, {}
    check_before_training(spec, task, runtime)
    if m.teacher_path is None or m.student_path is None:
        teacher, student, tokenizer, meta = teacher_and_student(
            task, m.recipe("teacher"), m.recipe("student"), device, runtime.cache, runtime.progress)
    cached_tokenizer = tokenizer
    if m.teacher_path is not None:
        teacher, t_tok = load_model(m.teacher_path, device)
        check_task_tokenizer(teacher, t_tok, task, m.teacher_path)
        tokenizer, meta["teacher"] = t_tok, {"path": m.teacher_path}
    if m.student_path is not None:
        student, s_tok = load_model(m.student_path, device)
        check_task_tokenizer(student, s_tok, task, m.student_path)
        check_compatible(teacher, student, tokenizer, s_tok)
        meta["student"] = {"path": m.student_path}
    elif m.teacher_path is not None:  # a local teacher beside a cached student: same vocabulary?
        check_compatible(teacher, student, tokenizer, cached_tokenizer)
    return Models(teacher.eval(), student, tokenizer, meta)


def _item_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


@torch.no_grad()
def evaluate(tr: Trainer, step: int, n: int | None = None, sampled_n: int | None = None) -> tuple[dict, pd.DataFrame]:
    """Held-out greedy accuracy, sampled avg@k, and the exact per-token divergence to the teacher (the run's
    divergence, reverse KL and forward KL) over the vocabulary at the contexts the student visits, on the first
    ``n`` held-out examples (default ``eval_n``); the sampled accuracy and the divergences on the first
    ``sampled_n`` of them only (default all), the other items' such columns NaN. Returns ``(metrics, items)``: the
    run's metrics and one record per item (``ITEM_COLUMNS``)."""
    s, rt, t0 = tr.spec, tr.runtime, time.perf_counter()
    examples = tr.eval_examples if n is None else eval_examples(tr.task, n, split=s.eval.eval_split)
    drawn = examples[:sampled_n] if sampled_n is not None else examples
    k, cap = s.eval.eval_samples, tr.max_new_tokens
    tr.student.eval()
    fast = None if rt.sampler == "fast" else False

    def draw(prompts, generator, greedy):
        return [sample(tr.student, tr.tokenizer, prompts[i:i + 128], tr.task, cap, generator, greedy=greedy,
                       fast=fast, compiled=rt.compile_decode) for i in range(0, len(prompts), 128)]

    greedy = draw([ex.prompt for ex in examples], None, True)
    gen = torch.Generator(device=tr.device).manual_seed(EVAL_SEED + 7919 * s.optim.seed + step)
    sampled = draw([ex.prompt for ex in drawn for _ in range(k)], gen, False)
    divs = {"divergence": tr.div, "kl_reverse": divergences.get("reverse_kl"), "kl_forward": divergences.get("forward_kl")}
    sums, totals = {name: [] for name in divs}, {name: 0.0 for name in divs}
    for r in sampled:
        _, lt = gather_logp(completion_logits(tr.teacher, r), r.completion_ids_BT)
        _, ls = gather_logp(completion_logits(tr.student, r), r.completion_ids_BT)
        for name, div in divs.items():
            D_BT = div.exact(lt, ls) * r.mask_BT
            sums[name].append(D_BT.sum(1))
            totals[name] += float(D_BT.sum())  # the batch's float32 sum, as the run's earlier evaluations were
    tokens_N = torch.cat([r.mask_BT.sum(1) for r in sampled]).double()
    g_texts = [t for r in greedy for t in r.texts]
    g_len = torch.cat([r.attention_BT.sum(1) for r in greedy])
    s_correct = torch.tensor([float(tr.task.score(ex, t).correct)
                              for ex, t in zip([ex for ex in drawn for _ in range(k)],
                                               [t for r in sampled for t in r.texts])]).reshape(-1, k)
    per_item = {"sampled_correct": s_correct.mean(1),
                **{name: torch.cat(v).double().reshape(-1, k).sum(1) / tokens_N.reshape(-1, k).sum(1).clamp_min(1)
                   for name, v in sums.items()}}
    rest = len(examples) - len(drawn)  # items scored greedy only
    items = pd.DataFrame(dict(
        item=range(len(examples)), item_id=[_item_id(ex.prompt) for ex in examples],
        correct=[int(tr.task.score(ex, t).correct) for ex, t in zip(examples, g_texts)],
        length=g_len.numpy(), hit_cap=(g_len >= cap).numpy(),
        **{name: torch.cat([v, v.new_full((rest,), float("nan"))]).numpy() for name, v in per_item.items()}
    ))[list(ITEM_COLUMNS)]
    n_tokens = float(tokens_N.sum())
    totals = {name: total / max(n_tokens, 1) for name, total in totals.items()}
    lengths = torch.cat([r.mask_BT.sum(1) for r in sampled])
    metrics = dict(greedy_accuracy=float(items["correct"].mean()), sampled_accuracy=float(s_correct.mean()),
                   completion_length=float(lengths.mean()), exact_divergence=totals["divergence"],
                   exact_reverse_kl=totals["kl_reverse"], exact_forward_kl=totals["kl_forward"],
                   eval_items=len(examples), hit_cap_rate=float(items["hit_cap"].mean()),
                   time_eval=time.perf_counter() - t0)
    return (metrics if not rest else {**metrics, "sampled_items": len(drawn)}), items


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
                         f"generator belongs to {saved}: resume it there (device={saved!r}) or use a new run directory")
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


def final_sampled_n(spec: RunSpec) -> int | None:
    """How many of the last evaluation's items are sampled and scored for divergence (None: all of them), as
    ``EvalSpec.final_eval_sampled`` asks."""
    e = spec.eval
    return None if e.final_eval_sampled or not e.final_eval_n or e.final_eval_n <= e.eval_n else e.eval_n


def evaluate_start(tr: Trainer, n: int | None = None, sampled_n: int | None = None,
                   shared: str | Path | None = None) -> tuple[dict, pd.DataFrame]:
    """``evaluate(tr, 0, n, sampled_n)`` of a run's initial student, kept in the folder ``shared`` for every run
    that would compute the same numbers: the same teacher and initial student weights, tokenizer, task spec,
    evaluation, seed, divergence, item counts, sampler, device and thread count (the arms of one seed in a sweep).
    The first such run computes it and writes it atomically; the others read it back, checked against its key and
    with its columns' types, and a file that does not check out is computed again (said on stderr). The key
    covers inputs, not code: after a change to the evaluation itself, delete the folder. ``shared=None``: computed
    here, kept nowhere. The metrics' ``time_eval`` is this call's own time."""
    if shared is None:
        return evaluate(tr, 0, n, sampled_n)
    s, t0 = tr.spec, time.perf_counter()
    tok = tr.tokenizer
    named = dict(teacher=weights_digest(tr.teacher), student=weights_digest(tr.student), task=asdict(s.task),
                 tokenizer=[type(tok).__name__, len(tok), getattr(tok, "chat_template", None)],
                 eval=asdict(s.eval), n=n or s.eval.eval_n, sampled_n=sampled_n, max_new_tokens=tr.max_new_tokens,
                 seed=s.optim.seed, divergence=s.objective.divergence, sampler=tr.runtime.sampler,
                 compile_decode=tr.runtime.compile_decode, device=tr.device.type, threads=torch.get_num_threads())
    key = hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(shared) / f"start-{key}.json"
    if path.exists():
        try:
            kept = json.loads(path.read_text())
            items = pd.DataFrame(kept["items"]).astype(kept["dtypes"])
            if kept["key"] != key or list(items.columns) != list(ITEM_COLUMNS) or len(items) != named["n"]:
                raise ValueError("its key, columns or item count differ")
            return {**kept["metrics"], "time_eval": time.perf_counter() - t0}, items
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"{path} could not be used ({err}); evaluating again", file=sys.stderr)
    metrics, items = evaluate(tr, 0, n, sampled_n)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(dict(key=key, metrics=metrics, items=items.to_dict(orient="list"),
                                           dtypes={c: str(t) for c, t in items.dtypes.items()})))
    except OSError as err:  # the run has its evaluation: only the sharing is lost
        print(f"the start evaluation could not be kept at {path} ({err}); the runs after this one evaluate "
              "their own", file=sys.stderr)
    return metrics, items


def _evaluate_and_log(tr: Trainer, log: RunLog | None, tracker, step: int, final: bool,
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


ERROR_FILE = "error.json"
"""Where a run of a cohort records why it failed (``cohort_train.train_cohort``); removed when the run is taken up
again."""


def begin(spec: RunSpec, run_dir: Path, runtime: Runtime, task, models: Models, log: RunLog | None):
    """A run's trainer from ``models`` (the student copied), its checkpoint loaded where it has one (``_start``,
    ``_resume``; a collective under a launcher), and its tracker (rank 0), a stale ``ERROR_FILE`` removed. Returns
    ``(trainer, completed steps, tracker or None)``."""
    if log is not None:
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
    tr = Trainer(spec, task, models.teacher, copy.deepcopy(models.student), models.tokenizer, runtime)
    w = tr.world
    loaded = distributed.from_main(lambda: _start(tr, log, models), w)
    start = _resume(tr, run_dir, loaded, log)
    tracker = Tracker(run_dir, runtime.report_to, run_dir.name, spec.to_dict(), start) if log is not None else None
    return tr, start, tracker


def finish_step(tr: Trainer, log: RunLog | None, tracker, metrics: dict, done: int, saved: int, run_dir: Path) -> int:
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
        _evaluate_and_log(tr, log, tracker, done, done == steps)  # the other ranks go on sampling
    if done % tr.runtime.checkpoint_every == 0 or done == steps:
        rng = _rng_state(tr)
        if log is not None:
            log.save_checkpoint(tr.student, tr.tokenizer, tr.optimizer, done, rng)
        saved = done
    return saved


def stopped_message(run_dir: Path, saved: int, steps: int) -> str:
    return (f"{run_dir} stopped; its last checkpoint is step {saved} of {steps}: run `opdlab train {run_dir}` "
            "again to resume from there")


def train(spec: RunSpec, run_dir: str | Path, runtime: Runtime | None = None, task=None,
          models: Models | None = None, stop_after: int | None = None, heartbeat=None,
          shared: str | Path | None = None) -> pd.DataFrame:
    """Run (or resume) OPD training as ``spec`` says, the way ``runtime`` says, writing ``run_dir``; return its
    metrics DataFrame.

    The run directory is locked for the duration (``runlog.RunLog``); a run resumes only under the fingerprint
    it started with (spec, teacher and initial student weights). A non-finite gradient norm stops the run with
    a ``UserError`` before the step is checkpointed; Ctrl-C raises ``Interrupted`` saying how to resume.

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
                _evaluate_and_log(tr, log, tracker, 0, steps == 0, shared)
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
