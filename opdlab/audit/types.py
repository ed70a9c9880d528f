"""What an audited estimator is: its terms, the source it transcribes, and the targets it is compared with.

``opdlab.audit.expected`` (the enumeration) and ``opdlab.audit.catalogue`` (the peers' losses) both import this module
and neither imports the other's internals, so there is no import circle.

A target is what an expected gradient is compared with: a registry f-divergence (``opdlab.core.divergences``), or one
of two per-context objectives that are not f-divergences but that peers' estimators follow:

    dpd:alpha       Basu's density-power divergence with the student as the data density,
                    d_alpha(pi, q) = sum_a [q^(1+alpha) - (1 + 1/alpha) pi q^alpha + (1/alpha) pi^(1+alpha)]
                    (Basu et al. 1998, Biometrika 85(3), Eq. 2.1 with g = pi, f = q). PowerOPD's reward
                    r = q(y)^alpha - pi(y)^alpha as a detached advantage has E[g] = alpha/(1+alpha) grad d_alpha.
    low_mass:frac   sum_{a in S} pi_a with the set S held fixed: S is the student's lowest-probability tokens
                    holding at most a fraction ``frac`` of its mass (``low_mass_mask``). A constant negative
                    advantage -c on S has E[g] = c grad sum_{a in S} pi_a: it pushes that mass down.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from opdlab.config.choices import REPRESENTATIVE_DIVERGENCES
from opdlab.core.divergences import get
from opdlab.errors import UserError

__all__ = ["MODES", "ARGUMENTS", "KINDS", "TARGETS", "DIVERGENCES", "Source", "Term", "Estimator", "Objective",
           "target", "arguments", "low_mass_mask"]

MODES = ("backprop", "policy_gradient", "importance_ratio")
ARGUMENTS = ("logp_student_BT", "logp_teacher_BT", "logp_student_BTV", "logp_teacher_BTV")
KINDS = ("categorical", "sequence")
TARGETS = ("token_local", "sequence")
DIVERGENCES = REPRESENTATIVE_DIVERGENCES


@dataclass(frozen=True)
class Source:
    """Where a catalogue entry comes from, pinned so that a reader can check the transcription.

    Attributes:
        repo: ``owner/name`` of the public repository, or ``arXiv NNNN.NNNNN`` where only the paper is cited.
        path: file in that repository (empty for a paper).
        version: the commit (and release, where known) that was read.
        lines: the line range transcribed, e.g. ``"2225-2245"``.
        excerpt: a short verbatim excerpt of those lines.
        defaults: the configuration the entry models (clamps, gamma, beta, reduction, temperature), in words.
        holds_for: for which versions the transcription holds, where the code moved or changed.
        read: False where the peer's code could not be read here and the entry follows the paper; ``note`` then
            says what was read instead.
        note: anything a reader checking the pin should know.
    """

    repo: str
    path: str
    version: str
    lines: str
    excerpt: str
    defaults: str
    holds_for: str = ""
    read: bool = True
    note: str = ""


def arguments(fn: Callable) -> tuple[str, ...]:
    """The ``ARGUMENTS`` that ``fn`` takes, or a UserError naming the parameter that is not one of them."""
    label = getattr(fn, "__name__", repr(fn))
    if not callable(fn):
        raise UserError(f"estimator function must be callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise UserError(f"cannot read the signature of {label}; write it as a def with named parameters "
                        f"from: {', '.join(ARGUMENTS)}") from None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ARGUMENTS
    names = []
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.name in ARGUMENTS:
            names.append(p.name)
        elif p.default is p.empty:
            raise UserError(f"estimator function {label} has parameter {p.name!r}, which the audit cannot "
                            f"supply; allowed parameter names: {', '.join(ARGUMENTS)} (others need defaults)")
    if not names:
        raise UserError(f"estimator function {label} takes none of {', '.join(ARGUMENTS)}; it must read at "
                        "least the student's log-probabilities")
    return tuple(names)


@dataclass(frozen=True)
class Term:
    """One per-token function and the way its gradient is taken (one of ``MODES``)."""

    fn: Callable
    mode: str

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown gradient mode {self.mode!r}; allowed: {', '.join(MODES)} (backprop: the "
                            "value is differentiated directly; policy_gradient: a detached advantage times "
                            "grad log pi; importance_ratio: pi/sg(pi) times the value)")
        arguments(self.fn)


def low_mass_mask(logp_V: torch.Tensor, frac: float) -> torch.Tensor:
    """``1[a in S]`` over the last axis, detached: S holds the lowest-probability tokens whose cumulative mass,
    counted from the least likely, stays <= ``frac``. This is the large-batch limit, at one context, of "the
    lowest-probability fraction ``frac`` of sampled tokens" (a token straddling the quantile is left out)."""
    p_V = logp_V.detach().exp()
    order = torch.argsort(p_V, dim=-1)
    cum = torch.gather(p_V, -1, order).cumsum(-1)
    inside = (cum <= frac + 1e-12).to(p_V.dtype)
    return torch.zeros_like(p_V).scatter(-1, order, inside)


@dataclass(frozen=True)
class Objective:
    """A per-context objective that is not an f-divergence (see the module docstring); ``exact`` mirrors
    ``Divergence.exact``: log-probabilities over the last axis in, the value per context out."""

    name: str
    label: str
    family: str
    parameter: float

    def exact(self, logp_teacher: torch.Tensor, logp_student: torch.Tensor) -> torch.Tensor:
        if self.family == "dpd":
            a = self.parameter
            q, p = logp_teacher.exp(), logp_student.exp()
            return (q.pow(1 + a) - (1 + 1 / a) * p * q.pow(a) + p.pow(1 + a) / a).sum(-1)
        return (low_mass_mask(logp_student, self.parameter) * logp_student.exp()).sum(-1)


_FAMILIES = {"dpd": "density-power divergence (Basu), alpha = {p:g}; not an f-divergence",
             "low_mass": "pushes down low-probability mass (the student's lowest {p:g} of mass)"}


def target(name: str):
    """A registry ``Divergence`` or an ``Objective`` by name (``dpd:ALPHA``, ``low_mass:FRAC``)."""
    family, sep, value = str(name).partition(":")
    if sep and family in _FAMILIES:
        try:
            p = float(value)
        except ValueError:
            p = float("nan")
        ok = p > 0 if family == "dpd" else 0 < p < 1
        if not ok:
            raise UserError(f"target {name!r}: {family} needs a parameter "
                            f"{'> 0' if family == 'dpd' else 'in (0, 1)'}, got {value!r}")
        return Objective(f"{family}:{p:g}", _FAMILIES[family].format(p=p), family, p)
    try:
        return get(name)
    except ValueError as err:
        raise UserError(f"{err}; or a non-f target: dpd:ALPHA (density-power divergence), low_mass:FRAC "
                        "(the student's low-probability mass)") from None


@dataclass(frozen=True)
class Estimator:
    """A per-token estimator: its terms (summed), what it claims, what it follows by hand, and its source.

    Attributes:
        name: short identifier, e.g. ``"k3_backprop"``.
        terms: the (function, gradient mode) pairs whose surrogate losses are added.
        claims: the target it is meant to minimise, or None (a control).
        scope: ``"token_local"`` or ``"sequence"``: which exact gradient ``claims`` and ``follows`` refer to.
        follows: hand derivation ``{target: c}`` meaning E[g] = sum c grad D (``{}``: E[g] = 0), or None.
        doc: what it does (the function's docstring).
        source: the peer code it transcribes (``Source``); None for a user's own function.
    """

    name: str
    terms: tuple[Term, ...]
    claims: str | None = None
    scope: str = "token_local"
    follows: dict[str, float] | None = None
    doc: str = ""
    source: Source | None = None

    def __post_init__(self):
        if not self.terms:
            raise UserError(f"estimator {self.name!r} has no terms")
        if self.scope not in TARGETS:
            raise UserError(f"scope of {self.name!r} must be one of {', '.join(TARGETS)}, got {self.scope!r}")
        for name in ([self.claims] if self.claims else []) + list(self.follows or {}):
            target(name)  # a clear error for an unknown target

    @property
    def mode(self) -> str:
        """The gradient modes of its terms, joined with '+'."""
        return "+".join(t.mode for t in self.terms)
