"""Toy policies small enough to enumerate: exact objectives and gradients next to the sampled estimators.

Two policies, both in float64, both parameterised directly by logits:

* ``CategoricalToy``: one context, a softmax over K logits. The objective is one f-divergence,
  ``D_f = sum_a pi_theta(a) f(pi_T(a) / pi_theta(a))``, its exact gradient comes from autograd, and the
  REINFORCE estimator built on an advantage A has the per-sample gradient (w.r.t. the logits)

      g(a) = -A(a) grad log pi_theta(a) = -A(a) (e_a - pi_theta),   a ~ pi_theta,

  whose expectation ``sum_a pi(a) (-A(a)) (e_a - pi)`` is computed exactly by ``expected_estimator_gradient``.
  With A = w_f (OPD+) it equals grad D_f; with A = -f (stop-gradient OPD) it misses
  ``-E[u f'(u) grad log pi]``, which vanishes only for reverse KL (OPD+ paper, arXiv 2606.01039, Eq. 5-7).

* ``SequenceToy``: a tabular autoregressive policy with one row of logits per prefix (vocabulary V,
  horizon H, prefixes of length < H numbered breadth-first), so all V^H sequences can be enumerated.
  The sequence objective is a sum over prefix nodes c,

      J(theta) = E_{y~pi_theta}[ sum_t f(u_t) ] = sum_c P_theta(c) D_f(c),

  with P_theta(c) the probability of reaching c. Holding P_theta(c) fixed (detached) gives the token-local
  objective whose gradient the gamma = 0 estimator targets; gamma = 1 targets grad J.

Sampled estimators call ``opdlab.core.estimators.baselined_advantages``, the function the training loop calls, so
that the exact tests on these toys cover the advantages that train models. Randomness only through an
explicit seed or ``torch.Generator``. Notation and derivations: docs/math.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd
import torch

from opdlab.config.choices import check_baseline, check_method
from opdlab.core.divergences import Divergence, get
from opdlab.core.estimators import baselined_advantages
from opdlab.errors import UserError

__all__ = [
    "CategoricalToy", "make_categorical", "exact_gradient", "expected_estimator_gradient", "sample_gradients",
    "train_categorical", "SequenceToy", "make_sequence", "sequence_objective", "exact_sequence_gradient",
    "token_local_gradient", "sample_sequences", "sequence_sample_gradients",
    "expected_sequence_estimator_gradient", "sequence_estimator_moments", "sequence_log_probs", "prefix_log_probs",
    "as_generator",
]

DTYPE = torch.float64


def as_generator(generator: torch.Generator | int) -> torch.Generator:
    """A ``torch.Generator``: ``generator`` itself, or a fresh CPU generator seeded with the int given."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"pass a torch.Generator or an int seed, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


TEMPERATURES = (0.25, 1e4)
"""The temperatures of the random toys, lowest and highest, within which float64 keeps them exact: OPD+'s
expected gradient has cosine 1 to grad D_f to within 1e-14 for every registry divergence (checked on 100 toys
of 8 and of 1024 tokens). Below, |log u| reaches ~50 and probabilities of e^-50 vanish beside 1 (the cosine
falls to 0.95 at 0.1 and is NaN at 0.001); above, the logits differ by less than the rounding of their sum."""


def _random_logits(shape: tuple[int, ...], generator: torch.Generator, temperature: float) -> torch.Tensor:
    low, high = TEMPERATURES
    if not (isinstance(temperature, (int, float)) and low <= temperature <= high):
        raise UserError(f"temperature must be a number in [{low}, {high:g}] (logits ~ N(0, 1) / temperature; "
                         f"outside, float64 no longer keeps the toy exact), got {temperature!r}")
    return torch.randn(shape, generator=generator, dtype=DTYPE) / temperature


def _score_gradients(A_NT: torch.Tensor, tokens_NT: torch.Tensor, p_student_NTV: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-token REINFORCE gradient w.r.t. logits: ``-A_t (e_{y_t} - pi_theta(.|c_t))``."""
    onehot = torch.nn.functional.one_hot(tokens_NT, p_student_NTV.shape[-1]).to(DTYPE)
    return -A_NT[..., None] * (onehot - p_student_NTV)


# ---------------------------------------------------------------------------------------------------------
# Categorical policy: one context, K tokens.


@dataclass(frozen=True)
class CategoricalToy:
    """A softmax student over K tokens and a fixed teacher.

    Attributes:
        logits_student_K: the student's logits theta (the parameters), float64, shape (K,).
        logp_teacher_K: the teacher's log-probabilities, float64, shape (K,).
    """

    logits_student_K: torch.Tensor
    logp_teacher_K: torch.Tensor

    def __post_init__(self):
        if self.logits_student_K.shape != self.logp_teacher_K.shape or self.logits_student_K.dim() != 1:
            raise UserError(f"student logits and teacher log-probabilities must both have shape (K,), got "
                             f"{tuple(self.logits_student_K.shape)} and {tuple(self.logp_teacher_K.shape)}")

    @property
    def n_tokens(self) -> int:
        return self.logits_student_K.shape[0]

    @property
    def logp_student_K(self) -> torch.Tensor:
        """``log pi_theta = log_softmax(theta)``."""
        return torch.log_softmax(self.logits_student_K, -1)

    @property
    def log_u_K(self) -> torch.Tensor:
        """``log u_a = log pi_T(a) - log pi_theta(a)`` for every token a."""
        return self.logp_teacher_K - self.logp_student_K

    def with_logits(self, logits_student_K: torch.Tensor) -> "CategoricalToy":
        """The same teacher with new student logits (detached)."""
        return CategoricalToy(logits_student_K.detach().clone(), self.logp_teacher_K)


def make_categorical(n_tokens: int = 8, seed: int = 0, temperature: float = 1.0) -> CategoricalToy:
    """A random toy: student and teacher logits drawn independently from N(0, 1) / temperature.

    Lower temperature gives peakier, more different distributions (larger |log u|).
    """
    _positive_int("n_tokens", n_tokens, minimum=2)
    g = as_generator(seed)
    logits_student = _random_logits((n_tokens,), g, temperature)
    logits_teacher = _random_logits((n_tokens,), g, temperature)
    return CategoricalToy(logits_student, torch.log_softmax(logits_teacher, -1))


def exact_gradient(div: Divergence | str, toy: CategoricalToy) -> torch.Tensor:
    """``d D_f(pi_T || pi_theta) / d theta`` by autograd through ``div.exact``; shape (K,)."""
    div = get(div)
    theta = toy.logits_student_K.detach().clone().requires_grad_(True)
    D = div.exact(toy.logp_teacher_K, torch.log_softmax(theta, -1))
    (grad,) = torch.autograd.grad(D, theta)
    return grad


def expected_estimator_gradient(div: Divergence | str, toy: CategoricalToy, method: str) -> torch.Tensor:
    """Exact expectation of the REINFORCE estimator: ``sum_a pi(a) (-A(a)) (e_a - pi)``; shape (K,).

    A = -f(u) for ``"opd"``, w_f(u) for ``"opd_plus"``. A constant added to A changes nothing (sum (e_a - pi)
    weighted by pi is 0), which is why reverse KL's stop-gradient error, the constant u f' = -1, is harmless.
    """
    div = get(div)
    check_method(method)
    with torch.no_grad():
        pi = toy.logp_student_K.exp()
        A = div.advantage(toy.log_u_K, method)
        return -(pi * A) + pi * (pi * A).sum()


def sample_gradients(div: Divergence | str, toy: CategoricalToy, method: str, n_samples: int,
                     generator: torch.Generator | int = 0, baseline: str = "none",
                     group_size: int | None = None) -> torch.Tensor:
    """Per-sample estimator gradients ``g_i = -A_i (e_{a_i} - pi)``, a_i ~ pi_theta iid; shape (N, K).

    Their mean is the REINFORCE gradient of ``opdlab.core.estimators.reinforce_loss`` on the same samples
    (one token per sequence). ``baseline``: ``"none"``, ``"expected"`` (b = sum_a pi(a) A(a), exact) or ``"loo"``
    (b_i = mean of the other samples' advantages, within consecutive groups of ``group_size``, default all).
    """
    div = get(div)
    check_method(method)
    check_baseline(baseline)
    _positive_int("n_samples", n_samples, minimum=2 if baseline == "loo" else 1)
    logp_student = toy.logp_student_K.detach()
    tokens_N1 = torch.multinomial(logp_student.exp(), n_samples, replacement=True,
                                  generator=as_generator(generator))[:, None]
    logp_student_N1V = logp_student.expand(n_samples, 1, -1)
    logp_teacher_N1V = toy.logp_teacher_K.expand(n_samples, 1, -1)
    A_N1 = baselined_advantages(div, logp_student[tokens_N1], toy.logp_teacher_K[tokens_N1], None, method, 0.0,
                                baseline, logp_student_N1V, logp_teacher_N1V, group_size).A_BT
    return _score_gradients(A_N1, tokens_N1, logp_student_N1V.exp())[:, 0, :]


def train_categorical(div: Divergence | str, method: str, toy: CategoricalToy, steps: int = 200,
                      n_samples: int | None = 16, lr: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """Plain gradient descent on the student's logits with the estimator of ``method``.

    Each step draws ``n_samples`` tokens and follows the mean per-sample gradient; ``n_samples=None`` follows
    the estimator's exact expectation instead (no sampling noise: what the estimator does on average).
    Returns a tidy DataFrame, one row per step (0 = before training): step, divergence, method, diverged,
    D_f (the trained divergence), reverse_kl, forward_kl, tv (common yardsticks across divergences). A run
    whose logits overflow (a token's probability reaches 0) ends there with diverged = True and infinite D_f.
    """
    div = get(div)
    check_method(method)
    _positive_int("steps", steps, minimum=0)
    if n_samples is not None:
        _positive_int("n_samples", n_samples)
    g = as_generator(seed)
    rows, current = [], toy
    yardsticks = {name: get(name) for name in ("reverse_kl", "forward_kl", "tv")}
    for step in range(steps + 1):
        logp_s, logp_t = current.logp_student_K, current.logp_teacher_K
        finite = bool(torch.isfinite(logp_s).all())
        measure = {k: float(d.exact(logp_t, logp_s)) if finite else float("inf")
                   for k, d in dict(D_f=div, **yardsticks).items()}
        rows.append(dict(step=step, divergence=div.name, method=method, diverged=not finite, **measure))
        if step == steps or not finite:  # the student put zero mass on a token: the run has blown up
            break
        if n_samples is None:
            grad = expected_estimator_gradient(div, current, method)
        else:
            grad = sample_gradients(div, current, method, n_samples, g).mean(0)
        current = current.with_logits(current.logits_student_K - lr * grad)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Tabular autoregressive policy: logits per prefix, all V^H sequences enumerable.


@functools.lru_cache(maxsize=16)
def _tree(vocab_size: int, horizon: int):
    """Enumeration of the prefix tree, breadth-first.

    Returns (tokens_SH, nodes_SH, depth_N, representative_N): every sequence, the node id of its context at
    each step (node of prefix y_<t = (V^t - 1)/(V - 1) + base-V code of y_<t), each node's depth, and one
    sequence passing through each node.
    """
    V, H = vocab_size, horizon
    S = V ** H
    s = torch.arange(S)
    powers = V ** torch.arange(H - 1, -1, -1)
    tokens_SH = (s[:, None] // powers) % V
    offsets = torch.tensor([(V ** t - 1) // (V - 1) for t in range(H)])
    codes_SH = s[:, None] // (V ** torch.arange(H, 0, -1))  # code of the prefix y_<t: the leading t digits
    nodes_SH = offsets + codes_SH
    n_nodes = int(offsets[-1]) + V ** (H - 1)
    depth_N = torch.bucketize(torch.arange(n_nodes), offsets, right=True) - 1
    representative_N = torch.empty(n_nodes, dtype=torch.long)
    for t in range(H):  # a loop over depth, not over samples
        representative_N[nodes_SH[:, t]] = s
    return tokens_SH, nodes_SH, depth_N, representative_N


@dataclass(frozen=True)
class SequenceToy:
    """A tabular autoregressive student (one row of logits per prefix) and a fixed tabular teacher.

    Attributes:
        logits_student_NV: student logits, one row per prefix node (all prefixes of length < H, breadth-first:
            row 0 is the empty prefix), float64, shape (N, V) with N = (V^H - 1) / (V - 1).
        logp_teacher_NV: teacher log-probabilities per prefix node, same shape.
        horizon: H, the length of every sequence.
    """

    logits_student_NV: torch.Tensor
    logp_teacher_NV: torch.Tensor
    horizon: int

    def __post_init__(self):
        V, H = self.logits_student_NV.shape[-1], self.horizon
        n_nodes = (V ** H - 1) // (V - 1) if V > 1 else H
        if self.logits_student_NV.shape != (n_nodes, V) or self.logp_teacher_NV.shape != (n_nodes, V):
            raise UserError(f"a tabular policy with vocabulary {V} and horizon {H} needs ({n_nodes}, {V}) "
                             f"logits, got {tuple(self.logits_student_NV.shape)} and "
                             f"{tuple(self.logp_teacher_NV.shape)}")

    @property
    def vocab_size(self) -> int:
        return self.logits_student_NV.shape[-1]

    @property
    def logp_student_NV(self) -> torch.Tensor:
        return torch.log_softmax(self.logits_student_NV, -1)

    @property
    def tree(self):
        """``(tokens_SH, nodes_SH, depth_N, representative_N)``, see ``_tree``."""
        return _tree(self.vocab_size, self.horizon)

    def with_logits(self, logits_student_NV: torch.Tensor) -> "SequenceToy":
        return SequenceToy(logits_student_NV.detach().clone(), self.logp_teacher_NV, self.horizon)


def make_sequence(vocab_size: int = 3, horizon: int = 4, seed: int = 0, temperature: float = 1.0) -> SequenceToy:
    """A random tabular toy: every prefix's student and teacher logits drawn from N(0, 1) / temperature."""
    _positive_int("vocab_size", vocab_size, minimum=2)
    _positive_int("horizon", horizon)
    if vocab_size ** horizon > 200_000:
        raise UserError(f"vocab_size^horizon = {vocab_size ** horizon} sequences is too many to enumerate; "
                         "keep it under 200000")
    n_nodes = (vocab_size ** horizon - 1) // (vocab_size - 1)
    g = as_generator(seed)
    logits_student = _random_logits((n_nodes, vocab_size), g, temperature)
    logits_teacher = _random_logits((n_nodes, vocab_size), g, temperature)
    return SequenceToy(logits_student, torch.log_softmax(logits_teacher, -1), horizon)


def prefix_log_probs(logp_student_NV: torch.Tensor, toy: SequenceToy) -> torch.Tensor:
    """Log-probability of reaching every prefix node, differentiable through ``logp_student_NV``; shape (N,).

    For the node c = y_<t (depth t), ``log P_theta(c) = sum_{s<t} log pi_theta(y_s | y_<s)``, read off the
    rows of ``logp_student_NV`` (log pi_theta(. | node), shape (N, V) like ``toy.logits_student_NV``) along
    the prefix's path in ``toy.tree``; the root (t = 0) has ``log P_theta = 0``.
    """
    if tuple(logp_student_NV.shape) != tuple(toy.logits_student_NV.shape):
        raise UserError(f"logp_student_NV must have the toy's shape (N, V) = {tuple(toy.logits_student_NV.shape)}, "
                         f"got {tuple(logp_student_NV.shape)}")
    tokens_SH, nodes_SH, depth_N, rep_N = toy.tree
    logp_SH = logp_student_NV[nodes_SH, tokens_SH]
    before_SH = torch.cumsum(logp_SH, -1) - logp_SH  # sum_{s<t}
    return before_SH[rep_N, depth_N]


def sequence_objective(div: Divergence | str, toy: SequenceToy, logits_student_NV: torch.Tensor | None = None,
                       detach_prefix: bool = False) -> torch.Tensor:
    """``J = sum_c P_theta(c) D_f(c) = E_y[sum_t f(u_t)]``; with ``detach_prefix`` P_theta(c) is held fixed."""
    div = get(div)
    logits = toy.logits_student_NV if logits_student_NV is None else logits_student_NV
    logp_student = torch.log_softmax(logits, -1)
    P_N = prefix_log_probs(logp_student, toy).exp()
    if detach_prefix:
        P_N = P_N.detach()
    return (P_N * div.exact(toy.logp_teacher_NV, logp_student)).sum()


def _objective_gradient(div, toy: SequenceToy, detach_prefix: bool) -> torch.Tensor:
    theta = toy.logits_student_NV.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_objective(div, toy, theta, detach_prefix), theta)
    return grad.reshape(-1)


def exact_sequence_gradient(div: Divergence | str, toy: SequenceToy) -> torch.Tensor:
    """``grad J`` for the sequence objective, flattened to shape (N * V,). The gamma = 1 estimator's target."""
    return _objective_gradient(div, toy, detach_prefix=False)


def token_local_gradient(div: Divergence | str, toy: SequenceToy) -> torch.Tensor:
    """``sum_c P_theta(c) grad D_f(c)`` with P_theta held fixed; shape (N * V,). The gamma = 0 target."""
    return _objective_gradient(div, toy, detach_prefix=True)


def sequence_log_probs(toy: SequenceToy) -> torch.Tensor:
    """Student log-probability of every enumerated sequence, shape (S,) with S = V^H."""
    tokens_SH, nodes_SH, _, _ = toy.tree
    return toy.logp_student_NV.detach()[nodes_SH, tokens_SH].sum(-1)


def sample_sequences(toy: SequenceToy, n_samples: int, generator: torch.Generator | int = 0) -> torch.Tensor:
    """Indices (into the enumeration) of ``n_samples`` sequences drawn iid from the student; shape (n,)."""
    _positive_int("n_samples", n_samples)
    return torch.multinomial(sequence_log_probs(toy).exp(), n_samples, replacement=True,
                             generator=as_generator(generator))


def _gradients_of(div, toy: SequenceToy, index_n: torch.Tensor, method: str, gamma: float, baseline,
                  group_size=None):
    """Per-sequence estimator gradients for the enumerated sequences ``index_n``; shape (n, N * V)."""
    tokens_SH, nodes_SH, _, _ = toy.tree
    tokens_nT, nodes_nT = tokens_SH[index_n], nodes_SH[index_n]
    logp_student_NV = toy.logp_student_NV.detach()
    logp_student_nTV, logp_teacher_nTV = logp_student_NV[nodes_nT], toy.logp_teacher_NV[nodes_nT]
    logp_student_nT, logp_teacher_nT = logp_student_NV[nodes_nT, tokens_nT], toy.logp_teacher_NV[nodes_nT, tokens_nT]
    A_nT = baselined_advantages(div, logp_student_nT, logp_teacher_nT, None, method, gamma, baseline,
                                logp_student_nTV, logp_teacher_nTV, group_size).A_BT
    terms_nTV = _score_gradients(A_nT, tokens_nT, logp_student_nTV.exp())
    n = index_n.shape[0]
    grad_nNV = torch.zeros((n,) + tuple(logp_student_NV.shape), dtype=DTYPE)
    grad_nNV[torch.arange(n)[:, None], nodes_nT] = terms_nTV  # one node per depth: no index repeats in a row
    return grad_nNV.reshape(n, -1)


def sequence_sample_gradients(div: Divergence | str, toy: SequenceToy, method: str, n_samples: int,
                              gamma: float = 0.0, baseline: str = "none",
                              generator: torch.Generator | int = 0, group_size: int | None = None) -> torch.Tensor:
    """Per-sample gradients ``g_i = -sum_t A_it grad log pi_theta(y_it|c_it)`` (w.r.t. the flattened
    logits), with ``A`` from ``estimators.baselined_advantages(..., gamma, baseline)``; shape (n, N * V).

    E[g] is ``exact_sequence_gradient`` at gamma = 1 and ``token_local_gradient`` at gamma = 0 (for
    ``opd_plus``; any baseline). ``group_size``: leave-one-out within consecutive groups of that many samples.
    """
    div = get(div)
    check_method(method)
    check_baseline(baseline)
    _positive_int("n_samples", n_samples, minimum=2 if baseline == "loo" else 1)
    return _gradients_of(div, toy, sample_sequences(toy, n_samples, generator), method, gamma, baseline,
                         group_size)


def sequence_estimator_moments(div: Divergence | str, toy: SequenceToy, method: str, gamma: float = 0.0,
                               baseline: str = "none") -> tuple[torch.Tensor, float]:
    """Exact mean ``E_y[g(y)] = sum_y P_theta(y) g(y)`` (shape (N * V,)) and per-sample variance
    ``tr Cov(g) = sum_y P_theta(y) ||g(y) - E g||^2``, by enumerating every sequence.

    ``baseline`` is ``"none"`` or ``"expected"`` (it depends only on the context, so the mean is unchanged); the
    leave-one-out baseline is built from other samples and has no per-sequence value, so it is refused here.
    """
    div = get(div)
    check_method(method)
    check_baseline(baseline)
    if baseline == "loo":
        raise UserError("the leave-one-out baseline depends on the other samples; its exact mean is that of "
                         "baseline='none', and its variance needs sampling (sequence_sample_gradients)")
    P_S = sequence_log_probs(toy).exp()
    grads_SD = _gradients_of(div, toy, torch.arange(P_S.shape[0]), method, gamma, baseline)
    mean_D = P_S @ grads_SD
    return mean_D, float(P_S @ (grads_SD - mean_D).pow(2).sum(-1))


def expected_sequence_estimator_gradient(div: Divergence | str, toy: SequenceToy, method: str,
                                         gamma: float = 0.0, baseline: str = "none") -> torch.Tensor:
    """Exact ``E_y[g(y)]`` by enumeration: ``sum_y P_theta(y) g(y)``; shape (N * V,).

    Baselines that depend only on the context leave it unchanged; the leave-one-out baseline, built from
    other samples, is unbiased too, so its expectation is that of ``baseline="none"``.
    """
    baseline = "none" if baseline == "loo" else baseline
    return sequence_estimator_moments(div, toy, method, gamma, baseline)[0]
