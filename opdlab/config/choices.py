"""The named choices of an estimator and of a run, in one torch-free place: methods, baselines, reductions,
and the divergence names the registry accepts.

``opdlab.config.spec`` validates a ``RunSpec`` against these without loading torch; ``opdlab.core.estimators``,
``opdlab.exact.toy`` and ``opdlab.core.divergences`` use the same tuples. The math behind each choice is in
docs/math.md (§3 methods, §4 γ and reductions, §5 baselines).
"""
from __future__ import annotations

import math
import warnings

from opdlab.errors import UserError

__all__ = ["METHODS", "REFERENCE_METHODS", "TRAIN_METHODS", "BASELINES", "SPARSE_BASELINES", "REDUCTIONS",
           "LR_SCHEDULES", "DEFAULT_REDUCTION", "EVAL_SPLITS", "EVAL_SEED", "VALIDATION_SEED", "FIXED_DIVERGENCES",
           "DIVERGENCE_FAMILIES", "REPRESENTATIVE_DIVERGENCES", "parse_divergence", "allowed_divergences",
           "check_method", "check_baseline", "check_trainable", "GJSD_MIN_WEIGHT"]

METHODS = ("opd", "opd_plus")
"""``"opd"``: the stop-gradient advantage -f(u); ``"opd_plus"``: w_f(u) = -f(u) + u f'(u) (docs/math.md §3)."""

REFERENCE_METHODS = ("full_vocabulary", "supervised_kd")
"""Reference arms a training run can use instead of a sampled advantage: ``"full_vocabulary"``, the exact
token-local gradient sum_t grad D_f(pi_T || pi_theta)(c_t) at the contexts the student visits (needs the full
distributions; no sampling noise at the token), and ``"supervised_kd"``, cross-entropy on completions sampled
from the teacher (sequence-level knowledge distillation, off-policy)."""

TRAIN_METHODS = METHODS + REFERENCE_METHODS
"""What ``Objective.method`` accepts; what each one samples, minimises, logs and is called is
``opdlab.core.objective.TABLE``."""

BASELINES = ("none", "expected", "loo")
"""``"none"``; ``"expected"``: the exact per-context mean of the advantage over the vocabulary; ``"loo"``: the
mean advantage of the other samples of the same group at the same position (docs/math.md §5)."""

EVAL_SPLITS = ("test", "validation")
"""Where a run's evaluation items come from (``EvalSpec.eval_split``)."""

EVAL_SEED = 10_000
"""The test items' stream (``step.eval_examples``): the held-out items are the same for every run, so that
methods compare on one set."""

VALIDATION_SEED = 20_000
"""The validation items' stream (``step.eval_examples``); no run trains with this seed (``Optim`` refuses it)."""

SPARSE_BASELINES = ("none", "tail", "loo")
"""Baselines of OPD+ from a top-k teacher (``opdlab.core.sparse``): ``"tail"`` is w_f at the tail's aggregate ratio
u_bar = (1 - Q_S) / (1 - Pi_S), corrected on the support; ``"expected"`` needs the whole teacher and is refused
there (docs/math.md §8)."""

REDUCTIONS = ("token", "sequence")
"""How a surrogate sums its per-token terms: ``"token"`` divides by the number of unmasked tokens in the batch,
``"sequence"`` by the number of sequences. Only ``"sequence"`` is unbiased: with it gamma = 1 estimates the
sequence gradient grad J and gamma = 0 the token-local one; ``"token"`` rescales each batch by a random count
(docs/math.md §4)."""

LR_SCHEDULES = ("constant", "cosine")
"""Learning rate of distillation against step: constant, or a linear warm-up over the first 5% of steps then a
cosine decay to 10% of ``lr`` (``lm.sft.warmup_cosine_lr``, the schedule supervised training uses)."""

DEFAULT_REDUCTION = "token"
"""The reduction of ``Objective`` and of every surrogate loss when none is named."""

FIXED_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "pearson_chi2", "neyman_chi2")
DIVERGENCE_FAMILIES = {
    "gjsd": "generalised JSD with weight β on the teacher, β in [0, 1], e.g. 'gjsd:0.1' (gjsd:0.5 is jsd)",
    "alpha": "Amari α-divergence, any finite α, e.g. 'alpha:0.5' (α=0 and α=1 are the continuous limits)",
}

REPRESENTATIVE_DIVERGENCES = FIXED_DIVERGENCES + ("gjsd:0.1", "alpha:0.5")
"""Every fixed divergence and one member of each family: the set that studies, the audit and the symbolic
checks iterate over when they mean 'every divergence'."""


def allowed_divergences() -> str:
    """The accepted divergence names, for error messages."""
    return (", ".join(FIXED_DIVERGENCES) + "; families: "
            + "; ".join(f"{k} ({v})" for k, v in DIVERGENCE_FAMILIES.items()))


def parse_divergence(name: str) -> tuple[str, float | None]:
    """``(key, None)`` for a fixed divergence, ``(family, parameter)`` for ``"gjsd:<beta>"`` / ``"alpha:<alpha>"``.

    Raises a TypeError for a name that is not a string, and a UserError that lists the allowed names for an
    unknown name or states the allowed range for a family parameter that is malformed or out of range. The
    registry accepts the endpoints gjsd:0 and gjsd:1 (identically zero; the family is continuous there) with a
    warning; ``check_trainable`` refuses them, and weights within float32 precision of them, for training.
    """
    if not isinstance(name, str):
        raise TypeError(f"a divergence is named by a string, got {type(name).__name__}; "
                        f"allowed: {allowed_divergences()}")
    key = name.strip().lower()
    if key in FIXED_DIVERGENCES:
        return key, None
    family, sep, raw = key.partition(":")
    if family not in DIVERGENCE_FAMILIES:
        raise UserError(f"unknown divergence {name!r}; allowed: {allowed_divergences()}")
    if not sep or not raw:
        raise UserError(f"divergence family {family!r} needs a parameter: {DIVERGENCE_FAMILIES[family]}")
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"parameter of {family!r} must be a number, got {raw!r}: "
                         f"{DIVERGENCE_FAMILIES[family]}") from None
    if not math.isfinite(value):
        raise UserError(f"parameter of {family!r} must be finite, got {raw!r}: {DIVERGENCE_FAMILIES[family]}")
    if family == "gjsd":
        if not 0.0 <= value <= 1.0:
            raise UserError(f"gjsd weight on the teacher must lie in [0, 1], got {value}: "
                             f"{DIVERGENCE_FAMILIES['gjsd']}")
        if value in (0.0, 1.0):
            warnings.warn(f"gjsd:{value:g} is identically zero (the mixture equals one of the two "
                          "distributions): it gives no learning signal. For the KL limits use forward_kl, "
                          "reverse_kl, alpha:1 or alpha:0.", stacklevel=3)
    return family, value


GJSD_MIN_WEIGHT = 2.0 ** -23
"""The least weight min(beta, 1 - beta) of a trainable generalised JSD: float32's relative precision, the one
training computes in. Near its ends gjsd:beta is a multiple of a fixed divergence, f ~ beta (u ln u - u + 1) as
beta -> 0 and f ~ (1 - beta)(u - 1 - ln u) as beta -> 1, so its advantages are of size min(beta, 1 - beta)
|log u|-ish: below this weight they are smaller than the float32 rounding of the log-probabilities they are
computed from, and what training follows is rounding."""


def check_trainable(name: str) -> None:
    """Refuse (UserError) a divergence whose generator is zero to float precision on every u training visits:
    gjsd:beta with min(beta, 1 - beta) < ``GJSD_MIN_WEIGHT`` (beta = 0 and 1 included), saying why and naming
    the nearest setting that trains. Other names pass; a malformed one raises as in ``parse_divergence``."""
    family, value = parse_divergence(name)
    if family != "gjsd" or min(value, 1.0 - value) >= GJSD_MIN_WEIGHT:
        return
    low = value < 0.5
    nearest = f"gjsd:{GJSD_MIN_WEIGHT:.2g}" if low else f"gjsd:{1.0 - float(f'{GJSD_MIN_WEIGHT:.2g}'):.8f}"
    shape, limit = ("u ln u - u + 1", "alpha:1") if low else ("u - 1 - ln u", "alpha:0")
    raise UserError(f"divergence {name!r} trains nothing: its weight {'beta' if low else '1 - beta'} = "
                    f"{min(value, 1.0 - value):.3g} is below float32 precision ({GJSD_MIN_WEIGHT:.3g}), and f is "
                    f"that weight times {shape}, so its advantages are rounding; the nearest setting that trains "
                    f"is {nearest}, and the shape it tends to is {limit}")


def check_method(method: str) -> None:
    """Raise a UserError unless ``method`` is one of ``METHODS``."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def check_baseline(baseline: str) -> None:
    """Raise a UserError unless ``baseline`` is one of ``BASELINES``."""
    if baseline not in BASELINES:
        raise UserError(f"unknown baseline {baseline!r}; allowed: 'none', 'expected' (exact per-context mean of "
                         "the advantage), 'loo' (leave-one-out over the other samples)")
