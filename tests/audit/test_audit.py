"""The estimator audit: exact expected gradients of the catalogue's estimators against hand derivations."""
import math

import pytest
import torch

from opdlab.app import cli
from opdlab.audit.expected import (DIVERGENCES, audit, catalogue, estimator, expected_gradient, get_estimator,
                                   load_function, verdicts)
from opdlab.errors import UserError
from opdlab.exact.toy import (expected_estimator_gradient, expected_sequence_estimator_gradient, make_categorical,
                              make_sequence, sequence_estimator_moments)

TOL = 1e-6


@pytest.fixture(scope="module")
def frame():
    return audit(n_toys=4, seed=11, vocab_size=3, horizon=3)


@pytest.fixture(scope="module")
def table(frame):
    return verdicts(frame).set_index(["kind", "estimator"])


def test_every_hand_derivation_holds_on_exact_toys(frame):
    derived = [e.name for e in catalogue().values() if e.follows is not None]
    assert len(derived) >= 20
    errors = frame[frame.estimator.isin(derived)].groupby(["kind", "estimator"]).hand_error.max()
    assert len(errors) == 2 * len(derived)
    assert (errors < TOL).all(), errors[errors >= TOL]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_opd_plus_follows_its_own_divergence(frame, name):
    rows = frame[(frame.estimator == f"opd_plus:{name}") & (frame.divergence == name)
                 & (frame.target == "token_local")]
    assert len(rows) == 8
    assert rows.cosine.to_numpy() == pytest.approx(1.0, abs=TOL)
    assert rows.relative_error.max() < TOL


@pytest.mark.parametrize("kind", ["categorical", "sequence"])
def test_verdicts_derivable_by_hand(table, kind):
    t = table.loc[kind]
    assert t.loc["k3_backprop", "closest"] == "forward_kl"
    assert t.loc["k3_backprop", "cos_forward_kl"] == pytest.approx(1.0, abs=TOL)
    assert t.loc["k3_backprop", "cos_reverse_kl"] < 1 - 1e-3  # claims reverse KL, follows forward KL
    for name in ("k1_pg", "k2_backprop", "k3_plus_backprop", "k1_ratio_undetached", "gkd_beta1", "opd:reverse_kl"):
        assert t.loc[name, "closest"] == "reverse_kl", name
        assert t.loc[name, "cos_reverse_kl"] == pytest.approx(1.0, abs=TOL), name
        assert t.loc[name, "rel_error_claimed"] < TOL, name
    assert t.loc["minillm_trl_default", "closest_scale"] == pytest.approx(2.0, abs=TOL)  # RKL counted twice
    for name in ("k1_backprop", "verl_kl_alias_backprop"):
        assert t.loc[name, "closest"].startswith("nothing"), name
    assert t.loc["gkd_beta0", "closest"] == "forward_kl"
    assert t.loc["gkd_jsd_beta0.5", "cos_claimed"] == pytest.approx(1.0, abs=TOL)
    assert t.loc["gkd_beta0.001", "closest_scale"] < 2e-3  # the interior near beta = 0 is not forward KL: a jump
    assert t.loc["tv_sign", "closest"] == "tv" and t.loc["tv_sign", "closest_scale"] == pytest.approx(2.0, abs=TOL)
    assert t.loc["abs_backprop", "closest"] == "tv" and t.loc["abs_backprop", "closest_scale"] == pytest.approx(2.0)
    assert t.loc["trinity_jsd_advantage", "cos_claimed"] < 1 - 1e-3
    assert t.loc["opd:forward_kl", "cos_forward_kl"] < 0
    # not detaching the advantage adds zero-mean terms: same mean, more variance
    assert t.loc["k1_ratio_undetached", "variance"] > t.loc["k1_pg", "variance"]


def test_return_to_go_follows_the_sequence_gradient(table):
    t = table.loc["sequence"]
    assert t.loc["k1_return_gamma1", "closest"] == "reverse_kl (sequence)"
    assert t.loc["k1_return_gamma1", "cos_claimed"] == pytest.approx(1.0, abs=TOL)
    assert t.loc["k1_return_gamma0.5", "cos_claimed"] < 1 - 1e-3  # gamma in between mixes the two targets


def test_audit_agrees_with_the_toy_module():
    """opdlab.exact.toy computes the OPD/OPD+ expectations by its own formulas; the audit's autograd must agree."""
    cat, seq = make_categorical(6, seed=3), make_sequence(3, 3, seed=4)
    for div in ("forward_kl", "jsd", "alpha:0.5"):
        for method in ("opd", "opd_plus"):
            est = get_estimator(f"{method}:{div}")
            mean, _ = expected_gradient(est, cat)
            assert torch.allclose(mean, expected_estimator_gradient(div, cat, method), atol=1e-12)
            mean, variance = expected_gradient(est, seq)
            ref_mean, ref_variance = sequence_estimator_moments(div, seq, method, gamma=0.0)
            assert torch.allclose(mean, ref_mean, atol=1e-12)
            assert variance == pytest.approx(ref_variance, rel=1e-10)
    mean, _ = expected_gradient(get_estimator("k1_return_gamma1"), seq)
    assert torch.allclose(mean, expected_sequence_estimator_gradient("reverse_kl", seq, "opd", gamma=1.0),
                          atol=1e-12)


def test_sampled_gradients_match_the_exact_mean():
    """A real training step's gradient (sampled tokens, loss.backward) averages to the audit's E[g]."""
    toy = make_categorical(5, seed=2)
    est = get_estimator("k3_backprop")
    mean, variance = expected_gradient(est, toy)
    n = 20000
    theta = toy.logits_student_K.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    y = torch.multinomial(logp.detach().exp(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    loss = est.terms[0].fn(logp_student_BT=logp[y][:, None], logp_teacher_BT=toy.logp_teacher_K[y][:, None])
    (grad,) = torch.autograd.grad(loss.sum() / n, theta)
    standard_error = math.sqrt(variance / n)
    assert float((grad - mean).norm()) < 5 * standard_error


def test_a_user_function_in_its_own_words():
    def my_loss(logp_student_BT, logp_teacher_BT):
        """k3, written the way my trainer writes it."""
        ratio = torch.exp(logp_teacher_BT - logp_student_BT)
        return ratio - 1 - (logp_teacher_BT - logp_student_BT)

    t = verdicts(audit(estimator(my_loss, "backprop", claims="reverse_kl"), n_toys=3)).set_index("kind")
    assert (t.closest == "forward_kl").all() and t.cos_claimed.lt(1 - 1e-3).all()


@pytest.mark.parametrize("fn,mode,error,match", [
    (lambda logp_student_BT, labels: logp_student_BT, "backprop", UserError, "parameter 'labels'"),
    (lambda x: x, "backprop", UserError, "parameter 'x'.*allowed parameter names: logp_student_BT"),
    (lambda logp_student_BT: logp_student_BT, "reinforce", UserError, "unknown gradient mode 'reinforce'"),
])
def test_bad_estimators_are_refused_when_built(fn, mode, error, match):
    with pytest.raises(error, match=match):
        estimator(fn, mode)


@pytest.mark.parametrize("fn,error,match", [
    (lambda logp_student_BT: logp_student_BT * float("nan"), UserError, "returned .* non-finite values"),
    (lambda logp_student_BT, logp_teacher_BT: torch.log(logp_teacher_BT - logp_student_BT), UserError,
     "non-finite"),
    (lambda logp_student_BT: logp_student_BT.sum(-1), UserError, r"returned shape \(8,\); expected"),
    (lambda logp_student_BT: 1.0, UserError, "returned float"),
])
def test_bad_estimators_are_refused_when_audited(fn, error, match):
    with pytest.raises(error, match=match):
        audit(estimator(fn, "backprop", name="mine"), kinds="categorical", n_toys=1)


def test_bad_audit_arguments():
    with pytest.raises(UserError, match="unknown toy kind 'tree'"):
        audit("k1_pg", kinds="tree", n_toys=1)
    with pytest.raises(UserError, match="unknown catalogue estimator 'k9'"):
        audit("k9", n_toys=1)
    with pytest.raises(UserError, match="unknown divergence 'kl'"):
        estimator(lambda logp_student_BT: logp_student_BT, "backprop", claims="kl")
    with pytest.raises(UserError, match="dpd needs a parameter > 0"):
        estimator(lambda logp_student_BT: logp_student_BT, "backprop", claims="dpd:-1")
    with pytest.raises(UserError, match="wrap a function with"):
        audit(lambda logp_student_BT: logp_student_BT, n_toys=1)


def test_load_function(tmp_path):
    (tmp_path / "losses.py").write_text("def mine(logp_student_BT, logp_teacher_BT):\n"
                                        "    return logp_teacher_BT - logp_student_BT\n"
                                        "def wrong(logits):\n    return logits\n")
    assert load_function(f"{tmp_path}/losses.py:mine").__name__ == "mine"
    with pytest.raises(UserError, match="parameter 'logits'"):
        load_function(f"{tmp_path}/losses.py:wrong")
    with pytest.raises(UserError, match="has no attribute 'nope'"):
        load_function(f"{tmp_path}/losses.py:nope")
    with pytest.raises(UserError, match="MODULE:FUNCTION"):
        load_function("losses")
    with pytest.raises(UserError, match="cannot import module 'no_such_module_x'"):
        load_function("no_such_module_x:f")


def test_cli_audit_one_entry_and_a_user_function(capsys, tmp_path):
    assert cli.main(["audit", "k3_backprop", "--n-toys", "2", "--kind", "categorical"]) == 0
    out = capsys.readouterr().out
    assert "forward_kl (cos 1.000, scale 1)" in out and "verl" in out
    (tmp_path / "mine.py").write_text("def sign_adv(logp_student_BT, logp_teacher_BT):\n"
                                      "    return (logp_teacher_BT - logp_student_BT).sign()\n")
    csv = tmp_path / "audit.csv"
    assert cli.main(["audit", "--function", f"{tmp_path}/mine.py:sign_adv", "--mode", "policy_gradient",
                     "--claims", "tv", "--n-toys", "2", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "sign_adv" in out and "tv (cos 1.000, scale 2)" in out and csv.exists()


def test_cli_audit_errors(capsys, tmp_path):
    assert cli.main(["audit", "--function", "x.py:f"]) == 2
    assert "--function needs --mode" in capsys.readouterr().err
    assert cli.main(["audit", "nope"]) == 2
    assert "unknown catalogue estimator 'nope'" in capsys.readouterr().err
    (tmp_path / "bad.py").write_text("def nan_loss(logp_student_BT):\n    return logp_student_BT * float('nan')\n")
    assert cli.main(["audit", "--function", f"{tmp_path}/bad.py:nan_loss", "--mode", "backprop",
                     "--n-toys", "1"]) == 2
    assert "non-finite values" in capsys.readouterr().err
    assert cli.main(["audit", "--list"]) == 0
    assert "k3_backprop" in capsys.readouterr().out
