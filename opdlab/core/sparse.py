"""OPD+ from a top-k teacher: exact on the support S, the tail estimated from the sampled token.

A served teacher (vLLM, SGLang) returns, per position, its log-probabilities on a support S (its top-k) and at
the sampled token, not over the whole vocabulary; ``TopK`` is that payload. The token-local descent direction
(docs/math.md §2) splits over S and its tail (docs/math.md §8):

    -grad D_f(c) = sum_{a in S} pi(a) (w_f(u_a) - b) grad log pi(a)              exact: q and pi known on S
                 + E_{y~pi}[ 1[y not in S] (w_f(u_y) - b) grad log pi(y) ]       one sample: the teacher scores y

for any b that does not depend on y (subtracting b everywhere removes b grad sum_a pi(a) = 0). ``"tail"``
takes b = w_f(u_bar) at the tail's aggregate ratio ``u_bar = (1 - Q_S) / (1 - Pi_S)`` (Q_S, Pi_S: the
teacher's and student's mass on S); ``"none"`` takes b = 0; ``"loo"`` subtracts the leave-one-out mean of the
sampled advantages instead (it multiplies grad log pi(y) for every y, so needs no correction on S). The
``"expected"`` baseline needs the teacher everywhere and is refused. Over a sequence the future terms
``- sum_{s>t} gamma^(s-t) f(u_s)`` multiply grad log pi(y_t) as in ``estimators.compute_advantages``.

Limits: S empty and no baseline is the sampled OPD+ surrogate (``estimators.reinforce_loss`` of
``baselined_advantages``); S = the whole vocabulary is ``estimators.full_vocabulary_loss``'s gradient. For
reverse KL (w = ln u - 1) the tail-baseline form is ResOPD (arXiv 2610.04882). S must not depend on the
sampled token: the teacher's top-k, or the student's, computed before sampling or independently of it.

``PEER_FORMS`` holds the peers' sparse losses written for any f (each a D_BT to minimise, differentiable in the
student): renormalised on S (NeMo-RL, TRL), S plus one tail bucket (TRL's server trainers), S with no tail term
(verl ``forward_kl_topk``). Their gradients are exact for a coarser or truncated divergence, not for D_f. With
the tail baseline, this estimator's exact part *is* the tail bucket's gradient (for every f), and the sample adds
what the bucket drops, ``1[y not in S] (w_f(u_y) - w_f(u_bar)) grad log pi(y)`` (docs/math.md §8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opdlab.config.choices import DEFAULT_REDUCTION, SPARSE_BASELINES
from opdlab.core.divergences import Divergence, get, over_row_chunks, validate_log_probs
from opdlab.core.estimators import clip_log_u, compute_advantages, less_leave_one_out, reduce
from opdlab.errors import UserError

__all__ = ["TopK", "topk_payload", "payload_on_support", "SparseTerms", "sparse_terms", "sparse_surrogate",
           "sparse_loss", "renormalised_divergence", "tail_bucket_divergence", "no_tail_divergence",
           "PEER_FORMS", "SPARSE_BASELINES"]


@dataclass(frozen=True)
class TopK:
    """What a top-k teacher sends for B sequences of T positions: its log-probabilities on a support and at
    the sampled token.

    Attributes:
        ids_BTK: the support S at each position, K distinct token ids (long). K may be 0.
        logp_teacher_BTK: the teacher's log-probabilities of those ids.
        logp_teacher_sampled_BT: the teacher's log-probability of the sampled token y_t (whether in S or not).
    """

    ids_BTK: torch.Tensor
    logp_teacher_BTK: torch.Tensor
    logp_teacher_sampled_BT: torch.Tensor

    def __post_init__(self):
        ids, logp, sampled = self.ids_BTK, self.logp_teacher_BTK, self.logp_teacher_sampled_BT
        if ids.dim() != 3 or ids.shape != logp.shape or sampled.shape != ids.shape[:2]:
            raise UserError(f"a top-k payload needs ids_BTK and logp_teacher_BTK of one shape (B, T, K) and "
                            f"logp_teacher_sampled_BT of shape (B, T); got {tuple(ids.shape)}, {tuple(logp.shape)} "
                            f"and {tuple(sampled.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise UserError(f"ids_BTK must hold integer token ids, got dtype {ids.dtype}")
        if ids.shape[-1] > 1 and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
            raise UserError("ids_BTK repeats a token id within a position; a support is a set of distinct ids")
        validate_log_probs(logp_teacher_BTK=logp, logp_teacher_sampled_BT=sampled)

    @property
    def k(self) -> int:
        """|S|, the size of the support."""
        return self.ids_BTK.shape[-1]


def payload_on_support(logits_teacher_BTV: torch.Tensor, tokens_BT: torch.Tensor, ids_BTK: torch.Tensor) -> TopK:
    """The payload of a teacher that scores a given support ``ids_BTK`` (e.g. the student's top-k) and the
    sampled tokens: ``logits - logsumexp(logits)`` gathered there, with no (B, T, V) log-probability tensor
    made. Half-precision logits give float32 log-probabilities."""
    with torch.no_grad():
        logits = logits_teacher_BTV.detach()
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        log_Z_BT1 = torch.logsumexp(logits.to(dtype), -1, keepdim=True)

        def logp_at(ids):
            return (logits.gather(-1, ids.to(torch.int64)).to(dtype) - log_Z_BT1).clamp_max(0.0)

        return TopK(ids_BTK, logp_at(ids_BTK), logp_at(tokens_BT[..., None])[..., 0])


def topk_payload(logits_teacher_BTV: torch.Tensor, tokens_BT: torch.Tensor, k: int) -> TopK:
    """What a served teacher would send: its top-``k`` ids and log-probabilities at each position, and the
    log-probability of the sampled token. ``k`` = 0 sends the sampled token only; ``k`` = V the whole
    distribution. Built from the local teacher's logits so that only this payload reaches ``sparse_loss``."""
    V = logits_teacher_BTV.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= V:
        raise UserError(f"teacher top-k must be an integer in [0, {V}] (the vocabulary size), got {k!r}")
    if tokens_BT.shape != logits_teacher_BTV.shape[:2]:
        raise UserError(f"tokens_BT has shape {tuple(tokens_BT.shape)}, expected "
                        f"{tuple(logits_teacher_BTV.shape[:2])} (the teacher logits' first two axes)")
    ids_BTK = logits_teacher_BTV.detach().topk(k, dim=-1, sorted=False).indices
    return payload_on_support(logits_teacher_BTV, tokens_BT, ids_BTK)


def tail_log_ratio(logp_student_BTV: torch.Tensor, payload: TopK) -> torch.Tensor:
    """``log u_bar = log(1 - Q_S) - log(1 - Pi_S)``, the tail's aggregate log-ratio, without gradient.

    The student's tail mass is summed over the tokens outside S (over row chunks, so it is exact when tiny and
    exactly 0 when S is the whole vocabulary); the teacher's is 1 - Q_S from the payload. Where either is 0
    (no tail, or a teacher whose S holds all its mass to rounding) log u_bar is set to 0: any value that does
    not depend on the sampled token keeps the estimator unbiased, and there the tail's weight is 0 or its
    samples carry u = 0 anyway.
    """
    with torch.no_grad():
        def tail(ls_V, ids_K):
            return ls_V.scatter(-1, ids_K, -math.inf).logsumexp(-1)

        ids = payload.ids_BTK.to(torch.int64)
        log_tail_student = over_row_chunks(tail, logp_student_BTV.detach(), ids) if payload.k else \
            logp_student_BTV.detach().logsumexp(-1)
        log_Q = payload.logp_teacher_BTK.logsumexp(-1).to(log_tail_student.dtype)
        log_tail_teacher = torch.log(-torch.expm1(log_Q.clamp_max(0.0)))  # -inf where Q_S rounds to 1
        log_u_bar = log_tail_teacher - log_tail_student
        return torch.where(torch.isfinite(log_u_bar), log_u_bar, 0.0)


def _check(logp_student_BTV, tokens_BT, payload, baseline):
    if not isinstance(payload, TopK):
        raise TypeError(f"payload must be an opdlab.core.sparse.TopK, got {type(payload).__name__}")
    if baseline == "expected":
        raise UserError("baseline 'expected' needs the teacher's log-probability of every token (sum_a pi(a) "
                        "w_f(u_a)), and a top-k teacher sends only its support and the sampled token; "
                        f"allowed here: {', '.join(SPARSE_BASELINES)} ('tail' is w_f at the tail's ratio u_bar)")
    if baseline not in SPARSE_BASELINES:
        raise UserError(f"unknown baseline {baseline!r} for a top-k teacher; allowed: {', '.join(SPARSE_BASELINES)}")
    if logp_student_BTV.dim() != 3:
        raise UserError(f"logp_student_BTV must be (batch, time, vocabulary), got shape "
                        f"{tuple(logp_student_BTV.shape)}")
    B, T, V = logp_student_BTV.shape
    if tuple(tokens_BT.shape) != (B, T) or payload.ids_BTK.shape[:2] != (B, T):
        raise UserError(f"logp_student_BTV {(B, T, V)}, tokens_BT {tuple(tokens_BT.shape)} and the payload "
                        f"{tuple(payload.ids_BTK.shape)} must agree on (B, T)")
    if payload.k > V or bool(((payload.ids_BTK < 0) | (payload.ids_BTK >= V)).any()):
        raise UserError(f"support ids must be distinct token ids in [0, {V}) (the student's vocabulary), got k = "
                        f"{payload.k} and ids in [{int(payload.ids_BTK.min())}, {int(payload.ids_BTK.max())}]")
    if bool(((tokens_BT < 0) | (tokens_BT >= V)).any()):
        raise UserError(f"sampled tokens must lie in [0, {V}), got ids in [{int(tokens_BT.min())}, "
                        f"{int(tokens_BT.max())}]")


@dataclass(frozen=True)
class SparseTerms:
    """The pieces of the sparse estimator at each position (all without gradient).

    Attributes:
        weight_BTK: ``pi(a) (w_f(u_a) - b)`` on S, zero where the mask is 0: the exact part multiplies
            grad log pi(a) by it.
        A_BT: the sampled advantage ``1[y not in S] (w_f(u_y) - b) - sum_{s>t} gamma^(s-t) f(u_s)`` (less the
            leave-one-out mean with ``"loo"``), multiplying grad log pi(y_t).
        in_support_BT: whether y_t lies in S.
        baseline_BT: b (0 unless ``"tail"``).
        log_u_BT: log u of the sampled tokens after the clip, 0 where the mask is 0 (as ``Advantages.log_u_BT``).
        n_clipped: unmasked sampled tokens and support entries whose log u the clip moved.
        n_tokens: unmasked positions.
    """

    weight_BTK: torch.Tensor
    A_BT: torch.Tensor
    in_support_BT: torch.Tensor
    baseline_BT: torch.Tensor
    log_u_BT: torch.Tensor
    n_clipped: int
    n_tokens: int

    @property
    def clip_fraction(self) -> float:
        """Fraction of the unmasked entries (sampled tokens and support entries) at which the log u clip binds."""
        return self.n_clipped / max(self.n_tokens * (1 + self.weight_BTK.shape[-1]), 1)


def sparse_terms(div: Divergence | str, logp_student_BTV: torch.Tensor, tokens_BT: torch.Tensor, payload: TopK,
                 mask_BT: torch.Tensor | None = None, gamma: float = 0.0, baseline: str = "none",
                 group_size: int | None = None, log_u_clip: float | None = None) -> SparseTerms:
    """The exact weights on S and the sampled advantages of the module's estimator (see the module doc).

    Args:
        div: a Divergence or its registry name (any f).
        logp_student_BTV: the student's log-probabilities over the vocabulary at each position.
        tokens_BT: the sampled tokens y_t (from the student at temperature 1).
        payload: the teacher's ``TopK``; its support must not depend on y_t.
        mask_BT, gamma, log_u_clip: as ``estimators.compute_advantages`` (the clip also applies on S and to
            log u_bar).
        baseline: ``"none"``, ``"tail"`` or ``"loo"`` (within consecutive groups of ``group_size``).
    """
    div = get(div)
    _check(logp_student_BTV, tokens_BT, payload, baseline)
    with torch.no_grad():
        ls_BTV = logp_student_BTV.detach()
        ids = payload.ids_BTK.to(torch.int64)
        ls_BTK = ls_BTV.gather(-1, ids)
        lq_BTK = payload.logp_teacher_BTK.to(ls_BTV.dtype)
        validate_log_probs(logp_student_support_BTK=ls_BTK)
        mask = torch.ones(tokens_BT.shape, dtype=ls_BTV.dtype, device=ls_BTV.device) if mask_BT is None \
            else mask_BT.to(ls_BTV.dtype)
        in_S = (ids == tokens_BT[..., None]).any(-1)
        b = torch.zeros_like(mask)
        if baseline == "tail":
            log_u_bar = clip_log_u(tail_log_ratio(ls_BTV, payload), log_u_clip)[0]
            b = div.opd_plus_advantage(log_u_bar)
        adv = compute_advantages(div, ls_BTV.gather(-1, tokens_BT[..., None])[..., 0],
                                 payload.logp_teacher_sampled_BT.to(ls_BTV.dtype), mask_BT, "opd_plus", gamma,
                                 torch.where(in_S, 0.0, b), log_u_clip, local_BT=~in_S)
        if baseline == "loo":
            adv = less_leave_one_out(adv, mask_BT, group_size)
        log_u_BTK, n_clipped_S = clip_log_u(lq_BTK - ls_BTK, log_u_clip, mask[..., None].expand_as(ls_BTK))
        weight = div.expected(ls_BTK, log_u_BTK, "opd_plus") - ls_BTK.exp() * b[..., None]
        weight = torch.where(mask[..., None] > 0, weight, 0.0)
        if not bool(torch.isfinite(weight).all()):
            raise UserError(f"{div.name}'s weights on the support overflowed (largest |log u| = "
                            f"{float(log_u_BTK.abs().max()):.1f}); pass log_u_clip (e.g. 10.0), or compute in float64")
    return SparseTerms(weight, adv.A_BT, in_S, b, adv.log_u_BT, adv.n_clipped + n_clipped_S, adv.n_tokens)


def sparse_surrogate(div: Divergence | str, logp_student_BTV: torch.Tensor, tokens_BT: torch.Tensor, payload: TopK,
                     mask_BT: torch.Tensor | None = None, gamma: float = 0.0, baseline: str = "none",
                     group_size: int | None = None, log_u_clip: float | None = None,
                     reduction: str = DEFAULT_REDUCTION) -> tuple[torch.Tensor, SparseTerms]:
    """Surrogate ``L = -(1/n) sum_{b,t} mask [sum_{a in S} weight_a log pi(a) + A_t log pi(y_t)]`` (minimised),
    whose gradient is the module's estimator, and the ``SparseTerms`` behind it (for a step's metrics). n is B
    (``"sequence"``) or the unmasked tokens (``"token"``), as in ``estimators.reinforce_loss``. Differentiable
    through ``logp_student_BTV`` only (two gathers: S and y_t); arguments as ``sparse_terms``. Its value is
    not D_f: only its gradient means something.
    """
    terms = sparse_terms(div, logp_student_BTV, tokens_BT, payload, mask_BT, gamma, baseline, group_size,
                         log_u_clip)
    ids = payload.ids_BTK.to(torch.int64)
    exact_BT = (terms.weight_BTK * logp_student_BTV.gather(-1, ids)).sum(-1)
    sampled_BT = terms.A_BT * logp_student_BTV.gather(-1, tokens_BT[..., None].to(torch.int64))[..., 0]
    return -reduce(exact_BT + sampled_BT, mask_BT, reduction), terms


def sparse_loss(div: Divergence | str, logp_student_BTV: torch.Tensor, tokens_BT: torch.Tensor, payload: TopK,
                mask_BT: torch.Tensor | None = None, gamma: float = 0.0, baseline: str = "none",
                group_size: int | None = None, log_u_clip: float | None = None,
                reduction: str = DEFAULT_REDUCTION) -> torch.Tensor:
    """The loss of ``sparse_surrogate`` alone."""
    return sparse_surrogate(div, logp_student_BTV, tokens_BT, payload, mask_BT, gamma, baseline, group_size,
                            log_u_clip, reduction)[0]


# ---------------------------------------------------------------------------------------------------------
# The peers' sparse forms, for any f: exact divergences of a coarser or truncated pair of distributions.


def _on_support(logp_student_BTV, payload):
    return logp_student_BTV.gather(-1, payload.ids_BTK.to(torch.int64)), payload.logp_teacher_BTK.detach()


def renormalised_divergence(div, logp_student_BTV: torch.Tensor, payload: TopK) -> torch.Tensor:
    """``D_f(q_S / Q_S || pi_S / Pi_S)``: both sides renormalised on S (NeMo-RL's default, TRL's option)."""
    ls, lq = _on_support(logp_student_BTV, payload)
    return get(div).exact(lq - lq.logsumexp(-1, keepdim=True), ls - ls.logsumexp(-1, keepdim=True))


def _log1m_mass(logp_K: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum exp(logp))`` over the last axis (kept as a last axis of size 1), floored at the dtype's
    smallest normal number so that a bucket whose mass rounds to 0 stays a finite log-probability."""
    tail = -torch.expm1(logp_K.logsumexp(-1, keepdim=True).clamp_max(0.0))
    return torch.log(tail.clamp_min(torch.finfo(logp_K.dtype).tiny))


def tail_bucket_divergence(div, logp_student_BTV: torch.Tensor, payload: TopK) -> torch.Tensor:
    """``D_f`` over the partition S + {tail}: S's tokens and one bucket holding 1 - Q_S and 1 - Pi_S (TRL's
    server and async trainers)."""
    ls, lq = _on_support(logp_student_BTV, payload)
    return get(div).exact(torch.cat([lq, _log1m_mass(lq)], -1), torch.cat([ls, _log1m_mass(ls)], -1))


def no_tail_divergence(div, logp_student_BTV: torch.Tensor, payload: TopK) -> torch.Tensor:
    """``sum_{a in S} pi(a) f(u_a)``: D_f's terms on S with no tail term (verl's ``forward_kl_topk`` for
    f = u ln u, whose optimum is the teacher renormalised on S)."""
    ls, lq = _on_support(logp_student_BTV, payload)
    return get(div).expected(ls, lq - ls, "f").sum(-1)


PEER_FORMS = {"renormalised": renormalised_divergence, "tail_bucket": tail_bucket_divergence,
              "no_tail": no_tail_divergence}
"""The peers' sparse losses by name: each maps (div, logp_student_BTV, payload) to a D_BT to minimise."""
