"""The registry of f-divergences and the two per-token advantages built on them.

Convention (docs/math.md §1): at a sampled token the ratio is teacher over student,
``u = pi_T(y|c) / pi_theta(y|c)``, always carried in log space as ``log_u = logp_teacher - logp_student``.
The objective (minimised) is ``J_f = E_{y~pi_theta}[ sum_t f(u_t) ]`` with f convex and f(1) = 0, so that
per context ``E_{a~pi_theta}[f(u_a)] = D_f(pi_T || pi_theta)`` in the f-divergence sense
``sum_a pi_theta(a) f(pi_T(a) / pi_theta(a))``.

The exact per-context gradient is (docs/math.md §2; OPD+ paper, arXiv 2606.01039, Eq. 5)

    grad E_{a~pi_theta}[f(u_a)] = E_{a~pi_theta}[ (f(u) - u f'(u)) grad log pi_theta(a) ],

so the advantage to maximise is ``w_f(u) = -f(u) + u f'(u)`` (OPD+), while standard OPD puts a stop-gradient
on the reward and uses ``-f(u)``. Their difference, the stop-gradient error ``u f'(u)``, is a constant
(and so vanishes in expectation) only for f = -c log u, i.e. reverse KL.

Each f is stored exactly as in the table of docs/math.md §3, not "self-normalised": adding c(u - 1) to f leaves D_f
and w_f unchanged but changes the stop-gradient advantage, so the registry's f *defines* standard OPD.

    >>> from opdlab.core.divergences import get
    >>> div = get("forward_kl")
    >>> div.opd_plus_advantage(torch.tensor([0.0]))   # w_f(u) = u, at u = 1
    tensor([1.])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from opdlab.config.choices import DIVERGENCE_FAMILIES, FIXED_DIVERGENCES, parse_divergence
from opdlab.errors import UserError

__all__ = ["Divergence", "get", "names", "validate_log_probs"]

Fn = Callable[[torch.Tensor], torch.Tensor]
Fn2 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHUNK_ELEMENTS = 1 << 22
"""Full-vocabulary sums over more elements than this run over row chunks of about this many elements, so that
their temporaries never hold several (B, T, V) tensors at once (a 49k vocabulary makes each one large)."""


@dataclass(frozen=True)
class Divergence:
    """One f-divergence. All methods act elementwise on ``log_u`` (a tensor), with u = exp(log_u).

    Attributes:
        name: canonical registry name, e.g. ``"forward_kl"`` or ``"gjsd:0.1"``.
        label: a human-readable name for plots and tables.
        f_expr: f(u) written out, for tables.
        w_expr: the OPD+ advantage w_f(u) written out, for tables.
        parameter: the family parameter (GJSD weight on the teacher, Amari alpha), or None.
        bounded_weight: False when w_f(u) grows without bound as u -> infinity (forward KL, Pearson),
            the divergences for which a clip on log_u is worth having.
        weighted: ``(p f(u), p w_f(u))`` as functions of ``(log p, log u)``, written so that they stay finite
            when u overflows but p u does not (docs/math.md §7); used where the plain product is not finite.
    """

    name: str
    label: str
    f_expr: str
    w_expr: str
    _f: Fn
    _f_prime: Fn
    _w: Fn
    parameter: float | None = None
    bounded_weight: bool = True
    weighted: tuple[Fn2, Fn2] | None = None

    def f(self, log_u: torch.Tensor) -> torch.Tensor:
        """f(u) at u = exp(log_u)."""
        return self._f(_tensor(log_u))

    def f_prime(self, log_u: torch.Tensor) -> torch.Tensor:
        """f'(u) at u = exp(log_u) (a subgradient where f has a kink: total variation at u = 1 gives 0)."""
        return self._f_prime(_tensor(log_u))

    def opd_advantage(self, log_u: torch.Tensor) -> torch.Tensor:
        """Standard (stop-gradient) OPD advantage ``-f(u)``: the per-token reward of the RL formulation."""
        return -self.f(log_u)

    def opd_plus_advantage(self, log_u: torch.Tensor) -> torch.Tensor:
        """OPD+ advantage ``w_f(u) = -f(u) + u f'(u)`` (paper Eq. 7), in a closed form that is stable in log_u."""
        return self._w(_tensor(log_u))

    def stop_gradient_error(self, log_u: torch.Tensor) -> torch.Tensor:
        """``u f'(u) = w_f(u) - (-f(u))``: what the stop-gradient drops. Constant only for reverse KL."""
        return self.opd_plus_advantage(log_u) - self.opd_advantage(log_u)

    def advantage(self, log_u: torch.Tensor, method: str) -> torch.Tensor:
        """The advantage of ``method``: ``"opd"`` gives -f(u), ``"opd_plus"`` gives w_f(u)."""
        if method == "opd":
            return self.opd_advantage(log_u)
        if method == "opd_plus":
            return self.opd_plus_advantage(log_u)
        raise UserError(f"unknown method {method!r}; allowed: 'opd' (stop-gradient, -f(u)) or 'opd_plus' (w_f(u))")

    def exact(self, logp_teacher: torch.Tensor, logp_student: torch.Tensor) -> torch.Tensor:
        """``D_f = sum_a pi_student(a) f(pi_teacher(a) / pi_student(a))`` over the last axis.

        Both arguments are log-probabilities over the same vocabulary (last axis). Differentiable in both,
        so autograd through ``logp_student`` gives the exact per-context gradient. For ``reverse_kl`` this
        is KL(student || teacher); for ``forward_kl`` it is KL(teacher || student).
        """
        logp_teacher, logp_student = _tensor(logp_teacher), _tensor(logp_student)
        validate_log_probs(logp_teacher=logp_teacher, logp_student=logp_student)
        if logp_teacher.shape[-1] != logp_student.shape[-1]:
            raise UserError(
                f"teacher and student have different vocabularies: last axes {logp_teacher.shape[-1]} and "
                f"{logp_student.shape[-1]}; exact D_f needs both distributions over the same tokens"
            )
        if logp_teacher.shape != logp_student.shape:
            raise UserError(f"shapes do not match: logp_teacher {tuple(logp_teacher.shape)}, "
                             f"logp_student {tuple(logp_student.shape)}")
        return over_row_chunks(lambda lt, ls: self.expected(ls, lt - ls, "f").sum(-1), logp_teacher, logp_student)

    def expected(self, logp_student: torch.Tensor, log_u: torch.Tensor, what: str) -> torch.Tensor:
        """The terms ``p a(u)`` of an expectation ``sum_a p(a) a(u_a)`` under ``p = exp(logp_student)``, elementwise,
        for ``what`` = ``"f"`` (f(u)), ``"opd"`` (-f(u)) or ``"opd_plus"`` (w_f(u)).

        The plain product ``exp(logp_student) * a(u)`` is used where it is finite (so results on ordinary inputs
        are those of the plain formula, bit for bit); where it is not (u overflows while p underflows: a token
        the student puts far below the teacher, docs/math.md §7) the perspective form ``weighted`` takes over,
        which is finite whenever p a(u) itself is representable. ``log_u`` may be clipped: the forms never
        assume ``log_u = logp_teacher - logp_student``.
        """
        if what not in ("f", "opd", "opd_plus"):
            raise UserError(f"what must be 'f', 'opd' or 'opd_plus', got {what!r}")
        plain = self.f if what != "opd_plus" else self.opd_plus_advantage
        sign = -1.0 if what == "opd" else 1.0

        def product(ls, L):
            term = ls.exp() * plain(L)
            return -term if what == "opd" else term

        term = product(logp_student, log_u)
        finite = torch.isfinite(term.detach())
        if bool(finite.all()) or self.weighted is None:
            return term
        # differentiable in both branches: each branch sees only the inputs it is finite on
        safe_s, safe_L = torch.where(finite, logp_student, 0.0), torch.where(finite, log_u, 0.0)
        pf, pw = self.weighted
        stable = (pw if what == "opd_plus" else pf)(torch.where(finite, 0.0, logp_student),
                                                    torch.where(finite, 0.0, log_u))
        return torch.where(finite, product(safe_s, safe_L), sign * stable)

    def __repr__(self) -> str:  # the callables make the default repr unreadable
        return f"Divergence({self.name!r})"


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x, dtype=torch.get_default_dtype())


LOGP_TOLERANCE = 1e-6
"""How far above 0 a log-probability may lie (rounding); ``log_softmax`` itself never exceeds 0."""


def validate_log_probs(mask: torch.Tensor | None = None, **tensors: torch.Tensor) -> None:
    """Raise a UserError naming the argument if any log-probability is NaN, +inf or -inf, or above 0 by more
    than ``LOGP_TOLERANCE`` (a probability above 1: logits, or a log-ratio, passed by mistake). With ``mask``
    (1 where a token counts), non-finite entries only at masked positions get their own message: they are
    refused too, since a surrogate multiplies them by 0 and 0 x NaN is NaN, and the remedy is to fill them."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not torch.is_floating_point(t):
            raise TypeError(f"{name} must be a floating-point tensor of log-probabilities, got dtype {t.dtype}")
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            counted = bad if mask is None else bad & (mask > 0)
            if not bool(counted.any()):
                raise UserError(
                    f"{name} has {n_nan} NaN and {n_inf} infinite entries, all at masked positions (mask 0): "
                    "the advantage ignores them, but a surrogate multiplies them by 0 and 0 x NaN is NaN; fill "
                    f"masked positions with 0 (torch.where(mask_BT > 0, {name}, 0.0))")
            n_nan = int((torch.isnan(t) & counted).sum())
            why = ("a NaN log-probability comes from the model that computed it (weights or logits that are not "
                   "finite), not from sampling: check that model, e.g. a checkpoint loaded without a digest, or "
                   "training that diverged" if n_nan else
                   "-inf is a token given probability 0 (the sampler itself cannot have sampled one): clamp them "
                   "(e.g. clamp_min(-1e4)), or, if those positions should not count, set their mask to 0 and "
                   "fill them with 0")
            raise UserError(f"{name} has {n_nan} NaN and {int((torch.isinf(t) & counted).sum())} infinite entries "
                            f"at positions that count; log-probabilities must be finite there: {why}")
        above = t > LOGP_TOLERANCE
        if bool(above.any()):
            raise UserError(
                f"{name} has {int(above.sum())} entries above 0 (largest {float(t.max()):.4g}); log-probabilities "
                f"must be <= 0 (to within {LOGP_TOLERANCE:g}): were logits or log-ratios passed instead?"
            )


def over_row_chunks(fn, *tensors: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``fn(*tensors)`` for a reduction over the last axis, computed over chunks of rows (all axes but the last
    flattened) of at most about ``chunk_elements`` elements of the first tensor, so its temporaries stay small.
    The tensors share all axes but the last. Each row's sum is the same computation either way; tensors up to
    ``chunk_elements`` go to ``fn`` whole."""
    first = tensors[0]
    if first.numel() <= chunk_elements or first.dim() < 2:
        return fn(*tensors)
    V = first.shape[-1]
    rows = max(1, chunk_elements // max(V, 1))
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]  # rows align; last axes may differ (ids on a support)
    out = torch.cat([fn(*(t[i:i + rows] for t in flat)) for i in range(0, flat[0].shape[0], rows)])
    return out.reshape(first.shape[:-1])


# ---------------------------------------------------------------------------------------------------------
# The closed forms. Each takes log_u (L) and returns a tensor of the same shape.


def _expm1_over(a: float, L: torch.Tensor) -> torch.Tensor:
    """(u^a - 1) / a = expm1(a L) / a, with its limit L at a = 0. Where |a L| < 1e-4 it is
    L (1 + x/2 + x^2/6 + x^3/24), x = a L (error below x^4 / 120 < 1e-18, relative): a L may underflow to 0
    when a and L are both tiny, and expm1(0) / a would then be 0 instead of L."""
    if a == 0.0:
        return L.clone()
    x = a * L
    near = x.abs() < 1e-4
    xs = torch.where(near, x, 0.0)
    return torch.where(near, L * (1.0 + xs / 2.0 * (1.0 + xs / 3.0 * (1.0 + xs / 4.0))),
                       torch.expm1(torch.where(near, 1.0, x)) / a)


def _log_abs_expm1(x: torch.Tensor) -> torch.Tensor:
    """log|e^x - 1|, stable for large |x| (x + log(1 - e^-x) for x > 0); -inf at x = 0."""
    return x.clamp_min(0.0) + torch.log(-torch.expm1(-x.abs()))


def _p_expm1(log_p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p (e^x - 1) = sign(x) exp(log p + log|e^x - 1|): finite whenever the product is."""
    return torch.sign(x) * torch.exp(log_p + _log_abs_expm1(x))


def _p_expm1_over(log_p: torch.Tensor, a: float, L: torch.Tensor) -> torch.Tensor:
    """p (u^a - 1) / a, with its limit p ln u at a = 0."""
    return log_p.exp() * L if a == 0.0 else _p_expm1(log_p, a * L) / a


def _p_squared_expm1(log_p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p (e^x - 1)^2 = exp(log p + 2 log|e^x - 1|)."""
    return torch.exp(log_p + 2.0 * _log_abs_expm1(x))


SERIES_TERMS = 20
"""Terms of the power series used near u = 1 (|argument| < ``SERIES_RADIUS``): the first one left out is below
1e-22 of the sum, far under float64 rounding."""
SERIES_RADIUS = 0.5


def _series(coefficients: list[float], y: torch.Tensor) -> torch.Tensor:
    """sum_k c_k y^k for k = 2, 3, ... (Horner), ``coefficients`` from c_2 on."""
    out = torch.zeros_like(y)
    for c in reversed(coefficients):
        out = out * y + c
    return out * y * y


_G_COEFFICIENTS = [(-1.0) ** k / math.factorial(k) for k in range(2, SERIES_TERMS + 2)]


def _g(y: torch.Tensor) -> torch.Tensor:
    """g(y) = y - 1 + e^-y = sum_{k>=2} (-y)^k / k! >= 0, to full relative precision: the series where
    |y| < ``SERIES_RADIUS`` (the closed form cancels there), the closed form elsewhere. ``torch.where`` sees
    only inputs each branch is accurate and finite on, so gradients stay finite too."""
    near = y.abs() < SERIES_RADIUS
    far = torch.where(near, 1.0, y)
    return torch.where(near, _series(_G_COEFFICIENTS, torch.where(near, y, 0.0)), far + torch.expm1(-far))


def _log1p_of(c: float, sign: float, L: torch.Tensor, fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """log(1 + x) for x = c expm1(sign L): ``log1p(x)`` where |x| <= 1/2 (accurate to relative precision however
    small the result), else ``fallback()`` (a form without cancellation when 1 + x is far from 1). x is only
    computed where it is used, so that neither its overflow nor its gradient reaches the other branch."""
    with torch.no_grad():
        near = (c * torch.expm1(sign * L)).abs() <= 0.5
    x = c * torch.expm1(sign * torch.where(near, L, 0.0))
    return torch.where(near, torch.log1p(x), fallback())


def _gjsd_logs(b: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``L -> (ln m, ln(u/m))`` for m = beta u + 1 - beta, each to relative precision near u = 1 and near the
    endpoints: ln m = log1p(beta expm1 L) and ln(u/m) = -log1p((1 - beta) expm1(-L)), with logaddexp forms where
    the log1p argument is far from 0. Exact at beta = 0 (ln m = 0) and beta = 1 (ln m = L)."""
    d = 1.0 - b

    def logs(L):
        if b == 0.0:
            return torch.zeros_like(L), L.clone()
        if b == 1.0:
            return L.clone(), torch.zeros_like(L)
        log_m = _log1p_of(b, 1.0, L, lambda: torch.logaddexp(L + math.log(b), torch.full_like(L, math.log(d))))
        log_r = -_log1p_of(d, -1.0, L, lambda: torch.logaddexp(-L + math.log(d), torch.full_like(L, math.log(b))))
        return log_m, log_r
    return logs


def _gjsd(weight: float) -> tuple[Fn, Fn, Fn]:
    """Generalised JSD with weight ``weight`` (beta) on the teacher; m = beta u + 1 - beta.

    f = beta u ln u - m ln m,  f' = beta (ln u - ln m),  w = (1 - beta) ln m.

    f is computed as ``beta u g(ln(u/m)) + (1 - beta) g(ln(1/m))`` with g(y) = y - 1 + e^-y >= 0 (``_g``): the
    same function, since beta (u ln(u/m) - u + m) + (1 - beta)(-ln m - 1 + m) = beta u ln u - m ln m, written as a
    sum of two non-negative terms, so it is non-negative by construction (Jensen) and never the difference of
    two large numbers. The textbook form cancels catastrophically near beta = 0 and 1 (at beta = 1 - 1e-16 and
    u = e^30 it is pure rounding, and negative); this one keeps full relative precision everywhere.
    """
    b, d, logs = weight, 1.0 - weight, _gjsd_logs(weight)

    def f(L):
        log_m, log_r = logs(L)
        return b * L.exp() * _g(log_r) + d * _g(-log_m)

    return f, (lambda L: b * logs(L)[1]), (lambda L: d * logs(L)[0])


def _p_g(lp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p g(y) with p = exp(lp): ``exp(lp) g(y)``, or ``p (y - 1) + exp(lp - y)`` where e^-y would overflow."""
    big = y < -30.0
    safe = torch.where(big, 0.0, y)
    return torch.where(big, lp.exp() * (y - 1.0) + torch.exp(lp - y), lp.exp() * _g(safe))


def _gjsd_weighted(weight: float) -> tuple[Fn2, Fn2]:
    """``(p f, p w)`` of the generalised JSD in the form of ``_gjsd``: p f = beta (p u) g(ln(u/m)) +
    (1 - beta) p g(ln(1/m)) and p w = (1 - beta) p ln m, with p u = exp(ln p + L)."""
    b, d, logs = weight, 1.0 - weight, _gjsd_logs(weight)

    def pf(lp, L):
        log_m, log_r = logs(L)
        return b * torch.exp(lp + L) * _g(log_r) + d * _p_g(lp, -log_m)

    return pf, (lambda lp, L: d * lp.exp() * logs(L)[0])


def _amari_coefficients(a: float) -> list[float] | None:
    """c_k = (1 + a + ... + a^(k-2)) / k!, k >= 2: f = sum_k c_k L^k near L = 0 (None for |a| > 1000, where the
    series' radius is too small to matter)."""
    if abs(a) > 1000.0:
        return None
    return [sum(a ** j for j in range(k - 1)) / math.factorial(k) for k in range(2, SERIES_TERMS + 2)]


def _amari(alpha: float) -> tuple[Fn, Fn, Fn]:
    """Amari alpha family, f = (u^a - a u - (1 - a)) / (a (a - 1)), continuous through a = 0 and a = 1.

    f' = (u^(a-1) - 1)/(a - 1),  w = (u^a - 1)/a.  Written with expm1 so both limits are exact:
    a -> 0 gives f = u - 1 - ln u (reverse KL plus a linear term), a -> 1 gives f = u ln u - u + 1.
    Near u = 1 (|L| max(1, |a|) < 1/2) f is its power series sum_k L^k (1 + a + ... + a^(k-2)) / k!, whose
    coefficients are positive sums: the closed forms subtract two numbers that agree to O(L^2) there.
    """
    a, coefficients = alpha, _amari_coefficients(alpha)
    radius = SERIES_RADIUS / max(1.0, abs(a))

    def closed(L):
        u = L.exp()
        if abs(a) < 0.5:  # form valid for a != 1: ((u^a-1)/a - (u-1)) / (a-1)
            return (_expm1_over(a, L) - (u - 1.0)) / (a - 1.0)
        return (u * _expm1_over(a - 1.0, L) - (u - 1.0)) / a  # form valid for a != 0

    def f(L):
        if coefficients is None:
            return closed(L)
        near = L.abs() < radius
        series = _series(coefficients, torch.where(near, L, 0.0))
        return torch.where(near, series, closed(torch.where(near, 1.0, L)))

    return f, (lambda L: _expm1_over(a - 1.0, L)), (lambda L: _expm1_over(a, L))


def _amari_weighted(alpha: float) -> tuple[Fn2, Fn2]:
    """``(p f, p w)`` of the Amari family, in the same two forms as ``_amari`` (p u = exp(log p + L))."""
    a = alpha

    def pf(lp, L):
        if abs(a) < 0.5:
            return (_p_expm1_over(lp, a, L) - _p_expm1(lp, L)) / (a - 1.0)
        return (_p_expm1_over(lp + L, a - 1.0, L) - _p_expm1(lp, L)) / a

    return pf, (lambda lp, L: _p_expm1_over(lp, a, L))


def _fixed() -> dict[str, Divergence]:
    half = 0.5
    jsd_f, jsd_fp, jsd_w = _gjsd(0.5)
    table = [
        Divergence("reverse_kl", "reverse KL", "-ln u", "ln u - 1",
                   lambda L: -L, lambda L: -torch.exp(-L), lambda L: L - 1.0,
                   weighted=(lambda lp, L: -lp.exp() * L, lambda lp, L: lp.exp() * (L - 1.0))),
        Divergence("forward_kl", "forward KL", "u ln u", "u",
                   lambda L: L.exp() * L, lambda L: L + 1.0, lambda L: L.exp(), bounded_weight=False,
                   weighted=(lambda lp, L: torch.exp(lp + L) * L, lambda lp, L: torch.exp(lp + L))),
        Divergence("jsd", "Jensen-Shannon", "½[u ln u - (1+u) ln((1+u)/2)]", "½ ln((1+u)/2)",
                   jsd_f, jsd_fp, jsd_w, weighted=_gjsd_weighted(0.5)),
        Divergence("tv", "total variation", "½|u-1|", "½ sign(u-1)",
                   lambda L: half * torch.expm1(L).abs(), lambda L: half * torch.sign(L),
                   lambda L: half * torch.sign(L),
                   weighted=(lambda lp, L: half * _p_expm1(lp, L).abs(),
                             lambda lp, L: half * torch.sign(L) * lp.exp())),
        Divergence("hellinger", "squared Hellinger", "(√u-1)²", "√u - 1",
                   lambda L: torch.expm1(L / 2) ** 2, lambda L: -torch.expm1(-L / 2),
                   lambda L: torch.expm1(L / 2),
                   weighted=(lambda lp, L: _p_squared_expm1(lp, L / 2), lambda lp, L: _p_expm1(lp, L / 2))),
        Divergence("pearson_chi2", "Pearson χ²", "(u-1)²", "u² - 1",
                   lambda L: torch.expm1(L) ** 2, lambda L: 2.0 * torch.expm1(L),
                   lambda L: torch.expm1(2.0 * L), bounded_weight=False,
                   weighted=(lambda lp, L: _p_squared_expm1(lp, L), lambda lp, L: _p_expm1(lp, 2.0 * L))),
        Divergence("neyman_chi2", "Neyman χ²", "(1-u)²/u", "2(1 - 1/u)",
                   lambda L: torch.expm1(L) ** 2 * torch.exp(-L), lambda L: -torch.expm1(-2.0 * L),
                   lambda L: -2.0 * torch.expm1(-L),
                   weighted=(lambda lp, L: _p_squared_expm1(lp - L, L), lambda lp, L: -2.0 * _p_expm1(lp, -L))),
    ]
    return {d.name: d for d in table}


_FIXED = _fixed()
assert tuple(_FIXED) == FIXED_DIVERGENCES, "the registry and opdlab.config.choices name the same divergences"


def names() -> list[str]:
    """The registry's names: fixed divergences, then the families as ``family:<parameter>`` templates."""
    return list(_FIXED) + [f"{fam}:<{'β' if fam == 'gjsd' else 'α'}>" for fam in DIVERGENCE_FAMILIES]


def get(name: str | Divergence) -> Divergence:
    """Look up a divergence by name: one of ``names()``, or ``"gjsd:<beta>"`` / ``"alpha:<alpha>"``.

    A UserError lists the allowed names for an unknown name or states the allowed range of a bad family parameter.
    """
    if isinstance(name, Divergence):
        return name
    family, value = parse_divergence(name)
    if value is None:
        return _FIXED[family]
    if family == "gjsd":
        f, fp, w = _gjsd(value)
        return Divergence(f"gjsd:{value:g}", f"GJSD β={value:g}", "β u ln u - m ln m, m = βu+1-β",
                          "(1-β) ln(βu+1-β)", f, fp, w, parameter=value, bounded_weight=True,
                          weighted=_gjsd_weighted(value))
    f, fp, w = _amari(value)
    return Divergence(f"alpha:{value:g}", f"Amari α={value:g}", "(u^α - αu - (1-α))/(α(α-1))",
                      "(u^α - 1)/α", f, fp, w, parameter=value, bounded_weight=value <= 0.0,
                      weighted=_amari_weighted(value))
