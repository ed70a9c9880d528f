"""The peers' estimators as they ship: source pins, the three corrected entries against direct closed forms,
verl's defaults and clamp, the reusable unbiasedness check, and the docs table rendered from the catalogue."""
import functools
from pathlib import Path

import pandas as pd
import pytest
import torch

from opdlab.app import cli
from opdlab.audit.catalogue import CATALOGUE, OUT_OF_SCOPE, SOURCES, iw_opd, nemo_rl_mixed_topk
from opdlab.audit.expected import EstimatorFunctionError, audit, estimator, expected_gradient, get_estimator, verdicts
from opdlab.audit.types import Estimator, Source, Term, target
from opdlab.errors import UserError
from opdlab.exact.toy import make_categorical
from opdlab.report.audit_table import MARKERS, render, section
from opdlab.testing import assert_unbiased

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6  # the audit is exact (enumeration, float64): errors are ~1e-12, far below this


def _unpinned(entries) -> list[str]:
    """Entries whose source pin is missing or incomplete."""
    bad = []
    for name, e in entries.items():
        s = e.source
        ok = isinstance(s, Source) and s.repo and s.version and s.defaults
        if ok and s.read:
            ok = bool(s.path and s.lines and s.excerpt)
        elif ok:
            ok = bool(s.note)  # the paper only: say what was read instead
        if not ok:
            bad.append(name)
    return bad


def test_every_catalogue_entry_carries_its_source_pin():
    assert _unpinned(CATALOGUE) == []
    peers = [n for n, e in CATALOGUE.items() if e.source.repo != "opdlab"]
    assert set(SOURCES) == set(peers) and len(peers) >= 25
    read = [n for n in peers if CATALOGUE[n].source.read]
    assert all(len(CATALOGUE[n].source.version.split()[0]) == 40 for n in read)  # a full commit
    # counterfactual: an entry without a pin, or a read one without its excerpt, is caught
    bare = Estimator("bare", (Term(lambda logp_student_BT: logp_student_BT, "backprop"),))
    no_excerpt = Estimator("no_excerpt", bare.terms,
                           source=Source("o/r", "p.py", "a" * 40, "1-2", "", "defaults"))
    assert _unpinned({"bare": bare, "no_excerpt": no_excerpt}) == ["bare", "no_excerpt"]


def test_out_of_scope_entries_say_why():
    assert set(OUT_OF_SCOPE) == {"trl_sparse_gjsd_tail_bucket"}
    for name, reason in OUT_OF_SCOPE.items():
        assert name not in CATALOGUE
        assert "sampled token's id" in reason and "opdlab.core.sparse" in reason and "197-238" in reason


def test_top_k_losses_renormalised_on_the_support_follow_no_divergence():
    full = estimator(functools.partial(nemo_rl_mixed_topk, top_k=8), "backprop", name="nemo_full",
                     follows={"forward_kl": 0.5, "reverse_kl": 0.5})
    t = verdicts(audit([full, "nemo_rl_mixed_topk", "miles_topk_reward"], kinds="categorical", n_toys=4)
                 ).set_index("estimator")
    assert t.loc["nemo_full", "hand_error"] < TOL  # the whole vocabulary as support: ½ FKL + ½ RKL exactly
    assert t.loc["nemo_rl_mixed_topk", "closest_cosine"] < 1 - 1e-3  # renormalised on the top half: none
    assert t.loc["miles_topk_reward", "closest"].startswith("nothing")  # a per-context constant advantage


def _dpi(toy):
    """d pi_a / d theta_b = pi_a (delta_ab - pi_b) on a categorical toy, shape (K, K)."""
    pi = toy.logp_student_K.detach().exp()
    return torch.diag(pi) - pi[:, None] * pi[None, :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_opd_follows_the_density_power_divergence(seed):
    toy = make_categorical(8, seed=seed)
    alpha = 5.0
    pi, q = toy.logp_student_K.detach().exp(), toy.logp_teacher_K.exp()
    closed = -((q ** alpha - pi ** alpha) @ _dpi(toy))  # E[g] = -sum_a (q^a - pi^a) grad pi_a, minimised
    mean, _ = expected_gradient(get_estimator("power_opd_alpha5"), toy)
    assert torch.allclose(mean, closed, atol=1e-12)
    # and that is alpha/(1+alpha) times the gradient of Basu's d_alpha(pi, q), written out by hand
    d_closed = (1 + 1 / alpha) * ((pi ** alpha - q ** alpha) @ _dpi(toy))
    assert torch.allclose(mean, alpha / (1 + alpha) * d_closed, atol=1e-12)
    theta = toy.logits_student_K.detach().clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(target("dpd:5").exact(toy.logp_teacher_K, torch.log_softmax(theta, -1)), theta)
    assert torch.allclose(auto, d_closed, atol=1e-12)


@pytest.mark.parametrize("tau", [0.05, 0.12, 0.2])
def test_a_negative_advantage_on_low_probability_tokens_pushes_their_mass_down(tau):
    toy = make_categorical(8, seed=4)
    c = 0.5

    def selected(logp_student_BT):
        return -c * (logp_student_BT.detach().exp() < tau).to(logp_student_BT.dtype)

    pi = toy.logp_student_K.detach().exp()
    S = (pi < tau).to(pi.dtype)
    assert 0 < S.sum() < 8  # the threshold selects some tokens, not all
    closed = c * (S @ _dpi(toy))  # c grad sum_{a: pi_a < tau} pi_a
    mean, _ = expected_gradient(estimator(selected, "policy_gradient"), toy)
    assert torch.allclose(mean, closed, atol=1e-12) and float(mean.norm()) > 1e-3
    # counterfactual: the same advantage on every token (no selection) has E[g] = 0
    everywhere, _ = expected_gradient(estimator(lambda logp_student_BT: -c * torch.ones_like(logp_student_BT),
                                                "policy_gradient"), toy)
    assert float(everywhere.norm()) < 1e-12


def test_iw_opd_weight_is_the_shipped_one():
    a = torch.tensor([[1.0, -2.0, 1.0]], dtype=torch.float64)
    advantage = iw_opd(torch.zeros_like(a), a)  # log u = a
    w = torch.tensor([[1.5, 1.375, 1.125]], dtype=torch.float64)  # 1 + 0.5 (1 - [0, 1, 3] / 4)
    assert torch.allclose(advantage, w * a)
    assert float(advantage.abs().div(a.abs()).max()) <= 1.5  # bounded in [1, 1 + gamma], unlike a prefix ratio


@pytest.fixture(scope="module")
def table():
    names = ["iw_opd", "power_opd_alpha5", "opsa_low_probability", "verl_yaml_default", "verl_dataclass_default",
             "verl_example_default", "verl_kl_alias_backprop", "verl_forward_kl_topk", "abs_backprop"]
    return verdicts(audit(names, n_toys=6, seed=3)).set_index(["kind", "estimator"])


def test_fixed_entries_give_the_shipped_verdicts(table):
    for kind in ("categorical", "sequence"):
        assert table.loc[(kind, "power_opd_alpha5"), "closest"].startswith("density-power divergence")
        assert table.loc[(kind, "power_opd_alpha5"), "closest_scale"] == pytest.approx(5 / 6, abs=TOL)
        assert table.loc[(kind, "power_opd_alpha5"), "cos_reverse_kl"] < 0.99  # no f-divergence it follows
        assert table.loc[(kind, "opsa_low_probability"), "closest"].startswith("pushes down low-probability mass")
        assert table.loc[(kind, "opsa_low_probability"), "closest_scale"] == pytest.approx(0.5, abs=TOL)
        assert table.loc[(kind, "verl_kl_alias_backprop"), "closest"].startswith("nothing")
        assert table.loc[(kind, "abs_backprop"), "closest"] == "tv"
        assert table.loc[(kind, "verl_forward_kl_topk"), "closest"] in ("forward_kl", "forward_kl (sequence)",
                                                                        "gjsd:0.1", "gjsd:0.1 (sequence)")
        assert table.loc[(kind, "verl_forward_kl_topk"), "cos_forward_kl"] < 1 - 1e-3  # the tail is dropped
    assert table.loc[("categorical", "iw_opd"), "closest"] == "reverse_kl"
    assert table.loc[("categorical", "iw_opd"), "closest_scale"] == pytest.approx(1.5, abs=TOL)  # w = 1 + gamma
    assert 0.99 < table.loc[("sequence", "iw_opd"), "cos_reverse_kl"] < 1 - 1e-4


def test_verl_defaults_follow_their_targets_where_the_clamps_do_not_bind():
    mild = verdicts(audit(["verl_yaml_default", "verl_dataclass_default", "verl_example_default"],
                          n_toys=4, seed=0, temperature=4.0)).set_index(["kind", "estimator"])
    for kind in ("categorical", "sequence"):
        assert mild.loc[(kind, "verl_yaml_default"), "cos_forward_kl"] == pytest.approx(1.0, abs=TOL)
        assert mild.loc[(kind, "verl_example_default"), "rel_error_claimed"] < TOL
    usual = verdicts(audit(["verl_yaml_default", "k3_backprop"], n_toys=20, seed=0)).set_index(["kind", "estimator"])
    for kind in ("categorical", "sequence"):  # k3 clamped at 10 zeroes the gradient where u > 13.6: it binds here
        assert usual.loc[(kind, "k3_backprop"), "cos_forward_kl"] == pytest.approx(1.0, abs=TOL)
        assert usual.loc[(kind, "verl_yaml_default"), "cos_forward_kl"] < 1 - 1e-3
    cold = verdicts(audit(["verl_example_default", "k1_pg"], n_toys=20, seed=0, temperature=0.25)
                    ).set_index(["kind", "estimator"])
    for kind in ("categorical", "sequence"):
        assert cold.loc[(kind, "k1_pg"), "rel_error_claimed"] < TOL
        assert cold.loc[(kind, "verl_example_default"), "rel_error_claimed"] > 1e-3  # clamp(log u, -10, 10) binds


def test_assert_unbiased_passes_unbiased_losses():
    def k1_reward(logp_student_BT, logp_teacher_BT):
        return logp_teacher_BT - logp_student_BT

    assert assert_unbiased(k1_reward, "reverse_kl", mode="policy_gradient") < TOL
    for div in ("forward_kl", "jsd", "reverse_kl"):
        assert assert_unbiased(get_estimator(f"opd_plus:{div}"), div) < TOL
    assert assert_unbiased(get_estimator("tv_sign"), "tv", up_to_scale=True) < TOL
    assert assert_unbiased(get_estimator("power_opd_alpha5"), "dpd:5", up_to_scale=True) < TOL


def test_assert_unbiased_fails_biased_losses_with_the_verdict():
    with pytest.raises(AssertionError, match=r"opd:forward_kl .* biased for forward_kl.*cosine to forward_kl -0\.9"):
        assert_unbiased(get_estimator("opd:forward_kl"), "forward_kl")

    def verl_k3(logp_student_BT, logp_teacher_BT):  # verl's k3, backpropagated (its YAML default)
        log_u = logp_teacher_BT - logp_student_BT
        return log_u.exp() - log_u - 1

    with pytest.raises(AssertionError, match=r"biased for reverse_kl.*it follows forward_kl \(cosine 1\.000"):
        assert_unbiased(verl_k3, "reverse_kl", mode="backprop")
    with pytest.raises(AssertionError, match=r"it follows nothing"):
        assert_unbiased(get_estimator("k1_backprop"), "reverse_kl")
    with pytest.raises(AssertionError, match="biased for tv"):  # twice TV's gradient: not equal, same direction
        assert_unbiased(get_estimator("tv_sign"), "tv")
    with pytest.raises(UserError, match="unknown divergence 'rkl'"):
        assert_unbiased(verl_k3, "rkl", mode="backprop")


def test_docs_table_is_rendered_from_the_catalogue():
    doc = (ROOT / "docs" / "audit.md").read_text()
    rendered = render(pd.read_csv(ROOT / "figures" / "data" / "07_verdicts.csv"))
    assert section(doc) == rendered
    for name, e in CATALOGUE.items():
        if e.source.repo != "opdlab":
            assert f"`{name}`" in rendered
    # counterfactual: a hand edit of the table no longer matches
    edited = doc.replace(MARKERS[0], MARKERS[0] + "\n| typed | row |")
    assert section(edited) != rendered


def test_cli_reports_an_exception_in_the_users_function_in_one_line(tmp_path, capsys):
    (tmp_path / "mine.py").write_text("import torch\n\n\ndef broken(logp_student_BT, logp_teacher_BT):\n"
                                      "    ratio = logp_teacher_BT - logp_student_BT\n"
                                      "    return ratio / 0 + {}['missing']\n")
    args = ["audit", "--function", f"{tmp_path}/mine.py:broken", "--mode", "backprop", "--n-toys", "1",
            "--kind", "categorical"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "broken raised KeyError" in err and f"{tmp_path}/mine.py:6" in err and "--traceback" in err
    with pytest.raises(KeyError, match="missing"):  # --traceback: the user's exception itself, unabridged
        cli.main(args + ["--traceback"])
    (tmp_path / "typo.py").write_text("def f(logp_student_BT):\n    return logp_student_BT +\n")
    assert cli.main(["audit", "--function", f"{tmp_path}/typo.py:f", "--mode", "backprop"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "raised SyntaxError" in err and "typo.py:2" in err
    with pytest.raises(SyntaxError):
        cli.main(["audit", "--function", f"{tmp_path}/typo.py:f", "--mode", "backprop", "--traceback"])
    (tmp_path / "loud.py").write_text("import math\n\nSCALE = math.log(0)\n")  # fails while importing
    assert cli.main(["audit", "--function", f"{tmp_path}/loud.py:f", "--mode", "backprop"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "raised ValueError: math domain error" in err and "loud.py:3" in err


def test_an_exception_in_a_users_function_keeps_its_traceback_as_the_cause():
    def indexes(logp_student_BT):
        return logp_student_BT * [1.0][2]  # IndexError

    with pytest.raises(EstimatorFunctionError, match=r"indexes raised IndexError.*test_audit_peers\.py:\d+") as err:
        audit(estimator(indexes, "backprop"), kinds="categorical", n_toys=1)
    assert isinstance(err.value, UserError) and isinstance(err.value.__cause__, IndexError)
    assert err.value.__cause__.__traceback__ is not None
