"""Estimators against exact gradients on enumerable toys (opdlab.exact.toy, opdlab.experiments.montecarlo).

Tolerances come from the standard error: a Monte Carlo mean matches when every coordinate is within
5 SE of the exact value, and a mismatch is asserted as some coordinate more than 8 SE away.
"""
import pytest
import torch

from opdlab.core.divergences import get
from opdlab.core.estimators import compute_advantages, reinforce_loss
from opdlab.exact.toy import (CategoricalToy, SequenceToy, exact_gradient, exact_sequence_gradient,
                              expected_estimator_gradient, expected_sequence_estimator_gradient, make_categorical,
                              make_sequence, prefix_log_probs, sample_gradients, sample_sequences,
                              sequence_estimator_moments, sequence_objective, sequence_sample_gradients,
                              token_local_gradient, train_categorical)
from opdlab.experiments.montecarlo import (DIVERGENCES, categorical_study, estimator_cosines, sequence_study,
                                           training_study)

N_MC = 200_000
N_SEQ = 60_000  # sequences cost more per sample


def total_variance(g_ND: torch.Tensor) -> tuple[float, float]:
    """``(tr Cov(g), its standard error)`` from N samples: the mean of q_i = ||g_i - mean g||^2 (times
    N/(N-1)) and std(q)/sqrt(N)."""
    q_N = (g_ND - g_ND.mean(0)).pow(2).sum(-1)
    n = q_N.numel()
    return float(q_N.mean() * n / (n - 1)), float(q_N.std() / n**0.5)


def z_scores(g_ND: torch.Tensor, target_D: torch.Tensor) -> torch.Tensor:
    """|mean - target| / SE per coordinate (SE floored where a coordinate has no variance)."""
    se = g_ND.std(0) / g_ND.shape[0] ** 0.5
    return (g_ND.mean(0) - target_D).abs() / (se + 1e-12)


@pytest.fixture(scope="module")
def toy():
    return make_categorical(n_tokens=6, seed=3)


@pytest.fixture(scope="module")
def seq_toy():
    return make_sequence(vocab_size=2, horizon=4, seed=1)


# --- the analytic per-sample gradients are the real surrogate's gradients -----------------------------------

@pytest.mark.parametrize("method", ["opd", "opd_plus"])
def test_categorical_sample_gradients_equal_reinforce_loss_autograd(toy, method):
    div, n, seed = get("jsd"), 64, 11
    tokens = torch.multinomial(toy.logp_student_K.exp(), n, replacement=True,
                               generator=torch.Generator().manual_seed(seed))[:, None]
    theta = toy.logits_student_K.clone().requires_grad_(True)
    logp_student_N1 = torch.log_softmax(theta, -1)[tokens]
    A = compute_advantages(div, logp_student_N1.detach(), toy.logp_teacher_K[tokens], method=method).A_BT
    reinforce_loss(logp_student_N1, A, reduction="sequence").backward()
    torch.testing.assert_close(sample_gradients(div, toy, method, n, seed).mean(0), theta.grad)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_sequence_sample_gradients_equal_reinforce_loss_autograd(seq_toy, gamma):
    div, n, seed = get("forward_kl"), 32, 5
    tokens_SH, nodes_SH, _, _ = seq_toy.tree
    index = sample_sequences(seq_toy, n, seed)
    tokens, nodes = tokens_SH[index], nodes_SH[index]
    theta = seq_toy.logits_student_NV.clone().requires_grad_(True)
    logp_student_BT = torch.log_softmax(theta, -1)[nodes, tokens]
    A = compute_advantages(div, logp_student_BT.detach(), seq_toy.logp_teacher_NV[nodes, tokens],
                           method="opd_plus", gamma=gamma).A_BT
    reinforce_loss(logp_student_BT, A, reduction="sequence").backward()
    mean = sequence_sample_gradients(div, seq_toy, "opd_plus", n, gamma, generator=seed).mean(0)
    torch.testing.assert_close(mean, theta.grad.reshape(-1))


# --- categorical: OPD+ unbiased for every divergence, stop-gradient biased except reverse KL ----------------

@pytest.mark.parametrize("name", DIVERGENCES)
def test_opd_plus_expectation_is_the_exact_gradient(toy, name):
    torch.testing.assert_close(expected_estimator_gradient(name, toy, "opd_plus"), exact_gradient(name, toy),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("method", ["opd", "opd_plus"])
def test_monte_carlo_mean_against_exact_gradient(toy, name, method):
    g = sample_gradients(name, toy, method, N_MC, generator=7)
    z = z_scores(g, exact_gradient(name, toy))
    if method == "opd_plus" or name == "reverse_kl":
        assert z.max() <= 5, f"{name}/{method}: unbiased estimator off by {z.max():.1f} SE"
    else:
        assert z.max() > 8, f"{name}/{method}: stop-gradient bias not detected (max {z.max():.1f} SE)"


@pytest.mark.parametrize("baseline", ["expected", "loo"])
def test_categorical_baselines_keep_the_mean(toy, baseline):
    g = sample_gradients("forward_kl", toy, "opd_plus", N_MC, generator=2, baseline=baseline, group_size=8)
    assert z_scores(g, exact_gradient("forward_kl", toy)).max() <= 5


def test_stop_gradient_forward_kl_points_the_wrong_way():
    cos = estimator_cosines(["forward_kl", "reverse_kl"], n_toys=30, seed=0)
    mean = cos.groupby(["divergence", "method"])["cosine"].mean()
    assert mean["forward_kl", "opd"] < -0.8
    assert mean["forward_kl", "opd_plus"] == pytest.approx(1.0)
    assert mean["reverse_kl", "opd"] == pytest.approx(1.0)


# --- sequences: gamma = 1 is the sequence gradient, gamma = 0 the token-local one ----------------------------

@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "hellinger"])
def test_sequence_gamma_targets_exactly(seq_toy, name):
    exact_seq, local = exact_sequence_gradient(name, seq_toy), token_local_gradient(name, seq_toy)
    torch.testing.assert_close(expected_sequence_estimator_gradient(name, seq_toy, "opd_plus", 1.0), exact_seq)
    torch.testing.assert_close(expected_sequence_estimator_gradient(name, seq_toy, "opd_plus", 0.0), local)
    assert (exact_seq - local).norm() > 1e-3  # the two targets differ, so the test has teeth


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_sequence_monte_carlo(seq_toy, name):
    g1 = sequence_sample_gradients(name, seq_toy, "opd_plus", N_SEQ, gamma=1.0, generator=3)
    g0 = sequence_sample_gradients(name, seq_toy, "opd_plus", N_SEQ, gamma=0.0, generator=4)
    exact_seq, local = exact_sequence_gradient(name, seq_toy), token_local_gradient(name, seq_toy)
    assert z_scores(g1, exact_seq).max() <= 5
    assert z_scores(g0, local).max() <= 5
    assert z_scores(g0, exact_seq).max() > 8  # token-local is biased for the sequence objective
    g_opd = sequence_sample_gradients(name, seq_toy, "opd", N_SEQ, gamma=1.0, generator=5)
    if name == "reverse_kl":
        assert z_scores(g_opd, exact_seq).max() <= 5
    else:
        assert z_scores(g_opd, exact_seq).max() > 8


def test_sequence_objective_is_the_expected_sum_of_f(seq_toy):
    div = get("jsd")
    tokens_SH, nodes_SH, _, _ = seq_toy.tree
    logp_s = seq_toy.logp_student_NV[nodes_SH, tokens_SH]
    log_u = seq_toy.logp_teacher_NV[nodes_SH, tokens_SH] - logp_s
    brute = (logp_s.sum(-1).exp() * div.f(log_u).sum(-1)).sum()
    torch.testing.assert_close(sequence_objective(div, seq_toy), brute)


def test_prefix_log_probs_sum_the_log_probs_along_each_path(seq_toy):
    tokens_SH, nodes_SH, depth_N, _ = seq_toy.tree
    logp_NV = seq_toy.logp_student_NV
    logp_N = prefix_log_probs(logp_NV, seq_toy)
    for s, t in [(0, 0), (5, 2), (15, 3), (9, 1)]:  # every prefix y_<t of sequence s, by walking its path
        walked = sum((logp_NV[nodes_SH[s, r], tokens_SH[s, r]] for r in range(t)), torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(logp_N[nodes_SH[s, t]], walked)
    mass_H = torch.zeros(seq_toy.horizon, dtype=torch.float64).index_add_(0, depth_N, logp_N.exp())
    torch.testing.assert_close(mass_H, torch.ones_like(mass_H))  # the prefixes of one length partition the paths


@pytest.mark.parametrize("baseline", ["expected", "loo"])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_sequence_baselines_keep_the_mean_and_lower_the_variance(seq_toy, baseline, gamma):
    name = "reverse_kl"
    target = exact_sequence_gradient(name, seq_toy) if gamma == 1.0 else token_local_gradient(name, seq_toy)
    g = sequence_sample_gradients(name, seq_toy, "opd_plus", N_SEQ, gamma, baseline, generator=6, group_size=16)
    plain = sequence_sample_gradients(name, seq_toy, "opd_plus", N_SEQ, gamma, "none", generator=6)
    assert z_scores(g, target).max() <= 5
    # total variance tr Cov(g) = E||g - Eg||^2, estimated by the mean of q_i = ||g_i - mean g||^2, whose
    # standard error is std(q) / sqrt(N): the baseline must lower it by more than 5 combined standard errors
    (v_b, se_b), (v_plain, se_plain) = total_variance(g), total_variance(plain)
    assert v_plain - v_b > 5 * (se_b**2 + se_plain**2) ** 0.5, (v_b, v_plain, se_b, se_plain)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl"])
def test_exact_moments_with_expected_baseline(seq_toy, name):
    mean_none, var_none = sequence_estimator_moments(name, seq_toy, "opd_plus", 1.0)
    mean_b, var_b = sequence_estimator_moments(name, seq_toy, "opd_plus", 1.0, "expected")
    torch.testing.assert_close(mean_b, mean_none)
    assert var_b < var_none


# --- studies, training, reproducibility ---------------------------------------------------------------------

def test_categorical_study_error_shrinks_only_for_opd_plus():
    df = categorical_study(["forward_kl"], n_samples=[4, 1024], n_repeats=50, seed=0)
    rmse = df.set_index(["method", "n_samples"])["rmse"]
    # unbiased: RMSE ~ 1/sqrt(N), so the ratio is sqrt(4/1024) = 1/16; each RMSE over R = 50 repeats has a
    # relative standard error of about 1/sqrt(2R), so the ratio's is sqrt(2) times that
    ratio, se = rmse["opd_plus", 1024] / rmse["opd_plus", 4], (1 / 16) * (2 / (2 * 50)) ** 0.5
    assert abs(ratio - 1 / 16) < 5 * se
    bias = df.set_index(["method", "n_samples"])["bias_exact"]
    assert rmse["opd", 1024] > 0.9 * bias["opd", 1024]  # stuck at its bias
    assert set(df.columns) >= {"divergence", "method", "n_samples", "bias", "rmse", "relative_error",
                               "cosine", "variance"}


def test_sequence_study_columns_and_exact_bias():
    df = sequence_study(["reverse_kl"], gammas=[0.0, 1.0], n_samples=4, n_repeats=5, vocab_size=2, horizon=3)
    assert len(df) == 2 * 2 * 3
    at_one = df[(df.gamma == 1.0) & (df.method == "opd_plus")]
    assert (at_one.bias_sequence < 1e-10).all()
    at_zero = df[(df.gamma == 0.0) & (df.method == "opd_plus")]
    assert (at_zero.bias_token_local < 1e-10).all()


def test_toy_training_stop_gradient_forward_kl_fails_where_opd_plus_converges():
    df = training_study(["reverse_kl", "forward_kl"], steps=100, n_samples=16, lr=0.5, seed=0)
    last = df.groupby(["divergence", "method"]).last()["D_f"]
    first = df.groupby(["divergence", "method"]).first()["D_f"]
    assert last["forward_kl", "opd_plus"] < 0.1 * first["forward_kl", "opd_plus"]
    assert last["forward_kl", "opd"] > first["forward_kl", "opd"]
    assert last["reverse_kl", "opd"] < 0.1 * first["reverse_kl", "opd"]


def test_seeded_runs_are_reproducible(toy, seq_toy):
    torch.testing.assert_close(sample_gradients("jsd", toy, "opd", 100, 9), sample_gradients("jsd", toy, "opd", 100, 9))
    assert not torch.equal(sample_gradients("jsd", toy, "opd", 100, 9), sample_gradients("jsd", toy, "opd", 100, 10))
    torch.testing.assert_close(sequence_sample_gradients("jsd", seq_toy, "opd", 50, 0.5, "loo", 4),
                               sequence_sample_gradients("jsd", seq_toy, "opd", 50, 0.5, "loo", 4))
    a = train_categorical("forward_kl", "opd_plus", toy, steps=20, n_samples=8, seed=1)
    b = train_categorical("forward_kl", "opd_plus", toy, steps=20, n_samples=8, seed=1)
    assert a.equals(b)
    assert make_categorical(5, seed=2).logits_student_K.equal(make_categorical(5, seed=2).logits_student_K)


def test_expected_gradient_training_matches_its_definition(toy):
    df = train_categorical("reverse_kl", "opd", toy, steps=3, n_samples=None, lr=0.1)
    assert list(df.step) == [0, 1, 2, 3] and df.D_f.is_monotonic_decreasing


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: make_categorical(n_tokens=1), "n_tokens"),
    (lambda: make_categorical(temperature=0.0), "temperature"),
    (lambda: make_sequence(vocab_size=10, horizon=8), "too many"),
    (lambda: sample_gradients("jsd", make_categorical(), "sg", 10), "unknown method"),
    (lambda: sample_gradients("jsd", make_categorical(), "opd", 0), "n_samples"),
    (lambda: sample_gradients("jsd", make_categorical(), "opd", 10, baseline="mean"), "unknown baseline"),
    (lambda: sample_gradients("jsd", make_categorical(), "opd", 10, baseline="loo", group_size=3), "divide"),
    (lambda: sequence_sample_gradients("jsd", make_sequence(), "opd", 10, gamma=1.5), "gamma"),
    (lambda: sequence_estimator_moments("jsd", make_sequence(), "opd", baseline="loo"), "leave-one-out"),
    (lambda: CategoricalToy(torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), "shape"),
    (lambda: SequenceToy(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), 3),
     "needs"),
    (lambda: exact_gradient("kl", make_categorical()), "unknown divergence"),
    (lambda: prefix_log_probs(torch.zeros(2, 2, dtype=torch.float64), make_sequence()), "logp_student_NV"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_seed_must_be_an_int_or_generator(toy):
    with pytest.raises(TypeError, match="Generator"):
        sample_gradients("jsd", toy, "opd", 10, generator=1.5)
