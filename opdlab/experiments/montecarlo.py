"""Monte Carlo studies on the enumerable toys of ``opdlab.exact.toy``: tidy DataFrames, one row per setting.

Every stochastic number here has an exact counterpart (``opdlab.exact.toy`` computes both), so a study reports
the sampled estimator against the truth:

* ``categorical_study``: per divergence x method x number of samples n, the n-sample estimate
  ``g_hat = (1/n) sum_i g_i`` over ``n_repeats`` independent repeats: bias ``||mean g_hat - grad D_f||``,
  the exact bias ``||E[g] - grad D_f||``, RMSE ``sqrt(mean ||g_hat - grad D_f||^2)``, relative error
  RMSE / ``||grad D_f||``, mean cosine of g_hat to grad D_f, and the per-sample variance ``tr Cov(g_i)``.
  Stop-gradient OPD keeps an error that more samples do not remove; OPD+'s falls like 1/sqrt(n)
  (OPD+ paper, arXiv 2606.01039, Sec. 3).
* ``estimator_cosines``: the cosine of the estimator's exact expectation to grad D_f over many random toys.
* ``sequence_study``: per divergence x method x gamma x baseline on a tabular autoregressive toy: exact bias
  against the sequence gradient and against the token-local gradient, RMSE of n-sample estimates, and
  per-sample variance: the bias/variance trade-off of gamma.
* ``training_study``: ``train_categorical`` for every divergence x method, concatenated.
* ``bias_claims``: which estimators of a ``categorical_study`` are unbiased, tested on its samples
  (``opdlab.experiments.stats.bias_claims``), so that a notebook's claim can fail.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import pandas as pd
import torch

from opdlab.config.choices import METHODS, REPRESENTATIVE_DIVERGENCES
from opdlab.core.divergences import get
from opdlab.errors import UserError
from opdlab.exact.toy import (as_generator, exact_gradient, exact_sequence_gradient, expected_estimator_gradient,
                              make_categorical, make_sequence, sample_gradients, sequence_estimator_moments,
                              sequence_sample_gradients, token_local_gradient, train_categorical)
from opdlab.experiments import stats

__all__ = ["DIVERGENCES", "categorical_study", "estimator_cosines", "sequence_study", "training_study",
           "summarise_estimates", "cosine", "bias_claims"]

DIVERGENCES = REPRESENTATIVE_DIVERGENCES


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``a`` (or ``a`` itself) to the vector ``b``, along the last axis."""
    return torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1)


def summarise_estimates(estimates_RD: torch.Tensor, target_D: torch.Tensor) -> dict:
    """Bias, RMSE, relative error and mean cosine of R estimates (rows) of the vector ``target_D``."""
    err_RD = estimates_RD - target_D
    rmse = float(err_RD.pow(2).sum(-1).mean().sqrt())
    return dict(bias=float(err_RD.mean(0).norm()), rmse=rmse, relative_error=rmse / float(target_D.norm()),
                cosine=float(cosine(estimates_RD, target_D).mean()))


def _per_sample_variance(g_ND: torch.Tensor) -> float:
    """``tr Cov(g)``: the summed per-coordinate variance of single-sample gradients."""
    return float(g_ND.var(0).sum())


def _sample_counts(n_samples: Iterable[int]) -> list[int]:
    counts = sorted({int(n) for n in n_samples})
    if not counts or counts[0] < 1:
        raise UserError(f"sample counts must be positive integers, got {list(n_samples)!r}")
    return counts


def categorical_study(divergences: Sequence[str] = DIVERGENCES, methods: Sequence[str] = METHODS,
                      n_samples: Iterable[int] = (1, 4, 16, 64, 256, 1024), n_repeats: int = 200,
                      n_tokens: int = 8, n_toys: int = 1, seed: int = 0, temperature: float = 1.0) -> pd.DataFrame:
    """Error of the n-sample REINFORCE estimate of grad D_f, for each n in ``n_samples``.

    For each toy (seeds ``seed, seed + 1, ...``), divergence and method, draws ``n_repeats x max(n)`` samples
    once; the estimate with n samples is the mean of the first n of each repeat. Columns: toy_seed, divergence,
    method, n_samples, bias, bias_exact, rmse, relative_error, cosine, cosine_exact (of E[g]), variance
    (per sample), exact_norm.
    """
    counts = _sample_counts(n_samples)
    rows = []
    for toy_seed in range(seed, seed + n_toys):
        toy = make_categorical(n_tokens, toy_seed, temperature)
        g = as_generator(toy_seed)
        for name in divergences:
            div = get(name)
            exact = exact_gradient(div, toy)
            for method in methods:
                expected = expected_estimator_gradient(div, toy, method)
                g_RnK = sample_gradients(div, toy, method, n_repeats * counts[-1], g).reshape(n_repeats, counts[-1], -1)
                running_RnK = g_RnK.cumsum(1)
                common = dict(toy_seed=toy_seed, divergence=div.name, method=method,
                              bias_exact=float((expected - exact).norm()),
                              cosine_exact=float(cosine(expected, exact)),
                              variance=_per_sample_variance(g_RnK.reshape(-1, g_RnK.shape[-1])),
                              exact_norm=float(exact.norm()))
                for n in counts:
                    rows.append(dict(common, n_samples=n, **summarise_estimates(running_RnK[:, n - 1] / n, exact)))
    cols = ["toy_seed", "divergence", "method", "n_samples", "bias", "bias_exact", "rmse", "relative_error",
            "cosine", "cosine_exact", "variance", "exact_norm"]
    return pd.DataFrame(rows)[cols]


def estimator_cosines(divergences: Sequence[str] = DIVERGENCES, methods: Sequence[str] = METHODS,
                      n_toys: int = 100, n_tokens: int = 8, seed: int = 0, temperature: float = 1.0) -> pd.DataFrame:
    """``cos(E[g], grad D_f)`` on ``n_toys`` random categorical toys, exact (no sampling).

    Columns: toy_seed, divergence, method, cosine, relative_bias (``||E[g] - grad D_f|| / ||grad D_f||``).
    """
    rows = []
    for toy_seed in range(seed, seed + n_toys):
        toy = make_categorical(n_tokens, toy_seed, temperature)
        for name in divergences:
            div = get(name)
            exact = exact_gradient(div, toy)
            for method in methods:
                expected = expected_estimator_gradient(div, toy, method)
                rows.append(dict(toy_seed=toy_seed, divergence=div.name, method=method,
                                 cosine=float(cosine(expected, exact)),
                                 relative_bias=float((expected - exact).norm() / exact.norm())))
    return pd.DataFrame(rows)


def sequence_study(divergences: Sequence[str] = ("reverse_kl", "forward_kl", "jsd"),
                   methods: Sequence[str] = METHODS, gammas: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                   baselines: Sequence[str] = ("none", "expected", "loo"), n_samples: int = 16,
                   n_repeats: int = 200, vocab_size: int = 3, horizon: int = 4, seed: int = 0,
                   temperature: float = 1.0) -> pd.DataFrame:
    """Bias and variance of the sequence estimator as gamma goes from 0 (token-local) to 1 (exact).

    Exact columns (by enumeration): bias_sequence = ``||E[g] - grad J||``, bias_token_local =
    ``||E[g] - grad J_local||``, cosine_sequence = ``cos(E[g], grad J)``. Sampled columns: rmse_sequence and
    relative_error of n-sample estimates over ``n_repeats`` repeats (leave-one-out within each group of n);
    variance = per-sample ``tr Cov`` of the terms whose mean is the estimate (sampled), variance_exact = the
    same by enumeration (NaN for leave-one-out, which has no per-sequence value). ``baselines`` holds names
    of ``opdlab.config.choices.BASELINES`` ("none", "expected", "loo"), written as given in the ``baseline`` column.
    """
    toy = make_sequence(vocab_size, horizon, seed, temperature)
    g = as_generator(seed)
    rows = []
    for name in divergences:
        div = get(name)
        exact_seq, exact_local = exact_sequence_gradient(div, toy), token_local_gradient(div, toy)
        for method in methods:
            for gamma in gammas:
                expected, variance_none = sequence_estimator_moments(div, toy, method, gamma)
                for baseline in baselines:
                    variance_exact = {"none": variance_none, "loo": float("nan")}.get(baseline)
                    if variance_exact is None:
                        variance_exact = sequence_estimator_moments(div, toy, method, gamma, baseline)[1]
                    g_N = sequence_sample_gradients(div, toy, method, n_repeats * n_samples, gamma, baseline, g,
                                                    group_size=n_samples if baseline == "loo" else None)
                    est_RD = g_N.reshape(n_repeats, n_samples, -1).mean(1)
                    mc = summarise_estimates(est_RD, exact_seq)
                    rows.append(dict(divergence=div.name, method=method, gamma=float(gamma),
                                     baseline=baseline, n_samples=n_samples,
                                     bias_sequence=float((expected - exact_seq).norm()),
                                     bias_token_local=float((expected - exact_local).norm()),
                                     cosine_sequence=float(cosine(expected, exact_seq)),
                                     rmse_sequence=mc["rmse"], relative_error=mc["relative_error"],
                                     variance=_per_sample_variance(g_N), variance_exact=variance_exact,
                                     exact_norm=float(exact_seq.norm())))
    return pd.DataFrame(rows)


def training_study(divergences: Sequence[str] = ("reverse_kl", "forward_kl", "jsd"),
                   methods: Sequence[str] = METHODS, steps: int = 200, n_samples: int | None = 16,
                   lr: float = 0.5, n_tokens: int = 8, seed: int = 0, temperature: float = 1.0) -> pd.DataFrame:
    """Toy training (``opdlab.exact.toy.train_categorical``) of the same random student for each divergence x method."""
    toy = make_categorical(n_tokens, seed, temperature)
    frames = [train_categorical(name, method, toy, steps, n_samples, lr, seed)
              for name in divergences for method in methods]
    return pd.concat(frames, ignore_index=True)


def bias_claims(study: pd.DataFrame, n_repeats: int, unbiased: Callable[[pd.DataFrame], "pd.Series"],
                alpha: float = 0.05) -> pd.DataFrame:
    """Test the claim ``unbiased(rows)`` (True: E[g] = grad D_f; False: biased) for every toy x divergence x
    method of a ``categorical_study``, on all its draws: at the largest n the estimate is the mean of
    K = n_repeats * n samples, its offset ``bias = ||mean - grad D_f||`` and its standard error
    ``sqrt(variance / K)`` (``variance`` = per-sample tr Cov). ``opdlab.experiments.stats.bias_claims`` gives p, Holm
    within each family of claims, and ``holds``; rows also carry toy_seed, divergence, method, n_draws.
    """
    last = study[study.n_samples == study.n_samples.max()].reset_index(drop=True)
    k = int(n_repeats) * int(last.n_samples.iloc[0])
    claims = stats.bias_claims(last.divergence + " " + last.method, last.bias, (last.variance / k) ** 0.5, k,
                               unbiased(last), alpha)
    frame = pd.concat([last[["toy_seed", "divergence", "method"]], claims.drop(columns="name")], axis=1)
    return frame.assign(n_draws=k)
