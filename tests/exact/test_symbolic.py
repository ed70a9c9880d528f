"""The sympy derivation (opdlab.exact.symbolic) against the registry's closed forms."""
import numpy as np
import pytest
import sympy as sp
import torch

from opdlab.core.divergences import get
from opdlab.exact.symbolic import (ALPHA, BETA, REGISTRY_NAMES, U, advantage_curves, advantage_table,
                                   constant_error_solution, derive, error_is_constant, parse_f, registry_expression)

LOG_U = np.concatenate([np.linspace(-4, -0.05, 40), np.linspace(0.05, 4, 40)])  # off TV's kink at u = 1
FAMILY_MEMBERS = ("gjsd:0.25", "gjsd:0.9", "alpha:-1", "alpha:0", "alpha:0.3", "alpha:1", "alpha:2")


def _numeric(expr):
    values = sp.lambdify(U, expr, "numpy")(np.exp(LOG_U))
    return np.asarray(values, dtype=float) * np.ones_like(LOG_U)


@pytest.mark.parametrize("name", REGISTRY_NAMES + FAMILY_MEMBERS)
def test_registry_opd_plus_advantage_equals_sympy_w(name):
    div = get(name)
    d = derive(registry_expression(div))
    log_u = torch.as_tensor(LOG_U, dtype=torch.float64)
    np.testing.assert_allclose(div.opd_plus_advantage(log_u).numpy(), _numeric(d.opd_plus_advantage),
                               rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(div.f_prime(log_u).numpy(), _numeric(d.f_prime), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(div.f(log_u).numpy(), _numeric(d.f), rtol=1e-9, atol=1e-10)


def test_gradient_weight_and_advantage_are_opposite():
    d = derive("u*log(u)")
    assert sp.simplify(d.gradient_weight + d.opd_plus_advantage) == 0
    assert sp.simplify(d.opd_plus_advantage - U) == 0
    assert sp.simplify(d.stop_gradient_error - U * (sp.log(U) + 1)) == 0


def test_families_with_a_symbolic_parameter():
    gjsd = derive(registry_expression("gjsd:0.3", symbolic_parameter=True))
    assert sp.simplify(gjsd.opd_plus_advantage - (1 - BETA) * sp.log(BETA * U + 1 - BETA)) == 0
    amari = derive(registry_expression("alpha:0.3", symbolic_parameter=True), check=False)
    assert sp.simplify(amari.opd_plus_advantage - (U ** ALPHA - 1) / ALPHA) == 0


def test_error_is_constant_only_for_reverse_kl():
    table = advantage_table()
    constant = dict(zip(table.divergence, table.error_is_constant))
    assert constant.pop("reverse_kl") is True
    assert not any(constant.values())
    assert error_is_constant("-3*log(u)") and error_is_constant("-c*log(u)")
    assert not error_is_constant("u - 1 - log(u)")  # reverse KL plus a linear term: D_f same, error not


def test_dsolve_gives_minus_c_log_u():
    sol = constant_error_solution()
    c = sp.Symbol("c", nonnegative=True)
    assert sp.simplify(sol["f"] - (-c * sp.log(U))) == 0
    C = sorted(sol["general"].free_symbols - {U}, key=lambda s: s.name)
    assert len(C) == 2 and sp.simplify(sp.diff(sol["general"], U, 2) * U ** 2 + sp.diff(sol["general"], U) * U) == 0
    assert sp.simplify(sol["normalised"].subs(U, 1)) == 0


def test_user_typed_f():
    d = derive("(sqrt(u) - 1)^2")
    assert sp.simplify(d.opd_plus_advantage - (sp.sqrt(U) - 1)) == 0
    assert derive("1.5 * u*ln(u)").opd_plus_advantage.equals(1.5 * U)


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("u**2", r"f\(1\) must be 0"),
    ("log(u)", "not convex"),
    ("-(u-1)^2", "not convex"),
    ("u*log(u) + x", "unknown names"),
    ("sin(u) - sin(1)", "unknown names"),
    ("(u - 1", "could not read"),
    ('__import__("os").system("true")', "not allowed"),
    ("u.exp()", "not allowed"),
    ("lambda: 0", "not allowed"),
])
def test_bad_f(text, match):
    with pytest.raises(ValueError, match=match):
        derive(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError):
        parse_f(3)


def test_advantage_curves_agree_with_registry_and_are_tidy():
    df = advantage_curves(["forward_kl", "tv"], n_points=11)
    assert set(df.columns) == {"divergence", "label", "log_u", "u", "opd", "opd_plus", "error"}
    fk = df[df.divergence == "forward_kl"]
    np.testing.assert_allclose(fk.opd_plus, fk.u)
    with pytest.raises(ValueError):
        advantage_curves(log_u_min=1.0, log_u_max=0.0)
