"""An unbiasedness check for your own per-token distillation loss, to call from your test suite.

    from opdlab.testing import assert_unbiased

    def my_k1_reward(logp_student_BT, logp_teacher_BT):
        return logp_teacher_BT - logp_student_BT        # a detached advantage, as my trainer uses it

    def test_my_loss_follows_reverse_kl():
        assert_unbiased(my_k1_reward, "reverse_kl", mode="policy_gradient")

The loss is written in the audit's input format (``opdlab.audit.expected``: parameters named from logp_student_BT,
logp_teacher_BT, logp_student_BTV, logp_teacher_BTV; one value per token; a gradient mode). On random toys small
enough to enumerate (``opdlab.exact.toy``) the expected gradient E[g] of the loss is computed exactly and compared with
the exact gradient of the divergence. Exact means no sampling: the only error is float64 rounding (about 1e-12
relative), so the default tolerance 1e-6 separates a correct loss from a biased one by many orders of magnitude.
When the check fails, the message gives the audit's verdict: what E[g] follows instead.
"""
from __future__ import annotations

from typing import Callable, Sequence

from opdlab.audit.expected import DIVERGENCES, KINDS, Estimator, audit, estimator, verdicts
from opdlab.audit.types import target
from opdlab.errors import UserError

__all__ = ["assert_unbiased"]


def assert_unbiased(loss: Callable | Estimator, divergence: str, mode: str = "policy_gradient", *,
                    scope: str = "token_local", kinds: str | Sequence[str] = KINDS, n_toys: int = 5, seed: int = 0,
                    tol: float = 1e-6, up_to_scale: bool = False) -> float:
    """Assert that ``loss``'s expected gradient equals ``grad divergence`` exactly, on ``n_toys`` toys per kind.

    Args:
        loss: a per-token function (see the module docstring) or an ``opdlab.audit.expected.Estimator``.
        divergence: a registry name (``opdlab divergences``) or a non-f target (``dpd:ALPHA``, ``low_mass:FRAC``).
        mode: how the loss's gradient is taken: ``backprop``, ``policy_gradient`` or ``importance_ratio``
            (ignored for an Estimator).
        scope: ``token_local`` (prefix probabilities held fixed: the gradient a per-token loss can have) or
            ``sequence`` (the whole-sequence objective, for return-to-go advantages); on categorical toys the two
            coincide.
        kinds, n_toys, seed: the toys (``opdlab.audit.expected.audit``).
        tol: the largest relative error ``||E[g] - grad D|| / ||grad D||`` allowed on any toy.
        up_to_scale: accept E[g] = c grad D for any c > 0 (a coefficient on the loss): the direction is checked
            (1 - cosine <= tol) instead of the value.

    Returns:
        The largest relative error (or 1 - cosine with ``up_to_scale``) over the toys.

    Raises:
        AssertionError: the loss is biased for ``divergence``; the message says by how much and what E[g]
            follows instead (the closest registry divergence or non-f target, with its cosine and scale).
        UserError: a bad argument (unknown divergence or mode, a function the audit cannot call).
    """
    name = target(divergence).name
    if isinstance(loss, Estimator):
        est = loss
    else:
        est = estimator(loss, mode, claims=name, scope=scope)
    frame = audit(est, kinds=kinds, n_toys=n_toys, seed=seed, divergences=list(DIVERGENCES) + [name])
    at = frame[(frame.divergence == name)
               & ((frame.target == scope) | (frame.kind == "categorical"))]
    if at.empty:
        raise UserError(f"no comparison with {name!r} at scope {scope!r}; scope is token_local or sequence")
    # where grad D = 0 on a toy (relative error undefined), E[g] must vanish too: ||E[g]|| / sqrt(E||g||^2)
    vanish_S = at.mean_norm / at.rms_norm.where(at.rms_norm > 0, 1.0)
    error_S = (1 - at.cosine.fillna(-1.0)) if up_to_scale else at.relative_error.fillna(vanish_S)
    worst = float(error_S.max())
    if worst <= tol:
        return worst
    table = verdicts(frame).set_index("kind")
    told = "; ".join(_told(kind, r, _cosine(at, kind), name) for kind, r in table.iterrows())
    measure = "1 - cosine" if up_to_scale else "relative error ||E[g] - grad D|| / ||grad D||"
    raise AssertionError(f"{est.name} ({est.mode}) is biased for {name}: {measure} up to {worst:.3g} over "
                         f"{n_toys} toys per kind (tolerance {tol:g}); {told}")


def _told(kind: str, r, cosine: float, name: str) -> str:
    """The audit's verdict on one kind of toy, in words."""
    if r.closest.startswith("nothing"):
        return f"on {kind} toys it follows nothing (E[g] = 0)"
    exact = "it follows" if r.closest_cosine > 1 - 1e-6 else "it follows no target exactly; closest is"
    return (f"on {kind} toys {exact} {r.closest} (cosine {r.closest_cosine:.3f}, scale {r.closest_scale:.3g}), "
            f"cosine to {name} {cosine:.3f}")


def _cosine(rows, kind: str) -> float:
    return float(rows[rows.kind == kind].cosine.mean())
