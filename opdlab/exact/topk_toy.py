"""OPD+ from a top-k teacher (``opdlab.core.sparse``) on the enumerable toys of ``opdlab.exact.toy``: exact means and
variances, next to one-sample OPD+, the full-vocabulary method and the peers' sparse forms.

Every number is computed by enumerating the student's samples, never by sampling:

* categorical toy, one context: the estimator's gradient w.r.t. the logits for sample y is
  ``g(y) = d - A_y (e_y - pi)`` with d the exact part on S (the same for every y). Its mean is
  ``d - v``, ``v = pi * A - pi (pi . A)``, and its variance
  ``tr Cov g = sum_y pi_y A_y^2 (1 - 2 pi_y + ||pi||^2) - ||v||^2``.
* sequence toy: the surrogate ``sparse.sparse_loss`` of every one of the V^H sequences, differentiated by
  autograd w.r.t. its own copy of the logits, weighted by the sequence's probability.

The relative variance is ``E||g - grad||^2 / ||grad||^2`` for one sample (its variance plus its squared bias,
over the squared norm of the target); the relative bias is ``||E g - grad|| / ||grad||``.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from opdlab.core.divergences import Divergence, get
from opdlab.core.estimators import full_vocabulary_loss
from opdlab.core.sparse import PEER_FORMS, TopK, sparse_loss, sparse_terms, topk_payload
from opdlab.errors import UserError
from opdlab.exact.toy import (CategoricalToy, SequenceToy, as_generator, exact_gradient, expected_estimator_gradient,
                              make_categorical, make_sequence, sequence_estimator_moments, sequence_log_probs,
                              token_local_gradient)

__all__ = ["make_near_teacher", "categorical_topk_moments", "categorical_peer_gradient", "sequence_topk_moments",
           "sequence_topk_payload", "topk_table", "sequence_topk_table", "TOPK_COLUMNS"]

TOPK_COLUMNS = ("toy", "divergence", "k", "method", "baseline", "teacher_mass", "cosine", "relative_bias",
                "relative_variance")
"""The tidy table of ``topk_table`` (and of ``opdlab toy --teacher-topk K --csv``), one row per toy x
divergence x estimator."""


def _score_moments(d_K: torch.Tensor, A_K: torch.Tensor, pi_K: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean and ``tr Cov`` of ``g(y) = d - A_y (e_y - pi)``, y ~ pi, over the K tokens (module doc)."""
    v = pi_K * A_K - pi_K * (pi_K @ A_K)
    variance = pi_K @ (A_K.pow(2) * (1.0 - 2.0 * pi_K + pi_K @ pi_K)) - v @ v
    return d_K - v, float(variance.clamp_min(0.0))


def _every_token(toy: CategoricalToy, k: int):
    """The toy as a batch of K one-token sequences, sequence y sampling token y: student log-probabilities
    (K, 1, K), tokens (K, 1) and the top-k payload of the teacher (the same support in every row)."""
    K = toy.n_tokens
    tokens_K1 = torch.arange(K)[:, None]
    payload = topk_payload(toy.logp_teacher_K.expand(K, 1, K), tokens_K1, k)
    return toy.logp_student_K.detach().expand(K, 1, K), tokens_K1, payload


def categorical_topk_moments(div: Divergence | str, toy: CategoricalToy, k: int, baseline: str = "none",
                             log_u_clip: float | None = None) -> tuple[torch.Tensor, float]:
    """Exact ``E[g]`` (shape (K,)) and ``tr Cov(g)`` of ``sparse.sparse_loss``'s gradient w.r.t. the logits on
    a categorical toy with the teacher's top-``k`` support, for baseline ``"none"`` or ``"tail"``."""
    ls_K1K, tokens_K1, payload = _every_token(toy, k)
    terms = sparse_terms(div, ls_K1K, tokens_K1, payload, None, 0.0, baseline, None, log_u_clip)
    pi = ls_K1K[0, 0].exp()
    ids, weight = payload.ids_BTK[0, 0], terms.weight_BTK[0, 0]
    d = weight.sum() * pi  # the exact part, -sum_{a in S} c_a (e_a - pi)
    d = d.index_add(0, ids, -weight)
    return _score_moments(d, terms.A_BT[:, 0], pi)


def categorical_peer_gradient(div: Divergence | str, toy: CategoricalToy, k: int, form: str) -> torch.Tensor:
    """``grad`` w.r.t. the logits of the peer's sparse form ``form`` (a key of ``sparse.PEER_FORMS``) on the
    teacher's top-``k``: deterministic given the context, so it is its own expectation."""
    theta = toy.logits_student_K.detach().clone().requires_grad_(True)
    payload = topk_payload(toy.logp_teacher_K[None, None], torch.zeros(1, 1, dtype=torch.long), k)
    D = PEER_FORMS[form](div, torch.log_softmax(theta, -1)[None, None], payload).sum()
    (grad,) = torch.autograd.grad(D, theta)
    return grad


def _full_vocabulary_gradient(div, toy: CategoricalToy) -> torch.Tensor:
    theta = toy.logits_student_K.detach().clone().requires_grad_(True)
    loss = full_vocabulary_loss(div, torch.log_softmax(theta, -1)[None, None], toy.logp_teacher_K[None, None])
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def _row(toy_id, div, k, method, baseline, mass, mean, variance, target) -> dict:
    norm2 = float(target @ target)
    bias2 = float((mean - target) @ (mean - target))
    return dict(toy=toy_id, divergence=div.name, k=k, method=method, baseline=baseline, teacher_mass=mass,
                cosine=float(torch.nn.functional.cosine_similarity(mean, target, dim=0)),
                relative_bias=bias2 ** 0.5 / norm2 ** 0.5, relative_variance=(variance + bias2) / norm2)


def make_near_teacher(n_tokens: int, seed: int, temperature: float = 0.3,
                      student_noise: float | None = 1.0) -> CategoricalToy:
    """A categorical toy whose student is near its teacher, as a student is once distillation is under way:
    teacher logits z ~ N(0, 1) / temperature, student logits z + N(0, student_noise^2). ``student_noise`` None
    draws the two independently instead (``toy.make_categorical``), which puts most of the student's mass
    outside the teacher's top-k."""
    if student_noise is None:
        return make_categorical(n_tokens, seed, temperature)
    if not student_noise >= 0:
        raise UserError(f"student_noise must be a number >= 0 (or None), got {student_noise!r}")
    teacher = make_categorical(n_tokens, seed, temperature)  # validates; its student row is discarded
    noise = torch.randn(n_tokens, generator=as_generator(seed + 1_000_003), dtype=teacher.logp_teacher_K.dtype)
    return CategoricalToy(teacher.logp_teacher_K + student_noise * noise, teacher.logp_teacher_K)



def _check_k(k, n_tokens: int) -> None:
    """A ``UserError`` unless ``k`` is an integer in [1, n_tokens - 1]: the support must leave a tail."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n_tokens:
        raise UserError(f"teacher top-k must be an integer in [1, {n_tokens - 1}] (below the toy's "
                        f"{n_tokens} tokens), got {k!r}")

def topk_table(divergences: Sequence[str], k: int, n_toys: int = 20, n_tokens: int = 2000, seed: int = 0,
               temperature: float = 0.3, student_noise: float | None = 1.0) -> pd.DataFrame:
    """Exact cosine, relative bias and relative variance of each estimator of grad D_f on ``n_toys`` random
    categorical toys (``make_near_teacher``, seeds ``seed``, ``seed + 1``, ...) with the teacher's top-``k``
    as the support.

    Methods: ``opd_plus`` (one sample, the dense estimator), ``full_vocabulary``, ``sparse`` (baselines
    ``none`` and ``tail``) and the peers' forms of ``sparse.PEER_FORMS``. ``teacher_mass`` is Q_S. Returns a
    tidy DataFrame with the columns ``TOPK_COLUMNS``.
    """
    _check_k(k, n_tokens)
    rows, divs = [], [get(name) for name in divergences]
    for toy_id in range(seed, seed + n_toys):
        toy = make_near_teacher(n_tokens, toy_id, temperature, student_noise)
        mass = float(toy.logp_teacher_K.topk(k).values.exp().sum())
        pi = toy.logp_student_K.exp()
        for div in divs:
            target = exact_gradient(div, toy)
            A = div.opd_plus_advantage(toy.log_u_K)
            dense_var = _score_moments(torch.zeros_like(pi), A, pi)[1]
            rows.append(_row(toy_id, div, k, "opd_plus", "none", mass,
                             expected_estimator_gradient(div, toy, "opd_plus"), dense_var, target))
            rows.append(_row(toy_id, div, k, "full_vocabulary", "none", mass, _full_vocabulary_gradient(div, toy),
                             0.0, target))
            for baseline in ("none", "tail"):
                rows.append(_row(toy_id, div, k, "sparse", baseline, mass,
                                 *categorical_topk_moments(div, toy, k, baseline), target))
            for form in PEER_FORMS:
                rows.append(_row(toy_id, div, k, form, "none", mass, categorical_peer_gradient(div, toy, k, form),
                                 0.0, target))
    return pd.DataFrame(rows, columns=list(TOPK_COLUMNS))


# ---------------------------------------------------------------------------------------------------------
# Sequence toy: every sequence enumerated, each differentiated through the real surrogate.


def sequence_topk_payload(toy: SequenceToy, k: int, index_n: torch.Tensor | None = None) -> TopK:
    """The teacher's top-``k`` payload along the enumerated sequences ``index_n`` (default all)."""
    tokens_SH, nodes_SH, _, _ = toy.tree
    index_n = torch.arange(tokens_SH.shape[0]) if index_n is None else index_n
    return topk_payload(toy.logp_teacher_NV[nodes_SH[index_n]], tokens_SH[index_n], k)


def _sequence_moments(toy: SequenceToy, loss_of) -> tuple[torch.Tensor, float]:
    """Exact mean and ``tr Cov`` over sequences of the gradient of ``loss_of(logp_SHV, tokens_SH)`` (a loss with
    the ``"sequence"`` reduction, over every enumerated sequence): each sequence gets its own copy of the
    logits, so one backward pass gives every per-sequence gradient."""
    tokens_SH, nodes_SH, _, _ = toy.tree
    n_seq = tokens_SH.shape[0]
    theta_SNV = toy.logits_student_NV.detach().expand(n_seq, -1, -1).clone().requires_grad_(True)
    logp_SHV = torch.log_softmax(theta_SNV, -1)[torch.arange(n_seq)[:, None], nodes_SH]
    (grad_SNV,) = torch.autograd.grad(loss_of(logp_SHV, tokens_SH) * n_seq, theta_SNV)  # a mean over sequences
    grads_SD = grad_SNV.reshape(n_seq, -1)
    P_S = sequence_log_probs(toy).exp()
    mean_D = P_S @ grads_SD
    return mean_D, float(P_S @ (grads_SD - mean_D).pow(2).sum(-1))


def sequence_topk_moments(div: Divergence | str, toy: SequenceToy, k: int, gamma: float = 0.0,
                          baseline: str = "none", log_u_clip: float | None = None) -> tuple[torch.Tensor, float]:
    """Exact ``E_y[g(y)]`` (shape (N * V,)) and ``tr Cov(g)`` of the gradient of ``sparse.sparse_loss`` for one
    sequence y, by enumerating every sequence. E[g] is ``token_local_gradient`` at gamma = 0 and
    ``exact_sequence_gradient`` at gamma = 1 (the ``"sequence"`` reduction)."""
    payload = sequence_topk_payload(toy, k)
    return _sequence_moments(toy, lambda logp_SHV, tokens_SH: sparse_loss(
        div, logp_SHV, tokens_SH, payload, None, gamma, baseline, None, log_u_clip, "sequence"))


def sequence_topk_table(divergences: Sequence[str], k: int, n_toys: int = 5, vocab_size: int = 40,
                        horizon: int = 2, seed: int = 0, temperature: float = 0.5) -> pd.DataFrame:
    """``topk_table`` on random sequence toys (``toy.make_sequence``) at gamma = 0, against the token-local
    gradient: there the full-vocabulary method keeps the variance of the contexts it visits. One-sample OPD+
    is the dense path (``toy.sequence_estimator_moments``); the peers' forms are summed over visited contexts
    and differentiated as a loss. ``teacher_mass`` is Q_S averaged over prefixes."""
    _check_k(k, vocab_size)
    rows, divs = [], [get(name) for name in divergences]
    for toy_id in range(seed, seed + n_toys):
        toy = make_sequence(vocab_size, horizon, toy_id, temperature)
        mass = float(toy.logp_teacher_NV.topk(k, -1).values.exp().sum(-1).mean())
        payload = sequence_topk_payload(toy, k)
        for div in divs:
            target = token_local_gradient(div, toy)

            def add(method, baseline, moments):
                rows.append(_row(toy_id, div, k, method, baseline, mass, *moments, target))

            add("opd_plus", "none", sequence_estimator_moments(div, toy, "opd_plus", 0.0, "none"))
            add("full_vocabulary", "none", _sequence_moments(toy, lambda ls, tokens: full_vocabulary_loss(
                div, ls, toy.logp_teacher_NV[toy.tree[1]], None, "sequence")))
            for baseline in ("none", "tail"):
                add("sparse", baseline, sequence_topk_moments(div, toy, k, 0.0, baseline))
            for form, peer in PEER_FORMS.items():
                add(form, "none", _sequence_moments(toy, lambda ls, tokens: peer(div, ls, payload).sum(-1).mean()))
    return pd.DataFrame(rows, columns=list(TOPK_COLUMNS))
