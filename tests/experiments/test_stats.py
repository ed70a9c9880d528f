"""opdlab.experiments.stats on data whose answer is known: simulated arms with a known difference and with none, checked at
the nominal rate with tolerances of 3 binomial standard errors; hand cases for Holm, McNemar, Wilson, ANOVA."""
import numpy as np
import pandas as pd
import pytest

from opdlab.errors import UserError
from opdlab.experiments import stats

ALPHA = 0.05
TAU, OMEGA = 0.03, 0.05  # seed effect per arm (sd), item x arm interaction (sd)


def simulate(rng, S, n, delta, tau=TAU, omega=OMEGA):
    """S seeds x n shared items of 0/1 for arms A and B: item difficulty p_i (shared, cancels when paired), an
    item x arm effect v_i ~ N(0, omega^2) and a seed effect per arm ~ N(0, tau^2); true A - B = delta.
    Variance components of d = c_A - c_B: sigma2_seed = 2 tau^2, sigma2_item = omega^2."""
    p = rng.uniform(0.35, 0.65, n)
    pA = p + delta + rng.normal(0, omega, n) + rng.normal(0, tau, (S, 1))
    pB = p + rng.normal(0, tau, (S, 1))
    return ((rng.random((S, n)) < pA).astype(float), (rng.random((S, n)) < pB).astype(float))


def within_3se(rate, target, R):
    return abs(rate - target) <= 3 * np.sqrt(target * (1 - target) / R)


def tidy(arms: dict) -> pd.DataFrame:
    """Per-item frame from {arm: seeds x items 0/1 matrix}."""
    rows = []
    for arm, c in arms.items():
        S, n = np.atleast_2d(c).shape
        s, i = np.indices((S, n))
        rows.append(pd.DataFrame(dict(arm=arm, seed=s.ravel(), item=i.ravel(), correct=np.atleast_2d(c).ravel())))
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("S, n", [(5, 256), (1, 512)])
def test_false_positive_rate_and_coverage_are_nominal(S, n):
    rng, R = np.random.default_rng(1 + S), 300
    tau = TAU if S > 1 else 0.0
    null = [stats.paired_test(*simulate(rng, S, n, 0.0, tau))["p"] < ALPHA for _ in range(R)]
    covered = [(lambda r: r["lo"] <= 0.04 <= r["hi"])(stats.paired_test(*simulate(rng, S, n, 0.04, tau)))
               for _ in range(R)]
    assert within_3se(np.mean(null), ALPHA, R), np.mean(null)
    assert within_3se(np.mean(covered), 1 - ALPHA, R), np.mean(covered)


def test_power_at_the_mde_is_80_percent():
    rng, R, S, n = np.random.default_rng(7), 500, 8, 256
    truth = dict(sigma2_seed=2 * TAU ** 2, sigma2_item=OMEGA ** 2, sigma2_resid=0.4816)  # resid: E[2 p(1-p)] here
    m = float(stats.mde(stats.design_se(truth, S, n), S - 1))
    power = np.mean([stats.paired_test(*simulate(rng, S, n, m))["p"] < ALPHA for _ in range(R)])
    assert within_3se(power, 0.8, R), (m, power)


def test_design_se_matches_the_spread_of_the_estimate():
    rng, R, S, n = np.random.default_rng(3), 400, 4, 256
    truth = dict(sigma2_seed=2 * TAU ** 2, sigma2_item=OMEGA ** 2, sigma2_resid=0.4816)
    est = [np.mean(a - b) for a, b in (simulate(rng, S, n, 0.0) for _ in range(R))]
    se = stats.design_se(truth, S, n)
    # the sample variance of R normal-ish draws has relative SE sqrt(2 / (R - 1))
    assert abs(np.var(est, ddof=1) / se ** 2 - 1) <= 3 * np.sqrt(2 / (R - 1))


def test_compare_detects_a_known_difference_and_reports_the_mde_when_there_is_none():
    rng = np.random.default_rng(11)
    a, b = simulate(rng, 5, 1024, 0.12)
    c = (rng.random(b.shape) < 0.5).astype(float)
    frame = tidy({"A": a, "B": b, "C": c})
    table = stats.compare(frame, [("A", "B"), ("B", "C")])
    assert table.loc[0, "verdict"] == "A > B" and table.loc[0, "lo"] > 0
    assert table.loc[1, "verdict"].startswith("no difference detected; this design detects")
    assert f"{100 * table.loc[1, 'mde']:.1f} points" in table.loc[1, "verdict"]
    assert list(table.p_holm) == list(stats.holm(table.p))
    assert table.loc[0, "estimate"] == pytest.approx(a.mean() - b.mean())


def test_compare_asks_each_question_within_each_task():
    rng = np.random.default_rng(12)
    f1, f2 = tidy(dict(zip("AB", simulate(rng, 3, 64, 0.0)))), tidy(dict(zip("AB", simulate(rng, 3, 64, 0.0))))
    frame = pd.concat([f1.assign(task="x"), f2.assign(task="y")])
    table = stats.compare(frame, [("A", "B")])
    assert list(table.task) == ["x", "y"] and (table.p_holm >= table.p).all()


def test_holm_against_a_hand_case():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_mcnemar_against_a_hand_case():
    a = np.array([1] * 8 + [0] * 1 + [1] * 5 + [0] * 6, float)
    b = np.array([0] * 8 + [1] * 1 + [1] * 5 + [0] * 6, float)
    table = stats.mcnemar_by_seed(tidy({"A": a[None], "B": b[None]}), "A", "B")
    # 8 discordant pairs for A, 1 for B: exact p = 2 P(Bin(9, 1/2) <= 1) = 2 * 10 / 512
    assert (table.a_only[0], table.b_only[0]) == (8, 1) and table.p[0] == pytest.approx(20 / 512)


def test_wilson_against_the_formula():
    c = np.r_[np.ones(78), np.zeros(22)]
    z, p, n = 1.959963984540054, 0.78, 100
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.wilson(c) == pytest.approx((0.78, centre - half, centre + half))


def test_accuracies_one_row_per_run_and_the_logistic_glm_agrees():
    rng = np.random.default_rng(4)
    a, b = simulate(rng, 4, 512, 0.15)
    acc = stats.accuracies(tidy({"A": a, "B": b}))
    assert len(acc) == 8 and acc.loc[0, "accuracy"] == pytest.approx(a[0].mean())
    assert (acc.lo < acc.accuracy).all() and (acc.accuracy < acc.hi).all()
    r = stats.paired_test(a, b, logistic=True)
    assert r["p"] < ALPHA and r["p_logistic"] < ALPHA


def test_variance_components_of_an_exactly_additive_table():
    a_S, b_N = np.array([0.1, -0.2, 0.3, 0.0]), np.linspace(-1, 1, 7)
    comp = stats.variance_components(a_S[:, None] + b_N[None, :])
    assert comp["sigma2_resid"] == pytest.approx(0, abs=1e-12)
    assert comp["sigma2_seed"] == pytest.approx(a_S.var(ddof=1)) and comp["sigma2_item"] == pytest.approx(b_N.var(ddof=1))


def test_plan_picks_the_fewest_seeds_that_reach_the_target():
    comp = dict(sigma2_seed=0.002, sigma2_item=0.001, sigma2_resid=0.3)
    table = stats.plan(comp, 0.03, items=(256, 1024))
    for row in table.itertuples():
        assert row.mde <= 0.03
        assert stats.mde(stats.design_se(comp, row.seeds - 1, row.items), row.seeds - 2) > 0.03
    assert table.seeds.is_monotonic_decreasing
    assert stats.plan(dict(comp, sigma2_item=1.0), 0.03, items=(256,)).seeds.isna().all()  # the item term alone is too large


def test_gap_closed_recovers_a_known_fraction():
    rng = np.random.default_rng(5)
    n = 2048
    p = rng.uniform(0.2, 0.9, n)
    W, T = (rng.random(n) < p - 0.15).astype(float), (rng.random(n) < p + 0.15).astype(float)
    A = (rng.random((4, n)) < p).astype(float)  # halfway: (A - W) / (T - W) = 0.5 in expectation
    frame = tidy({"W": W[None], "T": T[None], "A": A})
    r = stats.gap_closed(frame, "A", "W", "T", n_boot=1000)
    assert r["lo"] < r["estimate"] < r["hi"] and r["lo"] < 0.5 < r["hi"] and r["hi"] - r["lo"] < 0.3


def test_gap_closed_interval_covers_at_about_the_nominal_rate():
    rng, R, n = np.random.default_rng(9), 150, 512
    covered = []
    for _ in range(R):
        p = rng.uniform(0.2, 0.8, n)
        W, T = (rng.random(n) < p - 0.15).astype(float), (rng.random(n) < p + 0.15).astype(float)
        A = (rng.random((1, n)) < p).astype(float)
        r = stats.gap_closed(tidy({"W": W[None], "T": T[None], "A": A}), "A", "W", "T", n_boot=300, seed=int(rng.integers(1 << 30)))
        covered.append(r["lo"] <= 0.5 <= r["hi"])
    assert within_3se(np.mean(covered), 1 - ALPHA, R), np.mean(covered)


def test_bad_input_says_what_is_wrong():
    frame = tidy({"A": np.ones((2, 4)), "B": np.ones((3, 4))})
    with pytest.raises(UserError, match="not paired"):
        stats.compare(frame, [("A", "B")])
    with pytest.raises(UserError, match="'Z'"):
        stats.compare(frame, [("A", "Z")])
    with pytest.raises(UserError, match="correct"):
        stats.compare(frame.drop(columns="correct"), [("A", "B")])
    with pytest.raises(UserError, match="does not beat the warm-up"):
        stats.gap_closed(tidy({"A": np.ones((1, 4)), "W": np.ones((1, 4)), "T": np.zeros((1, 4))}), "A", "W", "T")


# --- the Monte Carlo offset test behind the notebooks' bias claims ---

def draws(rng, R, K, scales_D, bias_D):
    """R experiments of K draws of a D-vector estimator with independent coordinates of sd ``scales_D`` and mean
    ``bias_D`` (the exact value is 0): ``offset`` and ``se`` computed as noise.token_noise computes them."""
    g_RKD = rng.normal(size=(R, K, len(scales_D))) * scales_D + bias_D
    mean_RD = g_RKD.mean(1)
    return np.linalg.norm(mean_RD, axis=1), np.sqrt(g_RKD.var(1, ddof=1).sum(1) / K)


@pytest.mark.parametrize("scales", [[1.0], [1.0] * 20, list(np.geomspace(1, 0.01, 30))])
def test_an_unbiased_estimator_is_rejected_at_most_at_the_nominal_rate(scales):
    rng, R, K = np.random.default_rng(len(scales)), 4000, 64
    offset, se = draws(rng, R, K, np.array(scales), 0.0)
    rate = np.mean(stats.offset_pvalue(offset, se, K) < ALPHA)
    if len(scales) == 1:  # one dimension: offset / se is |t_{K-1}|, the test is exact
        assert within_3se(rate, ALPHA, R), rate
    else:  # many: conservative (Szekely & Bakirov), never above nominal
        assert rate <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / R), rate


def test_bias_claims_fail_on_their_counterfactuals():
    rng, R, K, D = np.random.default_rng(2), 2000, 64, 10
    scales = np.ones(D)
    # a biased estimator whose bias is 4 standard errors of the mean's norm (sqrt(tr Cov / K)), along one axis
    biased = np.zeros(D)
    biased[0] = 4 * np.sqrt(D / K)
    off_b, se_b = draws(rng, R, K, scales, biased)
    off_u, se_u = draws(rng, R, K, scales, 0.0)
    # one claim in a family: Holm is the plain test, so the claim "unbiased" holds exactly when p >= alpha
    t = stats.bias_claims(["b", "u"], [off_b[0], off_u[0]], [se_b[0], se_u[0]], K, [True, False])
    assert list(t.holds) == [stats.offset_pvalue(off_b[0], se_b[0], K) >= ALPHA,
                             stats.offset_pvalue(off_u[0], se_u[0], K) < ALPHA]
    # the claim "unbiased" fails on the biased estimator nearly always
    assert np.mean(stats.offset_pvalue(off_b, se_b, K) < ALPHA) > 0.9
    # an unbiased estimator claimed biased: the claim holds at most at rate alpha, so it fails otherwise
    holds_biased = stats.offset_pvalue(off_u, se_u, K) < ALPHA
    assert np.mean(holds_biased) <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / R)
    # Holm within a family: two true claims of unbiasedness fail together at most at rate alpha
    p = stats.offset_pvalue(np.c_[off_u[: R // 2], off_u[R // 2:]], np.c_[se_u[: R // 2], se_u[R // 2:]], K)
    fwer = np.mean(p.min(1) < ALPHA / 2)
    assert fwer <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / (R // 2))


@pytest.mark.parametrize("D", [1, 3, 50])
def test_a_bias_of_the_detectable_size_is_detected_with_at_least_80_percent_power(D):
    rng, R, K = np.random.default_rng(D), 3000, 64
    t = stats.bias_claims(["a", "b"], [0.0, 0.0], np.sqrt(D / K), K, [False, False])  # a family of two
    bias = np.zeros(D)
    bias[0] = t.detectable[0]
    offset, se = draws(rng, R, K, np.ones(D), bias)
    power = np.mean(stats.offset_pvalue(offset, se, K) < ALPHA / 2)
    tolerance = 3 * np.sqrt(0.8 * 0.2 / R)
    assert (within_3se(power, 0.8, R) if D == 1 else power >= 0.8 - tolerance), power


def test_bias_claims_table():
    t = stats.bias_claims(["u1", "u2", "b1", "b2"], [1.0, 1.2, 3.0, 2.4], [1.0, 1.0, 1.0, 1.0], 64,
                          [True, True, False, False])
    assert list(t.claim) == ["unbiased", "unbiased", "biased", "biased"] and t.holds.all()
    assert t.p_holm[2] == pytest.approx(2 * min(t.p[2], t.p[3]))  # Holm within the biased family only
    with pytest.raises(UserError, match="se > 0"):
        stats.offset_pvalue([1.0], [0.0], 64)
