"""Cohorts: R runs of one student architecture and size, stepped in lockstep in one process.

A cohort step (``cohort_step``) does for each of R runs (``step.Trainer``s) what ``step.opd_step`` does for
one, with the model work batched across runs:

1. sampling: the R students decode together (``lm.decoder.KVDecoder`` over ``lm.block``'s stacked weights),
   each run its own prompts with its own generator, drawing the tokens it would draw alone (``sample_runs``);
   runs whose method samples from the teacher (``objective.Method.samples_from``: ``supervised_kd``) decode
   together from the teacher;
2. the teacher scores every run's samples in one forward (``teacher_logits``);
3. the students' logits with gradient come from one stacked packed forward (``student_logits``); steps 2 and 3
   run run by run instead where that is faster (``scores_together``: on CPU);
4. each run's surrogate is its own (``step.loss``: divergence, method, γ, baseline, clip); one
   backward of their sum gives each run its own gradient, since run r's loss depends on run r's parameters only
   (scored run by run, each run's backward follows its forward, so one run's activations are held at a time);
5. each run clips by its own gradient norm and steps its own AdamW at its own learning rate
   (``step.apply_gradients``), and its metrics are ``step.step_metrics`` of its own ``step.step_values``.

What each run keeps for itself: its spec, optimizer state, learning rate, generator, prompts and metrics. So a
run's tokens, gradient and metrics equal those of the same run stepped alone to float rounding, whatever the other
members are (``tests/training/test_cohort.py``). The members must share one teacher, tokenizer, task and
completion budget, and students of one architecture and size (``check``). A run whose runtime asks for the
``transformers`` sampler or the padded scorer gets it: the cohort then samples or scores run by run. Phase times
(``time_*``) are the cohort's: every member reports the wall time of the step it shared (and its own tokens over
it).
"""
from __future__ import annotations

import torch

from opdlab.core.objective import get as get_method
from opdlab.errors import UserError
from opdlab.lm import packed
from opdlab.lm.sampling import Rollout, completion_logits, gather_logp, sample as sample_completions
from opdlab.training.step import (Clock, Scores, Trainer, apply_gradients, backward, loss, sample, score, step_metrics,
                                  step_values, timed)

__all__ = ["key", "check", "scores_together", "sample_runs", "split_rollout", "merge_rollouts", "teacher_logits",
           "student_logits", "cohort_step"]


def key(spec) -> tuple:
    """What the runs of one cohort share, from their specs: the task spec (task and completion budget), the models
    spec and the completions sampled per step (``prompts_per_step x samples_per_prompt``)."""
    return spec.task, spec.models, spec.optim.prompts_per_step * spec.optim.samples_per_prompt


def check(trainers: list[Trainer]) -> None:
    """Raise ``UserError`` unless ``trainers`` can step as one cohort: at least one, one process each, and one
    teacher, tokenizer, task and completion budget (the students' shapes are checked where they are stacked)."""
    if not trainers:
        raise UserError("a cohort needs at least one run, got none")
    first = trainers[0]
    for r, tr in enumerate(trainers):
        if tr.world.size != 1:
            raise UserError(f"a cohort steps in one process; run {r} is one of {tr.world.size} ranks")
        for name in ("teacher", "tokenizer", "task"):
            if getattr(tr, name) is not getattr(first, name):
                raise UserError(f"run {r} of the cohort has another {name} than run 0; a cohort shares one {name}")
        if tr.max_new_tokens != first.max_new_tokens:
            raise UserError(f"run {r} of the cohort samples up to {tr.max_new_tokens} tokens, run 0 up to "
                            f"{first.max_new_tokens}; a cohort shares one completion budget (max_new_tokens)")
        if len(tr.batch(0)) != len(first.batch(0)):
            raise UserError(f"run {r} of the cohort samples another batch (prompts_per_step x samples_per_prompt) "
                            "than run 0; a cohort's runs sample equally many completions per step")


def split_rollout(rollout: Rollout, R: int) -> list[Rollout]:
    """The R runs of a rollout of R equal groups of rows (run-major), each trimmed to its own prompt width and
    completion length: the layout it has when sampled alone."""
    B = len(rollout.texts) // R
    out = []
    for r in range(R):
        rows = slice(r * B, (r + 1) * B)
        P = int(rollout.prompt_attention_BP[rows].sum(1).max())
        T = int(rollout.attention_BT[rows].sum(1).max())
        out.append(Rollout(rollout.prompt_ids_BP[rows, -P:], rollout.prompt_attention_BP[rows, -P:],
                           rollout.completion_ids_BT[rows, :T], rollout.mask_BT[rows, :T],
                           rollout.attention_BT[rows, :T], rollout.logp_BT[rows, :T], rollout.texts[rows]))
    return out


def merge_rollouts(rollouts: list[Rollout], pad: int) -> Rollout:
    """One rollout of all ``rollouts``' rows, prompts left-padded and completions right-padded with ``pad``."""
    P = max(r.prompt_ids_BP.shape[1] for r in rollouts)
    T = max(r.completion_ids_BT.shape[1] for r in rollouts)

    def left(x, value):
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=value)

    def right(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)
    return Rollout(torch.cat([left(r.prompt_ids_BP, pad) for r in rollouts]),
                   torch.cat([left(r.prompt_attention_BP, 0) for r in rollouts]),
                   torch.cat([right(r.completion_ids_BT, pad) for r in rollouts]),
                   torch.cat([right(r.mask_BT, 0) for r in rollouts]),
                   torch.cat([right(r.attention_BT, 0) for r in rollouts]),
                   torch.cat([right(r.logp_BT, 0) for r in rollouts]), [t for r in rollouts for t in r.texts])


@torch.no_grad()
def sample_runs(models: list, tokenizer, prompts: list[list[str]], task, max_new_tokens: int,
                generators: list[torch.Generator], compiled: bool = False) -> list[Rollout]:
    """Run r's rollout of ``prompts[r]`` from ``models[r]`` with ``generators[r]`` (temperature 1, full
    vocabulary, tools executed), all runs in one stacked decoder; each equals ``sample(models[r], ...,
    generators[r])`` alone, to float rounding of the sampler's log-probabilities."""
    if len({len(p) for p in prompts}) != 1:
        raise UserError(f"the runs of a cohort sample equally many prompts, got {[len(p) for p in prompts]}")
    rollout = sample_completions(list(models), tokenizer, [p for run in prompts for p in run], task,
                                 max_new_tokens, list(generators), greedy=False, temperature=1.0, compiled=compiled)
    return split_rollout(rollout, len(models))


def scores_together(device: torch.device) -> bool:
    """Whether a cohort scores all runs in one forward on ``device`` (``cohort_step``'s default): on CUDA, where
    one run leaves the chip idle; not on CPU, where notebook 04's products already run near the peak and R runs'
    activations at once leave the caches (``benchmarks/bench_cohort.py --scoring`` measures both ways)."""
    return device.type == "cuda"


@torch.no_grad()
def teacher_logits(teacher, rollouts: list[Rollout], pad: int) -> list[torch.Tensor]:
    """``completion_logits(teacher, rollouts[r])`` for every r, from one forward over all runs' rows."""
    logits = completion_logits(teacher, merge_rollouts(rollouts, pad))
    out, start = [], 0
    for r in rollouts:
        B, T = r.completion_ids_BT.shape
        out.append(logits[start:start + B, :T])
        start += B
    return out


def student_logits(students: list, rollouts: list[Rollout]) -> list[torch.Tensor]:
    """``completion_logits(students[r], rollouts[r])`` with gradient for every r: one stacked packed forward
    where every student supports it (``packed.supports``), else one forward per run."""
    if all(packed.supports(s) for s in students):
        return packed.stacked_completion_logits(list(students), rollouts)
    return [completion_logits(s, r) for s, r in zip(students, rollouts)]


def _sample(trainers: list[Trainer], examples: list[list]) -> list[Rollout]:
    """Step 1: every run's rollout. Runs that sample from their student decode together, as do runs that sample
    from the teacher (``objective.Method.samples_from``); a run whose runtime asks for the ``transformers``
    sampler samples alone (``step.sample``)."""
    first, rollouts = trainers[0], [None] * len(trainers)
    for r, tr in enumerate(trainers):
        tr.student.eval()
        if tr.runtime.sampler != "fast":
            rollouts[r] = sample(tr, examples[r])
    for source in ("student", "teacher"):
        group = [r for r, tr in enumerate(trainers) if rollouts[r] is None
                 and get_method(tr.spec.objective.method).samples_from == source]
        if not group:
            continue
        models = [getattr(trainers[r], source) for r in group]
        got = sample_runs(models, first.tokenizer, [[ex.prompt for ex in examples[r]] for r in group], first.task,
                          first.max_new_tokens, [trainers[r].generator for r in group],
                          compiled=any(trainers[r].runtime.compile_decode for r in group))
        for r, rollout in zip(group, got):
            rollouts[r] = rollout
    return rollouts


def _losses(trainers: list[Trainer], rollouts: list[Rollout], together: bool, clock) -> tuple[list, list]:
    """Steps 2 to 4's backward: every run's scores and ``(loss, advantages)``, and its gradient in its student's
    ``.grad``. With ``together`` (and every run scoring packed) all runs in one teacher forward, one stacked
    student forward and one backward of the summed losses (run r's depends on run r's weights only); else run by
    run (``step.score``), each backward right after its forward, so that one run's activations are held at a
    time."""
    first = trainers[0]

    def loss_of(tr, scores, rollout):
        return loss(tr.spec.objective, tr.div, scores, rollout.mask_BT, tr.spec.optim.samples_per_prompt)

    if not together or any(tr.runtime.scorer != "packed" for tr in trainers):
        scores, losses = [], []
        for tr, r in zip(trainers, rollouts):
            scores.append(score(tr.teacher, tr.student, r, tr.runtime.scorer, clock))
            losses.append(loss_of(tr, scores[-1], r))
            clock.lap("advantage")
            backward(tr, losses[-1][0], clock)
        return scores, losses
    for tr in trainers:
        tr.optimizer.zero_grad(set_to_none=True)
    lt = [gather_logp(x, r.completion_ids_BT) for x, r in
          zip(teacher_logits(first.teacher, rollouts, first.tokenizer.pad_token_id), rollouts)]
    clock.lap("teacher")
    ls = [gather_logp(x, r.completion_ids_BT) for x, r in
          zip(student_logits([tr.student for tr in trainers], rollouts), rollouts)]
    clock.lap("student_forward")
    scores = [Scores(t_BT, t_BTV, s_BT, s_BTV, r.completion_ids_BT) for (t_BT, t_BTV), (s_BT, s_BTV), r
              in zip(lt, ls, rollouts)]
    losses = [loss_of(tr, sc, r) for tr, sc, r in zip(trainers, scores, rollouts)]
    clock.lap("advantage")
    torch.stack([value for value, _ in losses]).sum().backward()
    clock.lap("student_backward")
    return scores, losses


def cohort_step(trainers: list[Trainer], step: int, score_together: bool | None = None) -> list[dict]:
    """One update of every run on the prompts of ``step`` (see the module doc); returns each run's metrics, the
    keys of ``step.opd_step``'s. ``score_together`` (None: ``scores_together(device)``) scores all runs in one
    teacher forward and one stacked student forward; False scores run by run (sampling stays stacked)."""
    check(trainers)
    first, clock = trainers[0], Clock(trainers[0].device)
    together = scores_together(first.device) if score_together is None else score_together
    examples = [tr.batch(step) for tr in trainers]
    rollouts = _sample(trainers, examples)
    clock.lap("sample")
    scores, losses = _losses(trainers, rollouts, together, clock)
    norms, lrs = zip(*[apply_gradients(tr, step) for tr in trainers])  # the rest of step 4, run by run
    clock.lap("optimizer")
    metrics = [step_metrics([step_values(tr, ex, r, terms, value, sc)], norm)
               for tr, ex, r, (value, terms), sc, norm in zip(trainers, examples, rollouts, losses, scores, norms)]
    clock.lap("bookkeeping")
    return [timed(m, lr, clock) for m, lr in zip(metrics, lrs)]
