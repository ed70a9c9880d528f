"""Per-token advantages, baselines and the surrogate losses that turn them into gradients.

Shapes are in suffixes: B sequences, T positions, V vocabulary. A sequence's tokens y_t were sampled from the
student pi_theta at temperature 1; ``logp_student_BT`` and ``logp_teacher_BT`` are the two models'
log-probabilities of those tokens, ``mask_BT`` is 1 on tokens that count (completion tokens, not prompt,
padding or tool-result tokens).

Advantage (docs/math.md §3-§5; OPD+ paper, arXiv 2606.01039, Eq. 7 and its sequence form):

    A_t = a(u_t) - sum_{s>t, mask_s=1} gamma^(s-t) f(u_s) - b(c_t),

with a = -f for standard OPD (stop-gradient) and a = w_f = -f + u f' for OPD+. Any baseline b(c_t) that
depends only on the context keeps the estimator unbiased. ``compute_advantages`` takes b(c_t) as a tensor;
``baselined_advantages`` builds it from a name in ``BASELINES`` and is what the training loop and the toys
both call.

Reductions (docs/math.md §4). A surrogate sums A_t log pi_theta(y_t|c_t) over unmasked tokens and divides by
the number of sequences (``"sequence"``) or of unmasked tokens (``"token"``, the default ``DEFAULT_REDUCTION``).
Under ``"sequence"`` gamma = 1 is unbiased for the sequence gradient grad E[sum_t f(u_t)] and gamma = 0 for
the token-local gradient (the paper's form); ``"token"`` divides by a random count and is unbiased for
neither unless every sequence has the same length (then it is the ``"sequence"`` gradient over T).

Advantages are never z-scored per batch: rescaling by a batch statistic erases the difference between the
two methods (docs/math.md §6).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from opdlab.config.choices import BASELINES, DEFAULT_REDUCTION, METHODS, REDUCTIONS, check_baseline, check_method
from opdlab.core.divergences import Divergence, get, over_row_chunks, validate_log_probs
from opdlab.errors import UserError

__all__ = [
    "Advantages", "compute_advantages", "baselined_advantages", "token_advantages", "discounted_future_sum",
    "clip_log_u", "expected_advantage_baseline", "leave_one_out_baseline", "less_leave_one_out",
    "full_vocabulary_loss", "reduce",
    "reinforce_loss", "supervised_loss", "METHODS", "BASELINES", "REDUCTIONS", "DEFAULT_REDUCTION",
]


@dataclass(frozen=True)
class Advantages:
    """What ``compute_advantages`` returns.

    Attributes:
        A_BT: the advantages, zero where the mask is 0.
        log_u_BT: log_u after the clip (what the advantages were computed from); 0 where the mask is 0.
        n_clipped: number of unmasked tokens whose log_u the clip moved.
        n_tokens: number of unmasked tokens.
    """

    A_BT: torch.Tensor
    log_u_BT: torch.Tensor
    n_clipped: int
    n_tokens: int


def _check_pair(logp_student_BT, logp_teacher_BT, mask_BT):
    if not isinstance(logp_student_BT, torch.Tensor) or not isinstance(logp_teacher_BT, torch.Tensor):
        raise TypeError("logp_student_BT and logp_teacher_BT must be torch tensors")
    if logp_student_BT.shape != logp_teacher_BT.shape:
        raise UserError(f"shapes do not match: logp_student_BT {tuple(logp_student_BT.shape)}, "
                         f"logp_teacher_BT {tuple(logp_teacher_BT.shape)}")
    if logp_student_BT.dim() != 2:
        raise UserError(f"expected (batch, time) tensors, got {logp_student_BT.dim()} dimensions "
                         f"{tuple(logp_student_BT.shape)}")
    if logp_student_BT.numel() == 0:
        raise UserError(f"empty batch: log-probabilities of shape {tuple(logp_student_BT.shape)}; advantages need "
                         "at least one sequence and one position")
    if mask_BT is not None and not isinstance(mask_BT, torch.Tensor):
        raise UserError(f"mask_BT must be None or a torch tensor of shape {tuple(logp_student_BT.shape)}, got "
                        f"{type(mask_BT).__name__}")
    if mask_BT is not None and tuple(mask_BT.shape) != tuple(logp_student_BT.shape):
        raise UserError(f"mask_BT has shape {tuple(mask_BT.shape)}, expected {tuple(logp_student_BT.shape)}")
    _check_mask(mask_BT)
    validate_log_probs(mask_BT, logp_student_BT=logp_student_BT, logp_teacher_BT=logp_teacher_BT)


def _check_mask(mask_BT) -> None:
    """A mask holds 0 (the token does not count) and 1 (it counts), nothing else: 2 or -1 would scale A."""
    if mask_BT is not None and not bool(((mask_BT == 0) | (mask_BT == 1)).all()):
        values = sorted({float(v) for v in mask_BT.unique()[:6]})
        raise UserError(f"mask_BT must hold only 0 and 1 (or False and True), got values {values}")


def _check_gamma(gamma: float) -> float:
    try:
        gamma = float(gamma)
    except (TypeError, ValueError):
        raise TypeError(f"gamma must be a number in [0, 1], got {gamma!r}") from None
    if not 0.0 <= gamma <= 1.0:
        raise UserError(f"gamma must lie in [0, 1] (0: token-local, 1: exact sequence gradient), got {gamma}")
    return gamma


def clip_log_u(log_u_BT: torch.Tensor, max_abs: float | None, mask_BT: torch.Tensor | None = None):
    """Clamp log_u to [-max_abs, max_abs]; return the clipped tensor and how many unmasked entries moved.

    A clip is for divergences whose OPD+ weight is unbounded in u (forward KL: w = u, Pearson: w = u^2 - 1),
    where one token the student finds very unlikely but the teacher likes can dominate a batch. It trades
    a bias for variance; log how often it binds.
    """
    if max_abs is None:
        return log_u_BT, 0
    if not max_abs > 0:
        raise UserError(f"log_u clip must be a positive number (or None for no clip), got {max_abs!r}")
    clipped = log_u_BT.clamp(-max_abs, max_abs)
    moved = clipped != log_u_BT
    if mask_BT is not None:
        moved = moved & (mask_BT > 0)
    return clipped, int(moved.sum())


def discounted_future_sum(x_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """``R_t = sum_{s>t} gamma^(s-t) x_s`` along the last axis, with no Python loop over t.

    gamma = 0 gives zeros, gamma = 1 a reversed cumulative sum; otherwise a causal correlation with the
    kernel gamma^d (d >= 1), done by FFT in float64 (O(T log T); exact to rounding).
    """
    gamma = _check_gamma(gamma)
    if gamma == 0.0:
        return torch.zeros_like(x_BT)
    if gamma == 1.0:
        suffix = x_BT.flip(-1).cumsum(-1).flip(-1)  # sum_{s>=t}
        return suffix - x_BT
    T = x_BT.shape[-1]
    n = 2 * T
    x64 = x_BT.to(torch.float64)
    kernel = gamma ** torch.arange(1, T + 1, dtype=torch.float64, device=x_BT.device)  # gamma^d, d = 1..T
    # R_t = sum_{d>=1} k_d x_{t+d}: correlate by convolving the reversed sequence, then reverse back.
    xr = torch.fft.rfft(x64.flip(-1), n=n)
    kr = torch.fft.rfft(torch.cat([torch.zeros(1, dtype=torch.float64, device=x_BT.device), kernel]), n=n)
    out = torch.fft.irfft(xr * kr, n=n)[..., :T].flip(-1)
    return out.to(x_BT.dtype)


def compute_advantages(
    div: Divergence | str,
    logp_student_BT: torch.Tensor,
    logp_teacher_BT: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    method: str = "opd_plus",
    gamma: float = 0.0,
    baseline_BT: torch.Tensor | None = None,
    log_u_clip: float | None = None,
    local_BT: torch.Tensor | None = None,
) -> Advantages:
    """``A_t = a(u_t) - sum_{s>t, mask_s} gamma^(s-t) f(u_s) - b_t`` with its bookkeeping (see module doc).

    Args:
        div: a Divergence or its registry name.
        logp_student_BT, logp_teacher_BT: log-probabilities of the sampled tokens, shape (B, T).
        mask_BT: 1 where a token counts; None means every token counts.
        method: ``"opd"`` (a = -f, stop-gradient) or ``"opd_plus"`` (a = w_f).
        gamma: weight of the future terms, in [0, 1].
        baseline_BT: b(c_t), subtracted at every unmasked token; must not depend on y_t.
        log_u_clip: clamp log_u to [-log_u_clip, log_u_clip] first; None for no clip.
        local_BT: boolean, False where the token-local term a(u_t) is left out because the caller computes
            it exactly (``opdlab.core.sparse``: the sampled token lies in the teacher's support); None keeps it
            everywhere. The future terms and the baseline are subtracted either way.

    The result is computed without gradient tracking: advantages are constants of the surrogate.
    """
    div = get(div)
    check_method(method)
    gamma = _check_gamma(gamma)
    _check_pair(logp_student_BT, logp_teacher_BT, mask_BT)
    with torch.no_grad():
        mask = torch.ones_like(logp_student_BT) if mask_BT is None else mask_BT.to(logp_student_BT.dtype)
        counts = mask > 0  # masked positions never reach f: their log u is set to 0 (u = 1, f(1) = 0)
        log_u = torch.where(counts, logp_teacher_BT - logp_student_BT, 0.0)
        log_u, n_clipped = clip_log_u(log_u, log_u_clip, mask)
        A = div.advantage(log_u, method)
        if local_BT is not None:
            if local_BT.dtype != torch.bool or tuple(local_BT.shape) != tuple(A.shape):
                raise ValueError(f"local_BT must be a boolean tensor of shape {tuple(A.shape)}, got "
                                 f"{local_BT.dtype} of shape {tuple(local_BT.shape)}")
            A = torch.where(local_BT, A, 0.0)
        if gamma > 0.0:
            A = A - discounted_future_sum(div.f(log_u) * mask, gamma)
        if baseline_BT is not None:
            if tuple(baseline_BT.shape) != tuple(A.shape):
                raise UserError(f"baseline_BT has shape {tuple(baseline_BT.shape)}, expected {tuple(A.shape)}")
            n_bad = int((counts & ~torch.isfinite(baseline_BT)).sum())
            if n_bad:
                raise UserError(f"the baseline b(c_t) has {n_bad} NaN or infinite values at unmasked positions: "
                                "a baseline must be finite where tokens count, whatever the divergence; check what "
                                "it was computed from (for baseline='expected': logp_student_BTV and "
                                "logp_teacher_BTV)")
            A = A - baseline_BT
        A = torch.where(counts, A, 0.0) * mask  # a baseline at a masked context may be anything
        if not bool(torch.isfinite(A).all()):
            raise UserError(
                f"{div.name} advantages overflowed to inf/NaN (largest |log u| = "
                f"{float(log_u.abs().max()):.1f}); its OPD+ weight grows without bound in u: pass log_u_clip "
                f"(e.g. 10.0) to clamp log u, or compute in float64")
    return Advantages(A, log_u, n_clipped, int((mask > 0).sum()))


def token_advantages(div, logp_student_BT, logp_teacher_BT, mask_BT=None, method="opd_plus", gamma=0.0,
                     baseline_BT=None, log_u_clip=None) -> torch.Tensor:
    """The advantages ``A_BT`` alone; see ``compute_advantages`` for the formula and arguments."""
    return compute_advantages(div, logp_student_BT, logp_teacher_BT, mask_BT, method, gamma,
                              baseline_BT, log_u_clip).A_BT


def baselined_advantages(div, logp_student_BT, logp_teacher_BT, mask_BT=None, method="opd_plus",
                         gamma: float = 0.0, baseline: str = "none", logp_student_BTV=None, logp_teacher_BTV=None,
                         group_size: int | None = None, log_u_clip: float | None = None) -> Advantages:
    """``compute_advantages`` less the baseline b(c_t) named by ``baseline`` (one of ``BASELINES``):

    - ``"none"``: b = 0;
    - ``"expected"``: ``expected_advantage_baseline``, the exact per-context mean of the token-local advantage,
      from the full distributions ``logp_student_BTV`` and ``logp_teacher_BTV`` (needed then);
    - ``"loo"``: ``leave_one_out_baseline`` of the baseline-free advantages, within consecutive groups of
      ``group_size`` samples (the G samples of one prompt; None: the whole batch is one group).

    Both keep the estimator unbiased (docs/math.md §5). Returns ``Advantages`` like ``compute_advantages``.
    """
    check_baseline(baseline)
    expected_BT = None
    if baseline == "expected":
        if logp_student_BTV is None or logp_teacher_BTV is None:
            raise UserError("the expected baseline needs the full distributions logp_student_BTV and "
                             "logp_teacher_BTV")
        expected_BT = expected_advantage_baseline(div, logp_student_BTV, logp_teacher_BTV, method, log_u_clip)
    adv = compute_advantages(div, logp_student_BT, logp_teacher_BT, mask_BT, method, gamma, expected_BT,
                             log_u_clip)
    return less_leave_one_out(adv, mask_BT, group_size) if baseline == "loo" else adv


def less_leave_one_out(adv: Advantages, mask_BT: torch.Tensor | None = None,
                       group_size: int | None = None) -> Advantages:
    """``adv`` with ``leave_one_out_baseline`` of its own advantages subtracted (zero where the mask is 0)."""
    mask = torch.ones_like(adv.A_BT) if mask_BT is None else mask_BT.to(adv.A_BT.dtype)
    return replace(adv, A_BT=(adv.A_BT - leave_one_out_baseline(adv.A_BT, mask, group_size)) * mask)


def _check_full(logp_student_BTV, logp_teacher_BTV):
    if logp_student_BTV.shape[-1] != logp_teacher_BTV.shape[-1]:
        raise UserError(f"teacher and student have different vocabularies: {logp_teacher_BTV.shape[-1]} and "
                         f"{logp_student_BTV.shape[-1]} tokens; distillation needs a shared vocabulary")
    if logp_student_BTV.shape != logp_teacher_BTV.shape:
        raise UserError(f"shapes do not match: logp_student_BTV {tuple(logp_student_BTV.shape)}, "
                         f"logp_teacher_BTV {tuple(logp_teacher_BTV.shape)}")


def expected_advantage_baseline(div, logp_student_BTV, logp_teacher_BTV, method="opd_plus",
                                log_u_clip: float | None = None) -> torch.Tensor:
    """``b(c_t) = sum_a pi_theta(a|c_t) a(u_a)``: the exact per-context mean of the token-local advantage.

    Needs the full distributions at each visited context. It depends only on c_t, so subtracting it keeps the
    gradient unbiased; for OPD+ it is ``sum_a pi_theta w_f(u_a)``, and for reverse KL
    (w = ln u - 1) it is -KL(pi_theta || pi_T) - 1, the vOPD baseline (arXiv 2605.07865) up to a constant.
    For ``method="opd"`` it is -D_f(c_t). With ``log_u_clip`` it is the mean of the clipped advantage, the
    one it is subtracted from. Returned without gradient, shape (B, T).

    Finite for any finite log-probabilities whenever the mean itself is (``Divergence.expected``), and computed
    over chunks of rows for large vocabularies (``over_row_chunks``), so no more than one chunk's (B, T, V)
    temporaries are alive at once.
    """
    div = get(div)
    check_method(method)
    _check_full(logp_student_BTV, logp_teacher_BTV)

    def mean_advantage(ls, lt):
        return div.expected(ls, clip_log_u(lt - ls, log_u_clip)[0], method).sum(-1)

    with torch.no_grad():
        return over_row_chunks(mean_advantage, logp_student_BTV, logp_teacher_BTV)


def leave_one_out_baseline(A_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                           group_size: int | None = None) -> torch.Tensor:
    """``b_i,t = mean_{j != i} A_j,t`` over the other samples of i's group that are unmasked at t.

    Samples are grouped consecutively, ``group_size`` (G) at a time (G samples of the same prompt); None means
    the whole batch is one group. b_i is independent of sample i, so E[b_i grad log pi(y_i)] = 0 and the
    estimator stays unbiased. Where no other sample of the group is unmasked at t the baseline is 0.
    """
    B, T = A_BT.shape
    G = B if group_size is None else group_size
    if G < 2 or B % G:
        raise UserError(f"a leave-one-out baseline needs groups of at least 2 samples that divide the batch; "
                         f"got batch {B}, group size {G}")
    m = torch.ones_like(A_BT) if mask_BT is None else mask_BT.to(A_BT.dtype)
    A_PGT, m_PGT = A_BT.reshape(B // G, G, T), m.reshape(B // G, G, T)
    total, count = (A_PGT * m_PGT).sum(1, keepdim=True), m_PGT.sum(1, keepdim=True)
    others = count - m_PGT
    b_PGT = torch.where(others > 0, (total - A_PGT * m_PGT) / others.clamp_min(1.0), torch.zeros_like(A_PGT))
    return b_PGT.reshape(B, T)


def reduce(x_BT: torch.Tensor, mask_BT: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """``sum_{b,t} mask_bt x_bt / n``: n = B for ``"sequence"``, the unmasked tokens (at least 1) for ``"token"``
    (docs/math.md §4); every surrogate of this module and of ``sparse`` reduces through it. A UserError for an
    unknown reduction, an empty batch or a mask that holds other values than 0 and 1."""
    if reduction not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    if x_BT.numel() == 0:
        raise UserError(f"empty batch of shape {tuple(x_BT.shape)}: nothing to reduce")
    _check_mask(mask_BT)
    m = torch.ones_like(x_BT) if mask_BT is None else mask_BT.to(x_BT.dtype)
    if reduction == "sequence":
        return (x_BT * m).sum() / x_BT.shape[0]
    return (x_BT * m).sum() / m.sum().clamp_min(1.0)


def reinforce_loss(logp_student_BT, A_BT, mask_BT=None, reduction=DEFAULT_REDUCTION) -> torch.Tensor:
    """On-policy REINFORCE surrogate ``L = -(1/B) sum_b sum_t A_bt log pi_theta(y_bt|c_bt)`` (minimised).

    With ``reduction="sequence"`` (written above) its gradient ``-(1/B) sum A grad log pi`` is an unbiased
    estimate of grad J_f at gamma = 1 and of the token-local gradient at gamma = 0, when A is the OPD+
    advantage; ``"token"`` (the default, ``DEFAULT_REDUCTION``) divides by the number of unmasked tokens
    instead of B, a per-batch rescaling common in practice (docs/math.md §4).
    """
    if logp_student_BT.shape != A_BT.shape:
        raise UserError(f"shapes do not match: logp_student_BT {tuple(logp_student_BT.shape)}, "
                         f"A_BT {tuple(A_BT.shape)}")
    return -reduce(A_BT.detach() * logp_student_BT, mask_BT, reduction)


def supervised_loss(logp_student_BT, mask_BT=None, reduction=DEFAULT_REDUCTION) -> torch.Tensor:
    """Cross-entropy ``L = -(1/n) sum_t log pi_theta(y_t|c_t)`` of tokens sampled from the *teacher*.

    Sequence-level knowledge distillation (Kim & Rush 2016): with y ~ pi_T its expected gradient is that of
    the forward KL sum_t KL(pi_T || pi_theta)(c_t) over the teacher's contexts, an off-policy reference for
    OPD. ``n`` is the number of unmasked tokens (``"token"``) or of sequences (``"sequence"``).
    """
    return -reduce(logp_student_BT, mask_BT, reduction)


def full_vocabulary_loss(div, logp_student_BTV, logp_teacher_BTV, mask_BT=None, reduction=DEFAULT_REDUCTION):
    """Exact per-token estimator: ``L = (1/B) sum_t D_f(pi_T(.|c_t) || pi_theta(.|c_t))`` over visited contexts.

    With the full distributions at each sampled context the inner expectation over y_t is done exactly, so
    autograd gives ``sum_t -E_{a~pi_theta}[w_f(u_a) grad log pi_theta(a|c_t)]``: the token-local (gamma = 0)
    gradient with no sampling noise at the token, only over contexts. The teacher is detached. Written for
    ``reduction="sequence"``; ``"token"`` divides by the number of unmasked tokens instead of B.
    """
    div = get(div)
    _check_full(logp_student_BTV, logp_teacher_BTV)
    D_BT = div.exact(logp_teacher_BTV.detach(), logp_student_BTV)
    return reduce(D_BT, mask_BT, reduction)
