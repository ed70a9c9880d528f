"""The OPD training loop: sample from the student, score with the teacher, advantage, update, evaluate.

One step (``opd_step``), read top to bottom (OPD+ paper, arXiv 2606.01039, Alg. 1):

1. sample ``G`` completions per prompt from the student pi_theta at temperature 1, full vocabulary
   (``lm.sampling.sample``); tool results are forced in as environment tokens with mask 0;
2. score them with the teacher under no_grad: ``logp_teacher_BT = log pi_T(y_t|c_t)``;
3. the student's ``logp_student_BT = log pi_theta(y_t|c_t)`` with gradient, from the same aligned logits;
4. advantages ``A_t = a(u_t) - sum_{s>t} gamma^(s-t) f(u_s) - b(c_t)``, ``log u = logp_teacher - logp_student``,
   with a = -f (``opd``, stop-gradient) or a = w_f = -f + u f' (``opd_plus``) and the baseline b of
   ``config.baseline`` (``estimators.baselined_advantages``, the function the exact toy tests cover); never
   z-scored (docs/math.md §3-§6);
5. REINFORCE surrogate ``L = -sum A_t log pi_theta(y_t|c_t) / n`` with n the number of unmasked tokens
   (``reduction="token"``) or of sequences (``"sequence"``), gradient clipping, AdamW step.

``train`` runs the steps, evaluates every ``eval_every`` steps on the held-out split (greedy accuracy, avg@k,
exact per-token divergence to the teacher over the vocabulary), and checkpoints every ``checkpoint_every``
steps. A run started again in the same directory resumes from its checkpoint and ends with the same metrics
as an uninterrupted one: the training prompts are a fixed seeded list, sampling uses one explicit generator
(one per rank) whose state is checkpointed, and evaluation draws from a generator seeded by the step. The run
directory (``runlog.RunLog``) is locked while a run writes it, and a run resumes only under the fingerprint it
started with (config, teacher and initial student weights), except the fields of ``config.HOW_ONLY``
(``compile_decode``), which may change on resume; such a run equals an uninterrupted one to float rounding.

Several processes (``torchrun --nproc_per_node N -m opdlab train ...``) train one student data-parallel:
each rank samples its share of the step's prompts, the surrogate is reduced over the global batch and the
gradients summed, and rank 0 alone evaluates and writes the run directory (``opdlab.distributed``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from opdlab import distributed, divergences, estimators
from opdlab.config import HOW_ONLY, TrainConfig
from opdlab.lm.cache import teacher_and_student
from opdlab.lm.modeling import load_model
from opdlab.lm.sampling import completion_logits, gather_logp, sample, sampled_accuracy
from opdlab.lm.sft import warmup_cosine_lr
from opdlab.lm.tokenizer import check_compatible, check_task_tokenizer
from opdlab.runlog import RunLog, fingerprint, read_metrics

__all__ = ["train", "opd_step", "surrogate_loss", "evaluate", "load_models", "run_name", "max_new_tokens", "eval_examples", "Trainer",
           "EVAL_SEED", "Interrupted"]

EVAL_SEED = 10_000  # the held-out examples are the same for every run, so methods compare on one set


def load_models(config: TrainConfig, task, progress: bool = True):
    """``(teacher, student, tokenizer, meta)``: local checkpoints where the config names them, else the
    task-trained teacher and warm-up student from the cache (trained on a miss). Under a launcher rank 0 loads
    them first (training a cache miss), then the other ranks, each on its own device."""
    device = distributed.device(config.device)
    with distributed.main_first(distributed.join(device)):
        return _load_models(config, task, device, progress)


def _load_models(config: TrainConfig, task, device, progress: bool):
    teacher, student, tokenizer, meta = None, None, None, {}
    if config.teacher_path is None or config.student_path is None:
        teacher, student, tokenizer, meta = teacher_and_student(
            task, config.recipe("teacher"), config.recipe("student"), device, config.cache, progress)
    cached_tokenizer = tokenizer
    if config.teacher_path is not None:
        teacher, t_tok = load_model(config.teacher_path, device)
        check_task_tokenizer(teacher, t_tok, task, config.teacher_path)
        tokenizer, meta["teacher"] = t_tok, {"path": config.teacher_path}
    if config.student_path is not None:
        student, s_tok = load_model(config.student_path, device)
        check_task_tokenizer(student, s_tok, task, config.student_path)
        check_compatible(teacher, student, tokenizer, s_tok)
        meta["student"] = {"path": config.student_path}
    elif config.teacher_path is not None:  # a local teacher beside a cached student: same vocabulary?
        check_compatible(teacher, student, tokenizer, cached_tokenizer)
    return teacher.eval(), student, tokenizer, meta


def eval_examples(task, n: int, seed: int = EVAL_SEED) -> list:
    """The ``n`` held-out examples a run evaluates on (``task.examples("test", n, seed)``); the default seed
    gives every run, the sweep's reference lines and ``opdlab eval`` one common set."""
    return task.examples("test", n, seed=seed)


def max_new_tokens(task) -> int:
    """A completion budget for ``task``: the longest of 500 training targets (tool results included) + 8."""
    return max(len(ex.target) for ex in task.examples("train", 500, seed=0)) + 8


@dataclass
class Trainer:
    """What one run holds: config, task and models (given), and what follows from them (derived, not arguments):
    the divergence, the optimizer, the sampling generator, the training prompts, the held-out examples, the
    completion budget, and this process's place among the ranks (``distributed.World``; one process: rank 0
    of 1), whose generator is seeded with ``distributed.rank_seed(seed, rank)``."""

    config: TrainConfig
    task: object
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    div: divergences.Divergence = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    generator: torch.Generator = field(init=False)
    prompts: list = field(init=False)
    eval_examples: list = field(init=False)
    max_new_tokens: int = field(init=False)
    world: distributed.World = field(init=False)

    def __post_init__(self):
        c, device = self.config, next(self.student.parameters()).device
        self.world = distributed.world()
        distributed.check_share(c.prompts_per_step, self.world)
        self.div = divergences.get(c.divergence)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.generator = torch.Generator(device=device).manual_seed(distributed.rank_seed(c.seed, self.world.rank))
        self.prompts = self.task.examples("train", c.steps * c.prompts_per_step, seed=c.seed)
        self.eval_examples = eval_examples(self.task, c.eval_n)
        self.max_new_tokens = c.max_new_tokens or max_new_tokens(self.task)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def batch(self, step: int) -> list:
        """The training examples this process samples at ``step``, each repeated ``samples_per_prompt`` times
        (grouped): its contiguous share of the step's prompts, all of them in one process."""
        P, G = self.config.prompts_per_step, self.config.samples_per_prompt
        mine = distributed.share(self.prompts[step * P:(step + 1) * P], self.world)
        return [ex for ex in mine for _ in range(G)]


class _Clock:
    """Wall-clock time per phase (synchronising CUDA so that asynchronous kernels are charged correctly)."""

    def __init__(self, device):
        self.device, self.times, self.t = device, {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[f"time_{phase}"] = self.times.get(f"time_{phase}", 0.0) + now - self.t
        self.t = now


def opd_step(tr: Trainer, step: int) -> dict:
    """One OPD / OPD+ update on the prompts of ``step``; returns its metrics (see the module doc)."""
    c, clock = tr.config, _Clock(tr.device)
    examples = tr.batch(step)
    # 1. sample completions from the student itself: temperature 1, no top-k / top-p, tools executed
    #    (the supervised reference arm samples from the teacher instead)
    tr.student.eval()
    sampler = tr.teacher if c.method == "supervised_kd" else tr.student
    rollout = sample(sampler, tr.tokenizer, [ex.prompt for ex in examples], tr.task, tr.max_new_tokens,
                     tr.generator, greedy=False, temperature=1.0, compiled=c.compile_decode)
    ids_BT, mask_BT = rollout.completion_ids_BT, rollout.mask_BT
    clock.lap("sample")
    # 2. teacher log-probabilities of the sampled tokens, no gradient
    with torch.no_grad():
        logp_teacher_BT, logp_teacher_BTV = gather_logp(completion_logits(tr.teacher, rollout), ids_BT)
    clock.lap("teacher")
    # 3. student log-probabilities with gradient, aligned with the same tokens, in eval mode like it sampled
    #    (with dropout the scored policy would be another one than the sampler)
    logp_student_BT, logp_student_BTV = gather_logp(completion_logits(tr.student, rollout), ids_BT)
    clock.lap("student_forward")
    # 4. advantages (never z-scored) and the REINFORCE surrogate
    loss, adv = surrogate_loss(c, tr.div, logp_student_BT, logp_student_BTV, logp_teacher_BT, logp_teacher_BTV,
                               mask_BT)
    loss = distributed.global_loss(loss, mask_BT, c.reduction, tr.world)  # this rank's part of the global loss
    clock.lap("advantage")
    # 5. backward, the gradient summed over ranks, clip, step
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.sum_gradients(tr.student.parameters(), tr.world)
    clock.lap("student_backward")
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.student.parameters(), c.grad_clip)
    lr = c.lr if c.lr_schedule == "constant" else warmup_cosine_lr(step, c.steps, c.lr)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    tr.optimizer.step()
    clock.lap("optimizer")
    values = _step_values(tr, examples, rollout, adv, loss, logp_student_BTV.detach(), logp_teacher_BTV)
    metrics = _train_metrics(distributed.gather(values, tr.world), grad_norm)
    clock.lap("bookkeeping")
    return {**metrics, "lr": lr, **clock.times}


def surrogate_loss(config: TrainConfig, div, logp_student_BT, logp_student_BTV, logp_teacher_BT, logp_teacher_BTV,
                   mask_BT) -> tuple[torch.Tensor, estimators.Advantages | None]:
    """Step 4 of ``opd_step``: the loss whose gradient the step follows, and the advantages behind it.

    ``config.method`` ``"opd"`` / ``"opd_plus"``: ``estimators.baselined_advantages`` (γ, baseline, log u clip
    of the config) in the REINFORCE surrogate, the student's log-probabilities detached inside the advantage.
    The two reference methods return no advantages: ``"full_vocabulary"`` is ``estimators.full_vocabulary_loss``
    (the exact token-local gradient at the visited contexts, docs/math.md §3), ``"supervised_kd"`` is
    ``estimators.supervised_loss`` on completions the teacher sampled. The log-probabilities carry the
    student's graph; everything else is treated as a constant.
    """
    c = config
    if c.method == "full_vocabulary":
        return estimators.full_vocabulary_loss(div, logp_student_BTV, logp_teacher_BTV, mask_BT, c.reduction), None
    if c.method == "supervised_kd":
        return estimators.supervised_loss(logp_student_BT, mask_BT, c.reduction), None
    adv = estimators.baselined_advantages(div, logp_student_BT.detach(), logp_teacher_BT, mask_BT, c.method, c.gamma,
                                          c.baseline, logp_student_BTV.detach(), logp_teacher_BTV,
                                          c.samples_per_prompt, c.log_u_clip)
    return estimators.reinforce_loss(logp_student_BT, adv.A_BT, mask_BT, c.reduction), adv


def _step_values(tr, examples, rollout, adv, loss, logp_student_BTV, logp_teacher_BTV) -> dict:
    """What the step's metrics are computed from, for this rank's share of the batch: its part of the loss,
    the masked exact divergence and the mask (flattened), sequence lengths, correctness, and the advantages
    and log u at unmasked tokens with the clip counts (for the methods that have advantages)."""
    mask_BT = rollout.mask_BT
    D_BT = tr.div.exact(logp_teacher_BTV, logp_student_BTV)
    values = dict(loss=loss.detach(), D=(D_BT * mask_BT).reshape(-1), mask=mask_BT.reshape(-1),
                  lengths=mask_BT.sum(1), tokens=rollout.n_sampled,
                  correct=[tr.task.score(ex, t).correct for ex, t in zip(examples, rollout.texts)])
    if adv is not None:
        values.update(A=adv.A_BT[mask_BT > 0], log_u=adv.log_u_BT[mask_BT > 0], n_clipped=adv.n_clipped,
                      n_tokens=adv.n_tokens)
    return values


def _train_metrics(parts: list[dict], grad_norm) -> dict:
    """The step's metrics from the ranks' ``_step_values`` (in rank order; one part in one process): the
    global batch's loss (the sum of the ranks' parts), mean exact divergence per unmasked token, advantage
    statistics over all unmasked tokens, sampled tokens, mean completion length and accuracy."""
    def cat(key):
        return torch.cat([p[key] for p in parts])

    metrics = dict(loss=float(torch.stack([p["loss"] for p in parts]).sum()), grad_norm=float(grad_norm))
    if "A" in parts[0]:
        A, log_u = cat("A"), cat("log_u")
        n_clipped, n_tokens = sum(p["n_clipped"] for p in parts), sum(p["n_tokens"] for p in parts)
        metrics.update(adv_mean=float(A.mean()) if A.numel() else 0.0,
                       adv_std=float(A.std()) if A.numel() > 1 else 0.0,
                       adv_abs_max=float(A.abs().max()) if A.numel() else 0.0,
                       log_u_mean=float(log_u.mean()) if log_u.numel() else 0.0,
                       clip_fraction=n_clipped / max(n_tokens, 1))
    correct = [c for p in parts for c in p["correct"]]
    metrics.update(exact_divergence=float(cat("D").sum() / cat("mask").sum().clamp_min(1.0)),
                   tokens=sum(p["tokens"] for p in parts), completion_length=float(cat("lengths").mean()),
                   accuracy=sum(correct) / len(correct))
    return metrics


@torch.no_grad()
def evaluate(tr: Trainer, step: int) -> dict:
    """Held-out greedy accuracy, sampled avg@k, and the exact per-token divergence to the teacher (the run's
    divergence, reverse KL and forward KL) over the vocabulary at the contexts the student visits."""
    c, t0 = tr.config, time.perf_counter()
    tr.student.eval()
    greedy, _ = sampled_accuracy(tr.student, tr.tokenizer, tr.task, tr.eval_examples, k=1, greedy=True,
                                 max_new_tokens=tr.max_new_tokens, compiled=c.compile_decode)
    gen = torch.Generator(device=tr.device).manual_seed(EVAL_SEED + 7919 * c.seed + step)
    avg_k, rollouts = sampled_accuracy(tr.student, tr.tokenizer, tr.task, tr.eval_examples, k=c.eval_samples,
                                       generator=gen, max_new_tokens=tr.max_new_tokens,
                                       compiled=c.compile_decode)
    totals = {"exact_divergence": 0.0, "exact_reverse_kl": 0.0, "exact_forward_kl": 0.0}
    n_tokens = sum(r.n_sampled for r in rollouts)
    for r in rollouts:
        _, lt = gather_logp(completion_logits(tr.teacher, r), r.completion_ids_BT)
        _, ls = gather_logp(completion_logits(tr.student, r), r.completion_ids_BT)
        for name, div in zip(totals, (tr.div, divergences.get("reverse_kl"), divergences.get("forward_kl"))):
            D_BT = div.exact(lt, ls)
            totals[name] += float((D_BT * r.mask_BT).sum())
    lengths = torch.cat([r.mask_BT.sum(1) for r in rollouts])
    return dict(greedy_accuracy=greedy, sampled_accuracy=avg_k, completion_length=float(lengths.mean()),
                **{k: v / max(n_tokens, 1) for k, v in totals.items()},
                time_eval=time.perf_counter() - t0)


def _rng_state(tr: Trainer) -> dict:
    """The sampling generator's state and device; under a launcher also every rank's state (``ranks``) and the
    world size. A collective: every rank calls it."""
    states = distributed.gather(tr.generator.get_state(), tr.world)
    rng = {"generator": states[0], "device": tr.device.type}
    return rng if tr.world.size == 1 else {**rng, "world_size": tr.world.size, "ranks": states}


def _start(tr: Trainer, log: RunLog, teacher, student, meta) -> tuple | None:
    """Rank 0: check and record the run (``RunLog.start``); return its checkpoint as ``(state, weights)``, or
    None when it has none yet."""
    run = {"models": meta, "train_prompts": len(tr.prompts), "world_size": tr.world.size}
    log.start(fingerprint(tr.config, teacher, student), str(tr.device), run)
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
        raise ValueError(f"{run_dir} was started on {saved} and is being resumed on {here}; its sampling "
                         f"generator belongs to {saved}: resume it there (device={saved!r}) or use a new run directory")
    if rng.get("world_size", 1) != ranks:
        raise ValueError(f"{run_dir} was run by {rng.get('world_size', 1)} process(es) and is being resumed by "
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


def train(config: TrainConfig, run_dir: str | Path, task=None, models=None, progress: bool = True,
          stop_after: int | None = None, heartbeat=None) -> pd.DataFrame:
    """Run (or resume) OPD training as ``config`` says, writing ``run_dir``; return its metrics DataFrame.

    The run directory is locked for the duration (``runlog.RunLog``); a run resumes only under the fingerprint
    it started with (config, teacher and initial student weights; ``config.HOW_ONLY`` fields may change). A
    non-finite gradient norm stops the run with a ValueError before the step is checkpointed; Ctrl-C raises
    ``Interrupted`` saying how to resume.

    Args:
        task: a task object; default ``opdlab.tasks.get_task(config.task)``.
        models: ``(teacher, student, tokenizer, meta)`` already loaded (e.g. by ``load_models``); the student
            is copied, never modified. Default: ``load_models(config, task)``.
        stop_after: stop once this many steps are done (as if interrupted); for tests and benchmarks.
        heartbeat: None, or an ``opdlab.heartbeat.Heartbeat`` that prints a plain line (run, step) at most
            every ``heartbeat.every`` seconds (the sweep's in-process runs).
    """
    from opdlab.tasks import get_task

    w = distributed.world()
    distributed.check_share(config.prompts_per_step, w)
    with RunLog(run_dir, config) if w.is_main else contextlib.nullcontext() as log:  # rank 0 writes the run
        run_dir = Path(run_dir)
        task = task if task is not None else get_task(config.task)
        teacher, student, tokenizer, meta = models if models is not None else load_models(config, task, progress)
        distributed.join(next(student.parameters()).device)
        tr = Trainer(config, task, teacher, copy.deepcopy(student), tokenizer)
        loaded = distributed.from_main(lambda: _start(tr, log, teacher, student, meta), w)
        start = saved = _resume(tr, run_dir, loaded, log)
        try:
            if start == 0 and log is not None:
                log.log({"step": 0, "kind": "eval", **evaluate(tr, 0)})
            end = config.steps if stop_after is None else min(config.steps, stop_after)
            for step in tqdm(range(start, end), desc=f"OPD {config.divergence}/{config.method}",
                             disable=not (progress and w.is_main), initial=start, total=config.steps, leave=False):
                metrics = opd_step(tr, step)
                if log is not None:
                    log.log({"step": step + 1, "kind": "train", **metrics})
                if not math.isfinite(metrics["grad_norm"]):  # the global norm: every rank stops here
                    raise ValueError(f"step {step + 1} of {run_dir}: the gradient norm is {metrics['grad_norm']}, so "
                                     f"the run stops before checkpointing it (last checkpoint: step {saved}); "
                                     f"lower lr (now {config.lr}) or set log_u_clip, in a new run directory")
                done = step + 1
                if heartbeat is not None and w.is_main:
                    heartbeat.beat(lambda: f"{run_dir.name}: step {done}/{config.steps}")
                if (done % config.eval_every == 0 or done == config.steps) and log is not None:
                    log.log({"step": done, "kind": "eval", **evaluate(tr, done)})  # the others go on sampling
                if done % config.checkpoint_every == 0 or done == config.steps:
                    rng = _rng_state(tr)
                    if log is not None:
                        log.save_checkpoint(tr.student, tokenizer, tr.optimizer, done, rng)
                    saved = done
        except KeyboardInterrupt:
            raise Interrupted(f"{run_dir} stopped; its last checkpoint is step {saved} of {config.steps}: run "
                              f"`opdlab train {run_dir}` again to resume from there") from None
    return distributed.from_main(lambda: read_metrics(run_dir), w)


def run_name(config: TrainConfig) -> str:
    """``<task>-<divergence>-<method>-s<seed>-<hash of the config>``: a new directory for new settings. The hash
    covers every field but ``config.HOW_ONLY`` (how a run is computed, not what), so those leave names as they
    were."""
    import hashlib
    digest = hashlib.sha256(config.to_json(without=HOW_ONLY).encode()).hexdigest()[:8]
    return f"{config.task}-{config.divergence.replace(':', '_')}-{config.method}-s{config.seed}-{digest}"
