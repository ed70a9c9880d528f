"""One OPD step as four functions that every caller shares: ``sample``, ``score``, ``loss``, ``update``.

Read top to bottom (OPD+ paper, arXiv 2606.01039, Alg. 1):

1. ``sample``: ``G`` completions per prompt from the student pi_theta at temperature 1, full vocabulary
   (``lm.sampling.sample``); tool results are forced in as environment tokens with mask 0. The supervised
   reference arm samples from the teacher instead.
2. ``score``: the teacher's ``logp_teacher_BT = log pi_T(y_t|c_t)`` under no_grad, and the student's
   ``logp_student_BT`` with gradient, from aligned logits (eval mode, as it sampled).
3. ``loss``: the objective's loss (``core.objective.loss``, the one table of what each method minimises): for
   OPD / OPD+ advantages ``A_t = a(u_t) - sum_{s>t} gamma^(s-t) f(u_s) - b(c_t)``, ``log u = logp_teacher -
   logp_student``, with a = -f (``opd``) or a = w_f = -f + u f' (``opd_plus``) and the objective's baseline,
   never z-scored, in the REINFORCE surrogate ``L = -sum A_t log pi_theta(y_t|c_t) / n`` (docs/math.md §3-§6).
   The reference methods have their own losses.
4. ``update``: backward, gradients summed over ranks (``backward``), then clip, the step's learning rate, AdamW
   step (``apply_gradients``).

``opd_step`` runs the four on a ``Trainer`` and returns the step's metrics (``step_values``, ``step_metrics``,
``timed``); the loop (``loop.train``), the noise study (``experiments.noise``), the benchmarks and the cohorts
(``cohort``) call the same functions. Which sampler and scorer run is the ``Runtime``'s choice
(``config.runtime.SAMPLERS``, ``SCORERS``), passed explicitly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from opdlab.config.choices import EVAL_SEED, VALIDATION_SEED
from opdlab.config.runtime import Runtime
from opdlab.config.spec import Objective, RunSpec
from opdlab.core import divergences
from opdlab.core.objective import Scores, Terms, get as get_method, loss as objective_loss
from opdlab.lm.sampling import (RUN_BUDGET_MARGIN, Rollout, completion_budget, completion_logits, gather_logp,
                                sample as sample_completions)
from opdlab.lm.sft import warmup_cosine_lr
from opdlab.lm.tokenizer import stop_ids
from opdlab.training import distributed

__all__ = ["Models", "Trainer", "Scores", "Clock", "sample", "score", "loss", "backward", "apply_gradients",
           "update", "step_lr", "opd_step", "step_values", "step_metrics", "timed", "max_new_tokens",
           "eval_examples", "EVAL_SEED"]


class _ModelFields(NamedTuple):
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    meta: dict


class Models(_ModelFields):
    """The models of a run: ``teacher``, ``student`` (the starting weights; ``loop.train`` copies it),
    ``tokenizer`` (shared), and ``meta`` (where each came from, recorded in run.json; a new empty dict of its
    own when not given). A named tuple, so ``teacher, student, tokenizer, meta = models`` works too."""

    __slots__ = ()

    def __new__(cls, teacher, student, tokenizer, meta: dict | None = None):
        return super().__new__(cls, teacher, student, tokenizer, {} if meta is None else meta)


def eval_examples(task, n: int, seed: int = EVAL_SEED, split: str = "test") -> list:
    """The ``n`` held-out examples a run evaluates on (``task.examples("test", n, seed)``): every run of a task,
    the sweep's reference lines and ``opdlab eval`` see the same examples in the same order. ``split="validation"``:
    ``n`` training-split problems from the stream seeded ``VALIDATION_SEED``, which no run trains on (runs draw
    their prompts from streams seeded by their own seed), disjoint from every test item by the split's hash."""
    if split == "validation":
        return task.examples("train", n, seed=VALIDATION_SEED)
    return task.examples("test", n, seed=seed)


def max_new_tokens(task) -> int:
    """A run's completion budget for ``task``: the longest of 500 training targets (tool results included) +
    ``sampling.RUN_BUDGET_MARGIN``."""
    return completion_budget(task.examples("train", 500, seed=0), RUN_BUDGET_MARGIN)


@dataclass
class Trainer:
    """What one run holds: spec, runtime, task and models (given), and what follows from them (derived): the
    divergence, the optimizer, the sampling generator, the training prompts, the held-out examples, the
    completion budget, and this process's place among the ranks (``distributed.World``; one process: rank 0
    of 1), whose generator is seeded with ``distributed.rank_seed(seed, rank)``."""

    spec: RunSpec
    task: object
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    runtime: Runtime = field(default_factory=Runtime)
    div: divergences.Divergence = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    generator: torch.Generator = field(init=False)
    prompts: list = field(init=False)
    eval_examples: list = field(init=False)
    max_new_tokens: int = field(init=False)
    world: distributed.World = field(init=False)

    def __post_init__(self):
        s, device = self.spec, next(self.student.parameters()).device
        self.world = distributed.world()
        distributed.check_share(s.optim.prompts_per_step, self.world)
        self.div = divergences.get(s.objective.divergence)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=s.optim.lr,
                                           weight_decay=s.optim.weight_decay)
        self.generator = torch.Generator(device=device).manual_seed(
            distributed.rank_seed(s.optim.seed, self.world.rank))
        self.prompts = self.task.examples("train", s.optim.steps * s.optim.prompts_per_step, seed=s.optim.seed)
        self.eval_examples = eval_examples(self.task, s.eval.eval_n, split=s.eval.eval_split)
        self.max_new_tokens = s.task.max_new_tokens or max_new_tokens(self.task)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def batch(self, step: int) -> list:
        """The training examples this process samples at ``step``, each repeated ``samples_per_prompt`` times
        (grouped): its contiguous share of the step's prompts, all of them in one process."""
        P, G = self.spec.optim.prompts_per_step, self.spec.optim.samples_per_prompt
        mine = distributed.share(self.prompts[step * P:(step + 1) * P], self.world)
        return [ex for ex in mine for _ in range(G)]


class Clock:
    """Wall-clock seconds per phase, summed in ``times`` under ``time_<phase>`` (synchronising CUDA so that
    asynchronous kernels are charged to the phase that launched them); ``lap(phase)`` charges the time since the
    last lap (or since the clock was made) to ``phase``."""

    def __init__(self, device):
        self.device, self.times, self.t = device, {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[f"time_{phase}"] = self.times.get(f"time_{phase}", 0.0) + now - self.t
        self.t = now


def _lap(clock, phase):
    if clock is not None:
        clock.lap(phase)


def sample(tr: Trainer, examples: list, generator: torch.Generator | None = None) -> Rollout:
    """Step 1: one completion per example at temperature 1, no top-k / top-p, tools executed, from the student
    (from the teacher for a method whose ``samples_from`` is the teacher: ``supervised_kd``), with
    ``tr.generator`` unless another is given."""
    tr.student.eval()
    model = tr.teacher if get_method(tr.spec.objective.method).samples_from == "teacher" else tr.student
    rt = tr.runtime
    return sample_completions(model, tr.tokenizer, [ex.prompt for ex in examples], tr.task, tr.max_new_tokens,
                              tr.generator if generator is None else generator, greedy=False, temperature=1.0,
                              fast=None if rt.sampler == "fast" else False, compiled=rt.compile_decode)


def score(teacher, student, rollout: Rollout, scorer: str = "packed", clock=None) -> Scores:
    """Step 2: the teacher's log-probabilities under no_grad and the student's with gradient, for the tokens
    of ``rollout``, by the ``scorer`` of ``config.runtime.SCORERS``; the student in eval mode, as it sampled (with
    dropout the scored policy would be another one than the sampler)."""
    fast = None if scorer == "packed" else False
    ids_BT = rollout.completion_ids_BT
    with torch.no_grad():
        logp_teacher_BT, logp_teacher_BTV = gather_logp(completion_logits(teacher, rollout, fast), ids_BT)
    _lap(clock, "teacher")
    student.eval()
    logp_student_BT, logp_student_BTV = gather_logp(completion_logits(student, rollout, fast), ids_BT)
    _lap(clock, "student_forward")
    return Scores(logp_teacher_BT, logp_teacher_BTV, logp_student_BT, logp_student_BTV, ids_BT)


def loss(objective: Objective, div, scores: Scores, mask_BT: torch.Tensor,
         samples_per_prompt: int) -> tuple[torch.Tensor, Terms]:
    """Step 3: the loss whose gradient the step follows, and the advantages behind it (None for the reference
    methods): ``core.objective.loss`` of the objective's method (with ``teacher_topk``, OPD+ from the teacher's
    top-k), the ``"loo"`` baseline over the ``samples_per_prompt`` samples of each prompt."""
    return objective_loss(objective, div, scores, mask_BT, samples_per_prompt)


def step_lr(spec: RunSpec, step: int) -> float:
    """The learning rate of ``step`` under the spec's schedule (from the index alone, so resume is exact)."""
    o = spec.optim
    return o.lr if o.lr_schedule == "constant" else warmup_cosine_lr(step, o.steps, o.lr)


def backward(tr: Trainer, loss_value: torch.Tensor, clock=None) -> None:
    """Step 4's first half: the student's gradient of ``loss_value`` (from zero), summed over the ranks."""
    tr.optimizer.zero_grad(set_to_none=True)
    loss_value.backward()
    distributed.sum_gradients(tr.student.parameters(), tr.world)
    _lap(clock, "student_backward")


def apply_gradients(tr: Trainer, step: int, clock=None) -> tuple[float, float]:
    """Step 4's second half, on the gradient in the student's ``.grad``: clip to ``grad_clip``, set the learning
    rate of ``step`` (``step_lr``), AdamW step. Returns ``(grad_norm before clipping, lr)``."""
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.student.parameters(), tr.spec.optim.grad_clip)
    lr = step_lr(tr.spec, step)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    tr.optimizer.step()
    _lap(clock, "optimizer")
    return float(grad_norm), lr


def update(tr: Trainer, loss_value: torch.Tensor, step: int, clock=None) -> tuple[float, float]:
    """Step 4: ``backward`` then ``apply_gradients``. Returns ``(grad_norm before clipping, lr)``."""
    backward(tr, loss_value, clock)
    return apply_gradients(tr, step, clock)


def opd_step(tr: Trainer, step: int) -> dict:
    """One update on the prompts of ``step`` (the four functions above); returns its metrics."""
    clock, spec = Clock(tr.device), tr.spec
    examples = tr.batch(step)
    rollout = sample(tr, examples)
    clock.lap("sample")
    scores = score(tr.teacher, tr.student, rollout, tr.runtime.scorer, clock)
    value, terms = loss(spec.objective, tr.div, scores, rollout.mask_BT, spec.optim.samples_per_prompt)
    value = distributed.global_loss(value, rollout.mask_BT, spec.objective.reduction, tr.world)
    clock.lap("advantage")
    grad_norm, lr = update(tr, value, step, clock)
    values = step_values(tr, examples, rollout, terms, value, scores)
    metrics = step_metrics(distributed.gather(values, tr.world), grad_norm)
    clock.lap("bookkeeping")
    return timed(metrics, lr, clock)


def timed(metrics: dict, lr: float, clock: Clock) -> dict:
    """A step's record: ``metrics``, its learning rate, the clock's phase times and the sampled tokens per second
    of their sum (``time_tokens_per_s``)."""
    seconds = max(sum(clock.times.values()), 1e-9)
    return {**metrics, "lr": lr, **clock.times, "time_tokens_per_s": metrics["tokens"] / seconds}


def step_values(tr: Trainer, examples: list, rollout: Rollout, terms: Terms, loss_value: torch.Tensor,
                scores: Scores) -> dict:
    """What the step's metrics are computed from, for this rank's share of the batch: its part of the loss,
    the masked exact divergence and the mask (flattened), sequence lengths, correctness, and, where the method
    has advantages (``terms`` not None), the advantages and log u at unmasked tokens with the clip counts."""
    mask_BT = rollout.mask_BT
    D_BT = tr.div.exact(scores.logp_teacher_BTV, scores.logp_student_BTV.detach())
    logp_BTV = scores.logp_student_BTV.detach()
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)  # the student's per-token entropy at the visited contexts
    ends = rollout.attention_BT.sum(1).clamp_min(1) - 1
    last_B = rollout.completion_ids_BT.gather(1, ends[:, None]).squeeze(1)
    stopped = torch.isin(last_B, torch.tensor(stop_ids(tr.tokenizer), device=last_B.device))
    truncated = (~stopped) & (rollout.attention_BT.sum(1) >= tr.max_new_tokens)
    values = dict(loss=loss_value.detach(), D=(D_BT * mask_BT).reshape(-1), mask=mask_BT.reshape(-1),
                  H=(entropy_BT * mask_BT).reshape(-1), lengths=mask_BT.sum(1), tokens=rollout.n_sampled,
                  stopped=stopped.float(), truncated=truncated.float(),
                  correct=[tr.task.score(ex, t).correct for ex, t in zip(examples, rollout.texts)])
    if terms is not None:
        values.update(A=terms.A_BT[mask_BT > 0], log_u=terms.log_u_BT[mask_BT > 0], n_clipped=terms.n_clipped,
                      n_tokens=terms.n_tokens)
    return values


def step_metrics(parts: list[dict], grad_norm: float) -> dict:
    """The step's metrics from the ranks' ``step_values`` (in rank order; one part in one process): the
    global batch's loss (the sum of the ranks' parts), mean exact divergence per unmasked token, the
    ``objective.ADVANTAGE_METRICS`` over all unmasked tokens (where the method has advantages), the student's
    mean per-token entropy, sampled tokens, mean completion length, the fractions of completions that ended at a
    stop token (``eos_rate``) and that ran into the token budget without one (``truncation_rate``), and
    accuracy."""
    def cat(key):
        return torch.cat([p[key] for p in parts])

    metrics = dict(loss=float(torch.stack([p["loss"] for p in parts]).sum()), grad_norm=grad_norm)
    if "A" in parts[0]:
        A, log_u = cat("A"), cat("log_u")
        n_clipped, n_tokens = sum(p["n_clipped"] for p in parts), sum(p["n_tokens"] for p in parts)
        metrics.update(adv_mean=float(A.mean()) if A.numel() else 0.0,
                       adv_std=float(A.std()) if A.numel() > 1 else 0.0,
                       adv_abs_max=float(A.abs().max()) if A.numel() else 0.0,
                       log_u_mean=float(log_u.mean()) if log_u.numel() else 0.0,
                       clip_fraction=n_clipped / max(n_tokens, 1))
    correct = [c for p in parts for c in p["correct"]]
    n_mask = cat("mask").sum().clamp_min(1.0)
    metrics.update(exact_divergence=float(cat("D").sum() / n_mask), entropy=float(cat("H").sum() / n_mask),
                   tokens=sum(p["tokens"] for p in parts), completion_length=float(cat("lengths").mean()),
                   eos_rate=float(cat("stopped").mean()), truncation_rate=float(cat("truncated").mean()),
                   accuracy=sum(correct) / len(correct))
    return metrics
