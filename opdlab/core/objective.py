"""The one table of what each method is: what it samples from, its loss, what it logs, and its labels.

``TABLE`` holds one ``Method`` per name of ``config.choices.TRAIN_METHODS`` (the sampled-token estimators of
``choices.METHODS``, then the reference arms of ``choices.REFERENCE_METHODS``), and ``loss`` computes any
method's loss from the scores. The training step, the cohorts, the noise studies and the TRL integration ask
this table; none of them branches on a method's name. Losses (docs/math.md §3-§8), minimised, with n = B
(``"sequence"``) or the unmasked tokens (``"token"``) and u_t = pi_T(y_t|c_t) / pi_theta(y_t|c_t):

- ``opd`` / ``opd_plus``: ``L = -(1/n) sum_t A_t log pi_theta(y_t|c_t)``, y ~ pi_theta, with
  ``A_t = a(u_t) - sum_{s>t} gamma^(s-t) f(u_s) - b(c_t)``, a = -f (``opd``) or a = w_f = -f + u f' (``opd_plus``)
  (``estimators.baselined_advantages`` and ``estimators.reinforce_loss``);
- ``full_vocabulary``: ``L = (1/n) sum_t D_f(pi_T(.|c_t) || pi_theta(.|c_t))`` at the contexts the student
  visits (``estimators.full_vocabulary_loss``);
- ``supervised_kd``: ``L = -(1/n) sum_t log pi_theta(y_t|c_t)``, y ~ pi_T (``estimators.supervised_loss``);
- with ``teacher_topk = k`` (``opd_plus`` only): OPD+ from the teacher's top-k log-probabilities and the sampled
  token's alone (``sparse.sparse_surrogate``: exact on the support, the tail from the sample); the teacher's full
  distribution only builds that payload.

Adding a method touches: its name in ``config.choices`` (``METHODS`` if it estimates from the sampled token,
else ``REFERENCE_METHODS``); its loss function (``core.estimators``) and its ``Method`` here; its colour and line
style in ``app.plots.METHOD_STYLE``; ``experiments.comparisons.questions`` only if it joins a family there; and
``config.spec.Objective`` only if it takes ``teacher_topk`` (docs/architecture.md, "Where things are said once").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from opdlab.core import estimators, sparse
from opdlab.core.divergences import get as get_divergence
from opdlab.errors import UserError

__all__ = ["Scores", "Terms", "Method", "TABLE", "ADVANTAGE_METRICS", "TOPK_ARM", "get", "names", "names_with_topk",
           "loss", "LABELS", "label", "arm_label", "divergence_title"]


@dataclass
class Scores:
    """What a loss is computed from: log-probabilities of the scored tokens (``_BT``) and over the vocabulary
    (``_BTV``), the teacher's without gradient, the student's with it."""

    logp_teacher_BT: torch.Tensor
    logp_teacher_BTV: torch.Tensor
    logp_student_BT: torch.Tensor
    logp_student_BTV: torch.Tensor
    ids_BT: torch.Tensor | None = None
    """The scored tokens (a top-k teacher's payload is built at them)."""


Terms = Union[estimators.Advantages, sparse.SparseTerms, None]
"""What a loss returns beside its value: the advantages behind it (None for a method without advantages)."""

LossFn = Callable[..., "tuple[torch.Tensor, Terms]"]
"""``(settings, div, scores, mask_BT, group_size, reduction) -> (loss, terms)``."""

ADVANTAGE_METRICS = ("adv_mean", "adv_std", "adv_abs_max", "log_u_mean", "clip_fraction")
"""The step metrics of a method with advantages, beyond those every step logs."""

TOPK_ARM = "{arm}, top-{k} teacher"
"""An arm's name when its method sees only the teacher's top-k."""


@dataclass(frozen=True)
class Method:
    """What one method is.

    Attributes:
        name: its name in ``config.choices``.
        samples_from: ``"student"`` (on-policy: the contexts are the student's) or ``"teacher"``.
        sampled: whether it estimates from the sampled token (advantages A_t multiply grad log pi(y_t)): such an
            estimator needs y ~ pi_theta exactly, and is what the token-noise studies measure.
        loss: its ``LossFn``.
        topk_loss: its ``LossFn`` from a top-k teacher's payload; None: it refuses ``teacher_topk``.
        logs: the step metrics it logs beyond those every step logs.
        label: its legend label, the same in every figure and table.
        topk_label: its legend label from a top-k teacher (with ``topk_loss``).
        arm: its arm name, ``"{divergence}"`` standing for the divergence's title.
    """

    name: str
    samples_from: str
    sampled: bool
    loss: LossFn
    topk_loss: LossFn | None
    logs: tuple[str, ...]
    label: str
    topk_label: str | None
    arm: str


def _advantage_loss(o, div, s: Scores, mask_BT, group_size, reduction):
    adv = estimators.baselined_advantages(div, s.logp_student_BT.detach(), s.logp_teacher_BT, mask_BT, o.method,
                                          o.gamma, o.baseline, s.logp_student_BTV.detach(), s.logp_teacher_BTV,
                                          group_size, o.log_u_clip)
    return estimators.reinforce_loss(s.logp_student_BT, adv.A_BT, mask_BT, reduction), adv


def _topk_loss(o, div, s: Scores, mask_BT, group_size, reduction):
    if s.ids_BT is None:
        raise UserError("a top-k teacher's payload is built at the scored tokens: Scores.ids_BT is needed, got None")
    payload = sparse.topk_payload(s.logp_teacher_BTV, s.ids_BT, o.teacher_topk)
    return sparse.sparse_surrogate(div, s.logp_student_BTV, s.ids_BT, payload, mask_BT, o.gamma, o.baseline,
                                   group_size, o.log_u_clip, reduction)


def _full_vocabulary_loss(o, div, s: Scores, mask_BT, group_size, reduction):
    return estimators.full_vocabulary_loss(div, s.logp_student_BTV, s.logp_teacher_BTV, mask_BT, reduction), None


def _supervised_loss(o, div, s: Scores, mask_BT, group_size, reduction):
    return estimators.supervised_loss(s.logp_student_BT, mask_BT, reduction), None


TABLE = {m.name: m for m in (
    Method("opd", "student", True, _advantage_loss, None, ADVANTAGE_METRICS, "OPD (stop-gradient)", None,
           "stop-gradient {divergence}"),
    Method("opd_plus", "student", True, _advantage_loss, _topk_loss, ADVANTAGE_METRICS, "OPD+",
           "OPD+ from the teacher's top-k", "OPD+ {divergence}"),
    Method("full_vocabulary", "student", False, _full_vocabulary_loss, None, (), "full-vocabulary loss (reference)",
           None, "full vocabulary, {divergence}"),
    Method("supervised_kd", "teacher", False, _supervised_loss, None, (),
           "supervised KD on teacher samples (reference)", None, "supervised KD"),
)}
"""Every method by name, in the order of ``config.choices.TRAIN_METHODS``."""


def get(name: str) -> Method:
    """The ``Method`` named ``name``; a UserError naming the allowed ones for any other."""
    if name not in TABLE:
        raise UserError(f"unknown method {name!r}; allowed: {', '.join(TABLE)}")
    return TABLE[name]


def names(**where) -> tuple[str, ...]:
    """The methods whose fields equal ``where``, in table order: ``names(sampled=True)`` is ``("opd",
    "opd_plus")``, ``names(samples_from="student")`` the on-policy ones."""
    return tuple(m.name for m in TABLE.values() if all(getattr(m, k) == v for k, v in where.items()))


def loss(settings, div, scores: Scores, mask_BT: torch.Tensor, group_size: int | None = None,
         reduction: str | None = None) -> tuple[torch.Tensor, Terms]:
    """The loss whose gradient a step follows, and the advantages behind it (None for a method without them).

    ``settings``: anything with the ``Objective`` fields ``method``, ``gamma``, ``baseline``, ``log_u_clip``,
    ``reduction`` and ``teacher_topk`` (absent: None; a ``config.spec.Objective``, TRL's ``OPDConfig``); ``div`` a
    ``Divergence``; ``group_size``: the samples of one prompt, consecutive (the ``"loo"`` baseline's groups; None:
    the batch is one group); ``reduction`` overrides ``settings.reduction``. The method's loss (module doc), or,
    with ``teacher_topk`` set, its loss from the teacher's top-k (a UserError for a method that has none)."""
    method = get(settings.method)
    reduction = settings.reduction if reduction is None else reduction
    fn = method.loss
    if getattr(settings, "teacher_topk", None) is not None:  # only what a served teacher sends reaches it
        if method.topk_loss is None:
            raise UserError(f"teacher_topk needs method {' or '.join(map(repr, names_with_topk()))}, got "
                            f"{settings.method!r}")
        fn = method.topk_loss
    return fn(settings, div, scores, mask_BT, group_size, reduction)


def names_with_topk() -> tuple[str, ...]:
    """The methods that accept ``teacher_topk``."""
    return tuple(m.name for m in TABLE.values() if m.topk_loss is not None)


LABELS = {**{m.name: m.label for m in TABLE.values()},
          **{f"{m.name}_topk": m.topk_label for m in TABLE.values() if m.topk_label is not None}}
"""A method's legend label, the same in every figure and table (``<method>_topk``: from a top-k teacher)."""


def divergence_title(name: str) -> str:
    """The registry's human-readable label of a divergence name (the name itself if unknown)."""
    try:
        return get_divergence(name).label
    except (ValueError, TypeError):
        return str(name)


def label(method: str) -> str:
    """The label of ``method`` (the name itself if it has none)."""
    return LABELS.get(method, method)


def arm_label(method: str, divergence: str, teacher_topk: int | None = None) -> str:
    """The arm name of ``method`` on ``divergence`` (the registry's title of it), from a top-k teacher when
    ``teacher_topk`` is an int: ``OPD+ forward KL``, ``stop-gradient Jensen-Shannon``, ``supervised KD``,
    ``OPD+ forward KL, top-1 teacher``."""
    arm = get(method).arm.format(divergence=divergence_title(divergence))
    return arm if teacher_topk is None else TOPK_ARM.format(arm=arm, k=int(teacher_topk))
