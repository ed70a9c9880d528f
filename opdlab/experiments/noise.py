"""How noisy is the sampled OPD estimator on a real student? Resampled tokens at fixed contexts, against the
exact token-local gradient.

The sampled estimator of ``opd_step`` and the full-vocabulary loss follow the same expected gradient at the
contexts the student visits (docs/math.md §3): ``g = grad sum_t D_f(pi_T || pi_theta)(c_t)`` for OPD+. They
differ only in noise: the sampled one sees one token y_t ~ pi_theta(.|c_t) per context instead of the whole
vocabulary. To measure that noise alone, ``token_noise`` fixes the contexts (one rollout of the student,
teacher-forced), draws ``n_resamples`` fresh tokens y'_t ~ pi_theta(.|c_t) at every unmasked position, and
takes the gradient of ``step.loss`` (the loss ``opd_step`` applies) for each draw. Over the draws:

- the mean estimates g (unbiased for OPD+; for stop-gradient OPD it estimates something else);
- the gradient noise scale ``B_noise = n_tokens * tr(Cov[g_hat]) / |g|^2`` (McCandlish et al. 2018, "An
  empirical model of large-batch training") is the number of tokens per step at which the noise of one step
  equals its signal; a step of n tokens has expected cosine to g of about ``1 / sqrt(1 + B_noise / n)``;
- the per-weight signal-to-noise ratio ``|g_i| / sd(g_hat_i)``: under Adam every weight moves by about lr per
  step whatever its SNR, so weights with SNR << 1 take random steps of that size.

``sampled_tokens`` and ``tail_share`` describe the heavy tail of log u = log pi_T - log pi_theta at the sampled
tokens: tokens the student samples and the teacher all but rules out carry a large share of the squared advantage.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from opdlab.core import divergences, estimators, objective
from opdlab.errors import UserError
from opdlab.lm.sampling import Rollout
from opdlab.training import step as opd

__all__ = ["student_rollout", "token_noise", "noise_table", "predicted_cosine", "cosine_curves", "sampled_tokens",
           "tail_share", "step_noise"]


def student_rollout(trainer, step: int = 0) -> Rollout:
    """One batch of the student's own completions for the prompts of ``step`` (``step.sample``, as
    ``opd_step`` samples them)."""
    return opd.sample(trainer, trainer.batch(step))


def _require(spec, what: str, measures: str, **where) -> None:
    """Refuse (UserError) a spec whose method is not one of ``objective.names(**where)``."""
    allowed = objective.names(**where)
    if spec.objective.method not in allowed:
        raise UserError(f"{what} measures {measures}; method must be one of {allowed}, "
                        f"got {spec.objective.method!r}")


def _sampled_method(spec, what: str) -> None:
    _require(spec, what, "a sampled estimator", sampled=True)


def _flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                      for g, p in zip(grads, params)])


def token_noise(spec, teacher, student, rollout: Rollout, n_resamples: int = 64, seed: int = 0) -> dict:
    """Noise of the per-token sampled gradient of ``spec`` (divergence, method, baseline, clip, reduction) at
    the fixed contexts of ``rollout``; see the module doc. Returns a dict of floats:

    ``cos_mean/cos_min/cos_max`` (one draw's cosine to the full-vocabulary gradient g), ``cos_of_mean`` (the
    cosine of the mean of all draws to g: near 1 for an unbiased estimator, whatever its noise), ``norm_ratio``
    (mean |g_hat| / |g|), ``bias_rel`` (|mean g_hat - g| / |g|) and its standard error ``bias_se``,
    ``B_noise`` (tokens), ``tokens`` (unmasked tokens of the rollout), ``snr_median`` and ``snr_above_1``
    (fraction of weights whose SNR exceeds 1).
    """
    _sampled_method(spec, "token_noise")
    o = spec.objective
    if o.baseline == "loo":
        raise UserError("token_noise resamples each token independently at fixed contexts, so a leave-one-out "
                         "baseline over a prompt's samples is not defined there; use 'none' or 'expected'")
    if not (isinstance(n_resamples, int) and n_resamples >= 2):
        raise UserError(f"n_resamples must be an int >= 2, got {n_resamples!r}")
    div = divergences.get(o.divergence)
    ids_BT, mask_BT = rollout.completion_ids_BT, rollout.mask_BT
    scores = opd.score(teacher, student, rollout)  # as opd_step scores it (and samples): eval mode, no dropout
    logp_student_BTV, logp_teacher_BTV = scores.logp_student_BTV, scores.logp_teacher_BTV
    params = [p for p in student.parameters() if p.requires_grad]
    g = _flat_grad(estimators.full_vocabulary_loss(div, logp_student_BTV, logp_teacher_BTV, mask_BT,
                                                   o.reduction), params)
    probs_NV = logp_student_BTV.detach().exp().reshape(-1, logp_student_BTV.shape[-1])
    generator = torch.Generator(device=probs_NV.device).manual_seed(seed)
    total, total_sq, cosines, norms = torch.zeros_like(g), torch.zeros_like(g), [], []
    for _ in range(n_resamples):
        y_BT = torch.multinomial(probs_NV, 1, generator=generator).reshape(ids_BT.shape)
        redrawn = opd.Scores(logp_teacher_BTV.gather(-1, y_BT[..., None]).squeeze(-1), logp_teacher_BTV,
                             logp_student_BTV.gather(-1, y_BT[..., None]).squeeze(-1), logp_student_BTV, y_BT)
        loss, _ = opd.loss(o, div, redrawn, mask_BT, spec.optim.samples_per_prompt)
        g_hat = _flat_grad(loss, params)
        total += g_hat
        total_sq += g_hat ** 2
        cosines.append(float(torch.nn.functional.cosine_similarity(g_hat, g, dim=0)))
        norms.append(float(g_hat.norm()))
    K, g_sq = n_resamples, float(g.pow(2).sum())
    mean = total / K
    var = ((total_sq - K * mean ** 2) / (K - 1)).clamp_min(0.0)
    n_tokens = int(mask_BT.sum())
    snr = g.abs() / var.sqrt().clamp_min(1e-300)
    return dict(cos_mean=sum(cosines) / K, cos_min=min(cosines), cos_max=max(cosines),
                cos_of_mean=float(torch.nn.functional.cosine_similarity(mean, g, dim=0)),
                norm_ratio=sum(norms) / K / math.sqrt(g_sq), bias_rel=float((mean - g).norm()) / math.sqrt(g_sq),
                bias_se=math.sqrt(float(var.sum()) / K / g_sq), B_noise=n_tokens * float(var.sum()) / g_sq,
                tokens=n_tokens, snr_median=float(snr.median()), snr_above_1=float((snr > 1).double().mean()))


def noise_table(base, teacher, student, rollout: Rollout, variants: dict, n_resamples: int = 64,
                seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """``token_noise`` for each named variant of ``base`` (a RunSpec; each variant is a dict of flat fields to
    replace, e.g. ``{"forward_kl": {"divergence": "forward_kl"}}``), as a tidy frame with one row per variant:
    ``variant``, the fields that define the estimator, and the measurements."""
    from tqdm.auto import tqdm

    rows = []
    for name, changes in tqdm(variants.items(), desc="token noise", disable=not progress, leave=False):
        c = base.replace(**changes)
        o = c.objective
        rows.append(dict(variant=name, divergence=o.divergence, method=o.method, baseline=o.baseline,
                         log_u_clip=o.log_u_clip, reduction=o.reduction,
                         **token_noise(c, teacher, student, rollout, n_resamples, seed)))
    return pd.DataFrame(rows)


def predicted_cosine(B_noise, tokens):
    """The expected cosine of one step's gradient to the exact one, ``1 / sqrt(1 + B_noise / tokens)``."""
    return 1.0 / (1.0 + B_noise / tokens) ** 0.5


def cosine_curves(table: pd.DataFrame, tokens=None) -> pd.DataFrame:
    """``predicted_cosine`` of every variant of a ``noise_table`` over a grid of tokens per step (default 100 to
    10^6, log-spaced): rows ``variant, tokens, cosine``."""
    import numpy as np

    tokens = np.geomspace(100, 1e6, 200) if tokens is None else np.asarray(tokens, dtype=float)
    return pd.concat([pd.DataFrame(dict(variant=row.variant, tokens=tokens,
                                        cosine=predicted_cosine(row.B_noise, tokens)))
                      for row in table.itertuples()], ignore_index=True)


@torch.no_grad()
def sampled_tokens(spec, teacher, student, rollout: Rollout) -> pd.DataFrame:
    """One row per token the student sampled in ``rollout``: ``log_u`` = log pi_T - log pi_theta there and the
    ``advantage`` of ``spec`` (method, baseline, clip) that multiplies its score."""
    _sampled_method(spec, "sampled_tokens")
    mask_BT = rollout.mask_BT
    scores = opd.score(teacher, student, rollout)
    _, adv = opd.loss(spec.objective, divergences.get(spec.objective.divergence), scores, mask_BT,
                      spec.optim.samples_per_prompt)
    m = mask_BT > 0
    log_u_BT = scores.logp_teacher_BT - scores.logp_student_BT
    return pd.DataFrame({"log_u": log_u_BT[m].double().numpy(),
                         "advantage": adv.A_BT[m].double().numpy()})


def tail_share(tokens: pd.DataFrame, fractions=(0.01, 0.05, 0.25)) -> pd.DataFrame:
    """The share of the sum of squared advantages carried by the ``fractions`` of tokens with the lowest log u
    (the tokens the teacher rules out most firmly), from a ``sampled_tokens`` frame."""
    ordered = tokens.sort_values("log_u")["advantage"].pow(2).cumsum() / tokens["advantage"].pow(2).sum()
    return pd.DataFrame([dict(fraction=f, log_u_below=float(tokens["log_u"].quantile(f)),
                              A2_share=float(ordered.iloc[max(0, int(f * len(ordered)) - 1)])) for f in fractions])


def step_noise(trainer, n_batches: int = 8, step: int = 0):
    """Noise of one whole step's gradient under ``trainer.spec`` (any γ, baseline including leave-one-out,
    clip, reduction, a top-k teacher, and the full-vocabulary loss; any method that samples from the student):
    ``n_batches`` fresh rollouts of the same prompts (the prompts of ``step``), each scored and differentiated
    exactly as ``opd_step`` does, at the trainer's current student. Unlike ``token_noise`` the
    contexts are redrawn too, so this is the variance an optimizer step sees.

    Returns ``relative_variance`` = tr Cov[g_hat] / |E g_hat|^2 (scale-free, so estimators whose steps differ in
    size compare; |E g_hat|^2 is estimated without bias as |mean|^2 - tr Cov / K), ``variance`` (tr Cov),
    ``signal`` (|E g_hat|^2), ``log_relative_variance_se`` (the jackknife standard error of
    log(relative_variance) over the K batches), ``grad_norm`` (mean |g_hat|), ``tokens`` (mean sampled tokens per
    step), ``batches`` (K) and ``log_relative_variance_loo`` (the K leave-one-out values of that log, as text).
    Trainers with the same seed draw the same K batches whatever their estimator, so two variants' measurements
    are paired: compare them with ``stats.jackknife_log_ratio`` on the leave-one-out values, not as independent.

    Several estimators at once: ``trainer`` a list of trainers of one student, teacher, seed and step prompts
    (notebook 04's arms, notebook 09's variants), and a list of dicts comes back, one per trainer. Each batch is
    then drawn (with the first trainer's generator) and scored once, and differentiated once per trainer through
    the same student forward; the numbers are those of one call per trainer, since each would draw the same
    batches (tested), at the cost of one call plus a backward per further trainer. Every trainer's generator ends
    where the first's does.
    """
    trainers = list(trainer) if isinstance(trainer, (list, tuple)) else [trainer]
    if not trainers:
        raise UserError("step_noise needs a trainer or a non-empty list of them, got an empty list")
    for tr in trainers:  # the full-vocabulary step is noisy too: its contexts are the student's samples
        _require(tr.spec, "step_noise", "a step on the student's own samples", samples_from="student")
    if not (isinstance(n_batches, int) and n_batches >= 2):
        raise UserError(f"n_batches must be an int >= 2, got {n_batches!r}")
    first = trainers[0]
    _check_shared(trainers, step)
    params = [p for p in first.student.parameters() if p.requires_grad]
    grads, tokens = [[] for _ in trainers], []
    for _ in range(n_batches):
        rollout = student_rollout(first, step)
        scores = opd.score(first.teacher, first.student, rollout, first.runtime.scorer)
        for g, tr in zip(grads, trainers):
            loss, _ = opd.loss(tr.spec.objective, tr.div, scores, rollout.mask_BT, tr.spec.optim.samples_per_prompt)
            g.append(_flat_grad(loss, params))
        tokens.append(rollout.n_sampled)
    for tr in trainers[1:]:
        tr.generator.set_state(first.generator.get_state())
    out = [_step_noise_summary(torch.stack(g).double(), tokens) for g in grads]
    return out if isinstance(trainer, (list, tuple)) else out[0]


def _check_shared(trainers: list, step: int) -> None:
    """Refuse trainers that would not draw and score the same batches as the first: another student, teacher,
    tokenizer or task object, a generator in another state, other prompts at ``step``, another sampling budget,
    sampler or scorer."""
    first = trainers[0]

    def key(tr):
        return (tr.max_new_tokens, tr.runtime.sampler, tr.runtime.scorer, tr.runtime.compile_decode,
                [ex.prompt for ex in tr.batch(step)])
    for i, tr in enumerate(trainers[1:], 1):
        if (any(getattr(tr, a) is not getattr(first, a) for a in ("student", "teacher", "tokenizer", "task"))
                or not torch.equal(tr.generator.get_state(), first.generator.get_state()) or key(tr) != key(first)):
            raise UserError(f"step_noise of several trainers draws each batch once for all of them, so they must "
                            f"share the student, teacher, tokenizer and task objects, the sampling generator's state "
                            f"(the seed, before any draw), the step's prompts, the token budget and the sampler and "
                            f"scorer; trainer {i} differs from trainer 0 (measure it in a call of its own)")


def _step_noise_summary(G: torch.Tensor, tokens: list) -> dict:
    """``step_noise``'s dict from the K x P gradients ``G`` and the sampled tokens of each batch."""
    K = G.shape[0]
    rv = _relative_variance(G)
    leave_one_out = torch.tensor([math.log(_relative_variance(torch.cat([G[:i], G[i + 1:]]))[0])
                                  for i in range(K)])
    jackknife_se = float(((K - 1) / K * (leave_one_out - leave_one_out.mean()).pow(2).sum()).sqrt())
    return dict(relative_variance=rv[0], variance=rv[1], signal=rv[2], log_relative_variance_se=jackknife_se,
                grad_norm=float(G.norm(dim=1).mean()), tokens=sum(tokens) / K, batches=K,
                log_relative_variance_loo=" ".join(f"{x:.17g}" for x in leave_one_out.tolist()))


def _relative_variance(G: torch.Tensor) -> tuple[float, float, float]:
    """``(tr Cov / |E g|^2, tr Cov, |E g|^2)`` of the K x P draws ``G``, |E g|^2 estimated without bias as
    |mean|^2 - tr Cov / K (floored at 1e-300)."""
    K = G.shape[0]
    variance = float(G.var(0, unbiased=True).sum())
    signal = max(float(G.mean(0).pow(2).sum()) - variance / K, 1e-300)
    return variance / signal, variance, signal
