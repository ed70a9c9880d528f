"""The registry: f(1) = 0, convexity, f' and w_f against autograd, exact D_f, directions, families, bad input."""
import math
import warnings

import pytest
import torch

from opdlab.choices import FIXED_DIVERGENCES
from opdlab.divergences import get, names

FIXED = list(FIXED_DIVERGENCES)
FAMILY = ["gjsd:0.1", "gjsd:0.5", "gjsd:0.9", "alpha:-1", "alpha:0", "alpha:0.5", "alpha:1", "alpha:2"]
ALL = FIXED + FAMILY


pytestmark = pytest.mark.usefixtures("float64")


def test_names_lists_fixed_and_families():
    listed = names()
    assert all(n in listed for n in FIXED)
    assert any(n.startswith("gjsd:") for n in listed) and any(n.startswith("alpha:") for n in listed)


@pytest.mark.parametrize("name", ALL)
def test_f_vanishes_at_one(name):
    assert get(name).f(torch.zeros(3)).abs().max() < 1e-15


@pytest.mark.parametrize("name", ALL)
def test_f_is_convex_in_u(name):
    u = torch.linspace(0.02, 6.0, 600)
    f = get(name).f(u.log())
    second_difference = f[2:] - 2 * f[1:-1] + f[:-2]
    assert second_difference.min() > -1e-10


@pytest.mark.parametrize("name", ALL)
def test_f_prime_matches_autograd(name):
    # d f(e^L) / dL = u f'(u); avoid L = 0 where total variation has its kink
    L = torch.linspace(-4.0, 4.0, 41)
    L = L[L.abs() > 1e-6].clone().requires_grad_(True)
    div = get(name)
    (dfdL,) = torch.autograd.grad(div.f(L).sum(), L)
    torch.testing.assert_close(dfdL, L.exp().detach() * div.f_prime(L.detach()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_advantages_are_minus_f_and_w(name):
    L = torch.linspace(-5.0, 5.0, 101)
    div = get(name)
    u = L.exp()
    torch.testing.assert_close(div.opd_advantage(L), -div.f(L))
    torch.testing.assert_close(div.opd_plus_advantage(L), -div.f(L) + u * div.f_prime(L), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(div.stop_gradient_error(L), u * div.f_prime(L), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_exact_matches_brute_force_sum(name):
    g = torch.Generator().manual_seed(1)
    logp_t = torch.log_softmax(torch.randn(3, 6, generator=g), -1)
    logp_s = torch.log_softmax(torch.randn(3, 6, generator=g), -1)
    div = get(name)
    brute = torch.tensor([sum(math.exp(logp_s[b, a]) * float(div.f(logp_t[b, a] - logp_s[b, a]))
                              for a in range(6)) for b in range(3)])
    torch.testing.assert_close(div.exact(logp_t, logp_s), brute)
    assert (div.exact(logp_t, logp_s) >= -1e-12).all()  # an f-divergence is non-negative
    assert div.exact(logp_t, logp_t).abs().max() < 1e-12


def test_directions_of_the_two_kls():
    g = torch.Generator().manual_seed(2)
    logp_t = torch.log_softmax(torch.randn(4, 5, generator=g), -1)
    logp_s = torch.log_softmax(torch.randn(4, 5, generator=g), -1)
    kl_student_teacher = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    kl_teacher_student = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    torch.testing.assert_close(get("reverse_kl").exact(logp_t, logp_s), kl_student_teacher)
    torch.testing.assert_close(get("forward_kl").exact(logp_t, logp_s), kl_teacher_student)
    assert not torch.allclose(kl_student_teacher, kl_teacher_student)


def test_stop_gradient_error_is_constant_only_for_reverse_kl():
    L = torch.linspace(-3.0, 3.0, 31)
    for name in ALL:
        err = get(name).stop_gradient_error(L)
        spread = float(err.max() - err.min())
        if name in ("reverse_kl",):
            assert spread < 1e-12
        else:
            assert spread > 1e-3, name


def test_jsd_is_gjsd_at_one_half():
    L = torch.linspace(-6.0, 6.0, 25)
    for method in ("f", "f_prime", "opd_plus_advantage"):
        torch.testing.assert_close(getattr(get("jsd"), method)(L), getattr(get("gjsd:0.5"), method)(L))


@pytest.mark.parametrize("endpoint,inside", [("alpha:0", "alpha:1e-7"), ("alpha:1", "alpha:0.9999999"),
                                             ("alpha:1", "alpha:1.0000001"), ("alpha:0", "alpha:-1e-7")])
def test_amari_family_is_continuous_at_its_endpoints(endpoint, inside):
    L = torch.linspace(-4.0, 4.0, 33)
    for method in ("f", "f_prime", "opd_plus_advantage"):
        a, b = getattr(get(endpoint), method)(L), getattr(get(inside), method)(L)
        assert (a - b).abs().max() < 1e-5 * (1 + a.abs().max()), (method, endpoint, inside)


def test_amari_endpoints_are_the_kl_limits_plus_linear_terms():
    L = torch.linspace(-3.0, 3.0, 13)
    u = L.exp()
    torch.testing.assert_close(get("alpha:0").f(L), -L + u - 1)
    torch.testing.assert_close(get("alpha:1").f(L), u * L - u + 1)


@pytest.mark.parametrize("inside,endpoint", [("gjsd:1e-9", "gjsd:0"), ("gjsd:0.999999999", "gjsd:1")])
def test_gjsd_is_continuous_at_its_endpoints(inside, endpoint):
    L = torch.linspace(-4.0, 4.0, 33)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        end = get(endpoint)
    for method in ("f", "f_prime", "opd_plus_advantage"):
        assert (getattr(get(inside), method)(L) - getattr(end, method)(L)).abs().max() < 1e-6


def test_gjsd_endpoint_warns_that_it_is_zero():
    with pytest.warns(UserWarning, match="identically zero"):
        div = get("gjsd:0")
    assert div.f(torch.linspace(-3, 3, 7)).abs().max() == 0


@pytest.mark.parametrize("name", ALL)
def test_extreme_log_u_stays_finite_where_f_is_finite(name):
    L = torch.tensor([-30.0, -10.0, 10.0, 30.0])
    div = get(name)
    if div.name in ("pearson_chi2", "neyman_chi2", "forward_kl") or name == "alpha:2" or name == "alpha:-1":
        L = L.clamp(-10, 10)
    assert torch.isfinite(div.f(L)).all() and torch.isfinite(div.opd_plus_advantage(L)).all()


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*reverse_kl.*forward_kl.*gjsd.*alpha"):
        get("kl")


@pytest.mark.parametrize("bad,match", [
    ("gjsd:1.5", r"must lie in \[0, 1\]"), ("gjsd:-0.1", r"must lie in \[0, 1\]"),
    ("gjsd:abc", "must be a number"), ("alpha:nan", "must be finite"), ("alpha:inf", "must be finite"),
    ("gjsd", "needs a parameter"), ("alpha:", "needs a parameter"),
])
def test_bad_family_parameters(bad, match):
    with pytest.raises(ValueError, match=match):
        get(bad)


def test_non_string_name():
    with pytest.raises(TypeError, match="named by a string"):
        get(3)


def test_method_name_is_checked():
    with pytest.raises(ValueError, match="'opd' .* or 'opd_plus'"):
        get("jsd").advantage(torch.zeros(2), "gkd")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_exact_rejects_non_finite_log_probs(bad):
    logp = torch.log_softmax(torch.randn(2, 4), -1)
    broken = logp.clone()
    broken[1, 2] = bad
    with pytest.raises(ValueError, match="logp_student.*must be finite"):
        get("jsd").exact(logp, broken)
    with pytest.raises(ValueError, match="logp_teacher.*must be finite"):
        get("jsd").exact(broken, logp)


def test_exact_rejects_different_vocabularies():
    with pytest.raises(ValueError, match="different vocabularies"):
        get("reverse_kl").exact(torch.log_softmax(torch.randn(2, 5), -1), torch.log_softmax(torch.randn(2, 6), -1))
