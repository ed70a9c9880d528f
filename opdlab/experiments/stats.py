"""Comparing arms on per-item evaluation records, and testing a Monte Carlo mean against its exact value.

Input is tidy: one row per held-out item per run, with columns ``arm``, ``seed``, ``item`` and ``correct``
(0/1), optionally ``task``. Every arm of a task is evaluated on the same items, so arms are compared *paired*
on items, with seeds (training randomness) as a second, crossed source of noise. For the difference of two
arms, ``d_si = c_A,si - c_B,si`` over S seeds and n items,

    Var(Delta_hat) = sigma2_seed / S + sigma2_item / n + sigma2_resid / (S n)

(``variance_components`` estimates the three terms by two-way ANOVA). The pieces, each from the field's
libraries (Miller, "Adding Error Bars to Evals", arXiv 2411.00640):

* ``wilson``/``accuracies``: the Wilson interval of one run's accuracy (statsmodels ``proportion_confint``).
* ``paired_test``: Delta_hat, its interval and p from a linear GLM ``c ~ arm`` with cluster-robust standard
  errors, clustered two-way by seed and by item (statsmodels, ``cov_type="cluster"``), referred to a t with
  S - 1 degrees of freedom; one seed clusters by item only (a paired test over items). ``logistic=True``
  fits the logistic GLM with the same clusters (a p-value on the log-odds scale).
* ``mcnemar_by_seed``: the exact McNemar test within each seed (statsmodels).
* ``bootstrap_means``/``gap_closed``: a hierarchical bootstrap (seeds with replacement; items with replacement,
  the same items for every arm and seed, since items are crossed with seeds here: this departs from nesting
  items within seeds), and the interval of the fraction of the warm-up -> teacher gap closed,
  ``(A - W) / (T - W)``, with W and T resampled on the same items as A.
* ``mde``/``plan``: the minimum detectable difference ``(q_{1-alpha/2} + q_power) * SE`` (2.80 SE for a normal
  reference at alpha = 0.05 and 80% power; a t with S - 1 degrees of freedom makes it larger at few seeds), and
  the seeds x items a target MDE needs, from the measured variance components.
* ``compare``: one tidy table for a list of (A, B) questions: estimate, interval, p, Holm-corrected p
  (statsmodels ``multipletests``), MDE and a verdict.
* ``offset_pvalue``/``bias_claims``: is the mean of K Monte Carlo draws of a vector estimator within its
  standard error of the exact value? See ``offset_pvalue``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from opdlab.errors import UserError

__all__ = ["wilson", "accuracies", "paired_matrix", "paired_test", "variance_components", "design_se", "mde", "plan",
           "mcnemar_by_seed", "holm", "bootstrap_means", "gap_closed", "verdict", "compare", "offset_pvalue",
           "bias_claims", "jackknife_log_ratio"]

REQUIRED = ("arm", "seed", "item", "correct")


def wilson(correct, alpha: float = 0.05) -> tuple[float, float, float]:
    """Accuracy of one run (a 0/1 array over its items) and its Wilson interval. Pooling several seeds into one
    call would ignore the seed noise; use ``paired_test`` across seeds."""
    from statsmodels.stats.proportion import proportion_confint

    c = np.asarray(correct, dtype=float)
    if c.size == 0:
        raise UserError("wilson needs at least one item, got none")
    lo, hi = proportion_confint(c.sum(), c.size, alpha=alpha, method="wilson")
    return float(c.mean()), float(lo), float(hi)


def accuracies(frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per run (task if present, arm, seed): ``items, accuracy, lo, hi`` with ``wilson``'s interval."""
    _check_frame(frame)
    keys = [k for k in ("task", "arm", "seed") if k in frame.columns]
    rows = [dict(zip(keys, key if isinstance(key, tuple) else (key,)), items=len(part),
                 **dict(zip(("accuracy", "lo", "hi"), wilson(part["correct"], alpha))))
            for key, part in frame.groupby(keys, sort=True)]
    return pd.DataFrame(rows)


def _check_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise UserError(f"per-item frame lacks columns {missing}; it needs {list(REQUIRED)}")


def paired_matrix(frame: pd.DataFrame, arm: str, seeds=None) -> pd.DataFrame:
    """``correct`` of one arm as a seeds x items matrix (rows sorted by seed, columns by item)."""
    _check_frame(frame)
    rows = frame[frame["arm"] == arm]
    if rows.empty:
        raise UserError(f"arm {arm!r} has no rows; arms present: {sorted(frame['arm'].unique())}")
    if rows.duplicated(["seed", "item"]).any():
        raise UserError(f"arm {arm!r} has more than one record for some (seed, item)")
    m = rows.pivot(index="seed", columns="item", values="correct").sort_index().sort_index(axis=1)
    return m if seeds is None else m.reindex(seeds)


def _pair(frame: pd.DataFrame, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    ma, mb = paired_matrix(frame, a), paired_matrix(frame, b)
    if list(ma.index) != list(mb.index) or list(ma.columns) != list(mb.columns) or ma.isna().any().any() \
            or mb.isna().any().any():
        raise UserError(f"arms {a!r} and {b!r} are not paired: both need a record for every seed x item "
                        f"(seeds {list(ma.index)} vs {list(mb.index)}, {ma.shape[1]} vs {mb.shape[1]} items)")
    return ma.to_numpy(float), mb.to_numpy(float)


def _quantiles(alpha: float, power: float, df) -> tuple[float, float]:
    dist = sps.norm if df is None or not np.isfinite(df) else sps.t(df)
    return float(dist.ppf(1 - alpha / 2)), float(dist.ppf(power))


def mde(se, df=None, alpha: float = 0.05, power: float = 0.8):
    """Minimum detectable difference of a two-sided level-alpha test with the given power:
    ``(q_{1-alpha/2} + q_power) * SE``, q from a t with ``df`` degrees of freedom (None: normal, 2.80 SE)."""
    za, zb = _quantiles(alpha, power, df)
    return (za + zb) * np.asarray(se, dtype=float)


def paired_test(c_A_SN, c_B_SN, alpha: float = 0.05, power: float = 0.8, logistic: bool = False) -> dict:
    """Paired comparison of arm A and arm B, both S seeds x n items of 0/1 on the same items.

    Fits ``c ~ 1 + [arm == A]`` (linear GLM, so the coefficient is Delta_hat = mean(c_A) - mean(c_B)) with
    cluster-robust covariance, clusters = (seed, item) two-way for S >= 2 (item only for S = 1; where the two-way
    variance V_seed + V_item - V_both comes out negative, the larger one-way SE); t reference with S - 1 degrees
    of freedom (n - 1 for one seed), as statsmodels uses min(clusters) - 1. Returns estimate, se, lo, hi, p, df,
    mde (at the measured SE and the same df) and, with ``logistic``, p_logistic from the logistic GLM with the
    same clusters.
    """
    import statsmodels.api as sm

    a, b = np.atleast_2d(np.asarray(c_A_SN, float)), np.atleast_2d(np.asarray(c_B_SN, float))
    if a.shape != b.shape or a.size == 0:
        raise UserError(f"paired arms need equal, non-empty seeds x items shapes, got {a.shape} and {b.shape}")
    S, n = a.shape
    if n < 2:
        raise UserError(f"a paired test needs at least 2 items, got {n}")
    seed_SN, item_SN = np.indices((S, n))
    y = np.concatenate([a.ravel(), b.ravel()])
    X = np.column_stack([np.ones(2 * S * n), np.repeat([1.0, 0.0], S * n)])
    both = np.column_stack([seed_SN.ravel(), item_SN.ravel()])
    groups = np.tile(item_SN.ravel(), 2) if S == 1 else np.tile(both, (2, 1))
    est = float(a.mean() - b.mean())
    if np.all(a == b):  # no discordant pair anywhere: the estimate is exactly 0 with no spread to measure
        return dict(estimate=0.0, se=0.0, lo=0.0, hi=0.0, p=1.0, df=float(S - 1 if S > 1 else n - 1), mde=0.0,
                    **({"p_logistic": 1.0} if logistic else {}))

    def cluster_se(g):
        with np.errstate(invalid="ignore"):
            return float(sm.OLS(y, X).fit(cov_type="cluster", cov_kwds={"groups": g}).bse[1])

    se = cluster_se(groups)
    if groups.ndim == 2 and not se > 0:  # V_seed + V_item - V_both came out negative: the larger one-way SE
        se = max(cluster_se(groups[:, 0]), cluster_se(groups[:, 1]))
    df = float(n - 1 if S == 1 else S - 1)
    half = float(sps.t.ppf(1 - alpha / 2, df)) * se
    p = float(2 * sps.t.sf(abs(est) / se, df)) if se > 0 else 0.0  # se = 0: every seed and item differs alike
    out = dict(estimate=est, se=se, lo=est - half, hi=est + half, p=p, df=df,
               mde=float(mde(se, df, alpha, power)))
    if logistic:
        glm = sm.GLM(y, X, family=sm.families.Binomial()).fit(cov_type="cluster", cov_kwds={"groups": groups},
                                                               use_t=True)
        out["p_logistic"] = float(glm.pvalues[1])
    return out


def variance_components(d_SN) -> dict:
    """Two-way ANOVA estimates of the variance of the per-item differences ``d_si``:
    ``sigma2_seed`` (between seeds), ``sigma2_item`` (between items, shared by all seeds) and ``sigma2_resid``,
    from E[MS_seed] = n s2_seed + s2_resid, E[MS_item] = S s2_item + s2_resid, E[MS_resid] = s2_resid; negative
    estimates are set to 0. With one seed, seed and item-by-seed terms cannot be told apart: sigma2_seed = 0 and
    sigma2_item = 0, everything is residual."""
    d = np.atleast_2d(np.asarray(d_SN, float))
    S, n = d.shape
    if S == 1:
        return dict(sigma2_seed=0.0, sigma2_item=0.0, sigma2_resid=float(d.var(ddof=1)), seeds=1, items=n)
    r, c, g = d.mean(1, keepdims=True), d.mean(0, keepdims=True), d.mean()
    ms_seed = n * float(((r - g) ** 2).sum()) / (S - 1)
    ms_item = S * float(((c - g) ** 2).sum()) / (n - 1)
    ms_resid = float(((d - r - c + g) ** 2).sum()) / ((S - 1) * (n - 1))
    return dict(sigma2_seed=max(0.0, (ms_seed - ms_resid) / n), sigma2_item=max(0.0, (ms_item - ms_resid) / S),
                sigma2_resid=ms_resid, seeds=S, items=n)


def design_se(components: dict, seeds, items):
    """SE of Delta_hat for S seeds and n items: ``sqrt(s2_seed / S + s2_item / n + s2_resid / (S n))``."""
    S, n = np.asarray(seeds, float), np.asarray(items, float)
    return np.sqrt(components["sigma2_seed"] / S + components["sigma2_item"] / n
                   + components["sigma2_resid"] / (S * n))


def plan(components: dict, target: float, seeds: Sequence[int] = tuple(range(2, 65)),
         items: Sequence[int] = (256, 512, 1024, 2048, 4096), alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """For each item count n, the fewest seeds S whose MDE (t with S - 1 df, ``design_se``) reaches ``target``:
    rows ``items, seeds, se, mde`` (seeds NaN where none in ``seeds`` does). The item term ``s2_item / n`` does
    not shrink with seeds, so a small target may need more items whatever S is."""
    if not target > 0:
        raise UserError(f"target MDE must be a positive difference in accuracy, got {target!r}")
    rows = []
    for n in items:
        S = np.asarray(seeds, float)
        m = np.array([float(mde(design_se(components, s, n), s - 1, alpha, power)) for s in S])
        ok = np.flatnonzero(m <= target)
        k = ok[0] if ok.size else len(S) - 1
        rows.append(dict(items=int(n), seeds=float(S[k]) if ok.size else np.nan,
                         se=float(design_se(components, S[k], n)), mde=float(m[k])))
    return pd.DataFrame(rows)


def mcnemar_by_seed(frame: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Exact McNemar test of A against B within each seed: rows ``seed, a_only, b_only, p`` (a_only: items A
    solves and B does not). Tests one run pair; the seed-level question is ``paired_test``'s."""
    from statsmodels.stats.contingency_tables import mcnemar

    ca, cb = _pair(frame, a, b)
    seeds = paired_matrix(frame, a).index
    rows = []
    for s, x, y in zip(seeds, ca, cb):
        table = [[int(((x == 1) & (y == 1)).sum()), int(((x == 1) & (y == 0)).sum())],
                 [int(((x == 0) & (y == 1)).sum()), int(((x == 0) & (y == 0)).sum())]]
        rows.append(dict(seed=s, a_only=table[0][1], b_only=table[1][0], p=float(mcnemar(table, exact=True).pvalue)))
    return pd.DataFrame(rows)


def holm(p, alpha: float = 0.05) -> np.ndarray:
    """Holm-adjusted p-values of one family of comparisons (statsmodels ``multipletests``)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, float)
    return multipletests(p, alpha=alpha, method="holm")[1] if p.size else p


def bootstrap_means(frame: pd.DataFrame, arms: Sequence[str], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Hierarchical bootstrap of each arm's mean accuracy: ``n_boot`` rows, one column per arm.

    Each replicate draws S seeds with replacement (the same seed indices for every arm that has S seeds, so
    arms of one seed stay paired; an arm with one seed, a fixed teacher or warm-up, keeps it) and n items with
    replacement, the same items for every arm and seed. Computed by resampling counts, not copies:
    ``mean = sum_s sum_i v_s w_i c_si / (S n)`` with v, w multinomial counts from a numpy Generator.
    """
    mats = {arm: paired_matrix(frame, arm) for arm in arms}
    items = next(iter(mats.values())).columns
    S = max(m.shape[0] for m in mats.values())
    for arm, m in mats.items():
        if list(m.columns) != list(items) or m.isna().any().any() or m.shape[0] not in (1, S):
            raise UserError(f"arm {arm!r} is not on the same items as {arms[0]!r} with 1 or {S} seeds")
    rng = np.random.default_rng(seed)
    n = len(items)
    w_BN = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
    v_BS = rng.multinomial(S, np.full(S, 1 / S), size=n_boot).astype(float)
    out = {}
    for arm, m in mats.items():
        c = m.to_numpy(float)
        per_seed_BN = (v_BS @ c) / S if c.shape[0] == S else np.broadcast_to(c, (n_boot, n))
        out[arm] = (per_seed_BN * w_BN).sum(1) / n
    return pd.DataFrame(out)


def gap_closed(frame: pd.DataFrame, arm: str, warmup: str, teacher: str, n_boot: int = 2000, seed: int = 0,
               alpha: float = 0.05) -> dict:
    """Fraction of the warm-up -> teacher gap that ``arm`` closes, ``(A - W) / (T - W)``, with a percentile
    interval from ``bootstrap_means`` (W and T resampled on the same items as A). Replicates where T <= W (no
    gap) are dropped and counted in ``dropped``."""
    est = [float(paired_matrix(frame, x).to_numpy(float).mean()) for x in (arm, warmup, teacher)]
    if not est[2] > est[1]:
        raise UserError(f"the teacher {teacher!r} ({est[2]:.3f}) does not beat the warm-up {warmup!r} "
                        f"({est[1]:.3f}); the gap is not defined")
    boot = bootstrap_means(frame, [arm, warmup, teacher], n_boot, seed)
    gap = boot[teacher] - boot[warmup]
    ratio = ((boot[arm] - boot[warmup]) / gap)[gap > 0]
    lo, hi = np.quantile(ratio, [alpha / 2, 1 - alpha / 2])
    return dict(estimate=(est[0] - est[1]) / (est[2] - est[1]), lo=float(lo), hi=float(hi),
                dropped=int((gap <= 0).sum()))


def verdict(r: dict, a: str, b: str, alpha: float) -> str:
    if r["p_holm"] < alpha:
        return f"{a} > {b}" if r["estimate"] > 0 else f"{a} < {b}"
    return f"no difference detected; this design detects {100 * r['mde']:.1f} points or more"


def compare(frame: pd.DataFrame, questions: Sequence[tuple[str, str]], alpha: float = 0.05,
            power: float = 0.8) -> pd.DataFrame:
    """One row per question (A, B) on a per-item frame: ``a, b, seeds, items, estimate, lo, hi, p, p_holm,
    mde, verdict`` (differences in accuracy, A - B). Holm runs over all the questions given: pass one notebook's
    family at once. With a ``task`` column, a question is asked within each task (one family across tasks)."""
    _check_frame(frame)
    if not questions:
        raise UserError("compare needs at least one (arm A, arm B) question")
    groups = frame.groupby("task", sort=True) if "task" in frame.columns else [(None, frame)]
    rows = []
    for task, part in groups:
        for a, b in questions:
            ca, cb = _pair(part, a, b)
            r = paired_test(ca, cb, alpha, power)
            rows.append(dict(**({"task": task} if task is not None else {}), a=a, b=b, seeds=ca.shape[0],
                             items=ca.shape[1], **{k: r[k] for k in ("estimate", "se", "lo", "hi", "p", "df", "mde")}))
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].to_numpy(), alpha)
    table["verdict"] = [verdict(r, r["a"], r["b"], alpha) for r in table.to_dict("records")]
    return table


def offset_pvalue(offset, se, n_draws):
    """p-value of H0: E[g_hat] = g, from ``offset = ||mean of K draws - g||`` and ``se = sqrt(tr Cov(g_hat) / K)``
    (both may be divided by the same ||g||).

    Under H0 the mean of K draws is about normal, and ``(offset / se)^2`` is a weighted sum of chi-square(1)
    variables with weights summing to 1 (the eigenvalues of Cov over its trace). Its upper tail at the levels used
    here (alpha <= 0.215) is at most that of one chi-square(1) (Szekely & Bakirov 2003), so referring
    ``offset / se`` to a two-sided t with K - 1 degrees of freedom is exact for one dimension and conservative
    for many, without knowing the covariance: ``p = 2 * sf_t(offset / se; K - 1)``.
    """
    offset, se = np.asarray(offset, float), np.asarray(se, float)
    if np.any(se <= 0) or np.any(offset < 0):
        raise UserError("offset_pvalue needs offset >= 0 and se > 0 (a norm and a standard error)")
    if not np.all(np.asarray(n_draws) >= 2):
        raise UserError(f"offset_pvalue needs at least 2 draws, got {n_draws!r}")
    return 2 * sps.t.sf(offset / se, np.asarray(n_draws, float) - 1)


def bias_claims(names, offset, se, n_draws, unbiased, alpha: float = 0.05) -> pd.DataFrame:
    """Test each estimator's claim: ``unbiased`` (bool per row) claims its Monte Carlo mean matches the exact
    value, the others claim a bias. p from ``offset_pvalue``; Holm within each family.

    * Claimed unbiased: holds when Holm does not reject H0 at ``alpha``. If every such estimator is unbiased,
      the chance that any of these claims fails is at most alpha (the family-wise error).
    * Claimed biased: holds when Holm rejects H0 at ``alpha``. Were any of them unbiased, the chance that its
      claim holds anyway is at most alpha.

    ``detectable`` is the bias (in the units of ``offset``) that the test detects with 80% power even at Holm's
    strictest threshold alpha / m (m: the size of the row's family): ``mde(se, K - 1, alpha / m)``, exact for one
    dimension; more dimensions only raise the power there (the offset's noise spreads over them).

    Rows: ``name, claim, ratio (offset / se), p, p_holm, holds, detectable``.
    """
    unbiased = np.asarray(unbiased, bool)
    se = np.asarray(se, float) * np.ones(len(unbiased))
    p = offset_pvalue(offset, se, n_draws) * np.ones(len(unbiased))
    p_holm, detectable = np.empty_like(p), np.empty_like(p)
    for fam in (True, False):
        this = unbiased == fam
        p_holm[this] = holm(p[this], alpha)
        detectable[this] = mde(se[this], np.asarray(n_draws, float) - 1, alpha / max(1, int(this.sum())))
    holds = np.where(unbiased, p_holm >= alpha, p_holm < alpha)
    return pd.DataFrame(dict(name=list(names), claim=np.where(unbiased, "unbiased", "biased"),
                             ratio=np.asarray(offset, float) / se, p=p, p_holm=p_holm, holds=holds,
                             detectable=detectable))


def jackknife_log_ratio(loo_a, loo_b, full_a, full_b, alpha: float = 0.05) -> dict:
    """Is quantity A larger than B, pooled over matched settings, when both were measured on the same K batches
    (``noise.step_noise`` with one seed)? ``loo_a``/``loo_b``: settings x K leave-one-out values of log A and
    log B (batch k left out of both); ``full_a``/``full_b``: their logs on all K batches. The statistic is the
    mean over settings of log A - log B; its jackknife SE over the shared batches, ``sqrt((K-1)/K sum_k
    (theta_(k) - mean)^2)``, keeps the pairing (the batches' noise is common to A and B). A t-interval with K - 1
    degrees of freedom, two-sided p, the geometric-mean ratio with its interval, and ``detectable_ratio`` (the
    ratio this design detects with 80% power)."""
    la, lb = np.atleast_2d(np.asarray(loo_a, float)), np.atleast_2d(np.asarray(loo_b, float))
    if la.shape != lb.shape or la.shape[1] < 2 or not np.all(np.isfinite(la)) or not np.all(np.isfinite(lb)):
        raise UserError(f"jackknife_log_ratio needs equal settings x K (K >= 2) finite leave-one-out values, got "
                        f"{la.shape} and {lb.shape}")
    K = la.shape[1]
    theta_k = (la - lb).mean(0)
    est = float(np.mean(np.asarray(full_a, float) - np.asarray(full_b, float)))
    se = float(np.sqrt((K - 1) / K * ((theta_k - theta_k.mean()) ** 2).sum()))
    df = K - 1
    if not se > 0:  # A - B is the same on every leave-one-out draw: exact, or both identical (e.g. a clip never hit)
        return dict(estimate=est, se=0.0, lo=est, hi=est, p=1.0 if est == 0 else 0.0, ratio=float(np.exp(est)),
                    lo_ratio=float(np.exp(est)), hi_ratio=float(np.exp(est)), detectable_ratio=1.0,
                    settings=int(la.shape[0]))
    half = float(sps.t.ppf(1 - alpha / 2, df)) * se
    return dict(estimate=est, se=se, lo=est - half, hi=est + half, p=float(2 * sps.t.sf(abs(est) / se, df)),
                ratio=float(np.exp(est)), lo_ratio=float(np.exp(est - half)), hi_ratio=float(np.exp(est + half)),
                detectable_ratio=float(np.exp(mde(se, df, alpha))), settings=int(la.shape[0]))
