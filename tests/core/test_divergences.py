"""The registry: f(1) = 0, convexity, f' and w_f against autograd, exact D_f, directions, families, bad input."""
import math
import warnings

import mpmath
import pytest
import torch
from hypothesis import given, settings, strategies as st

from opdlab.config.choices import FIXED_DIVERGENCES, check_trainable
from opdlab.config.spec import RunSpec
from opdlab.core.divergences import get, names
from opdlab.errors import UserError

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


def test_gjsd_endpoints_are_zero_in_the_registry_and_refused_for_training():
    with pytest.warns(UserWarning, match="identically zero"):  # the registry keeps the continuous family
        assert get("gjsd:0").f(torch.linspace(-3, 3, 7)).abs().max() == 0
    for name, nearest, shape in [("gjsd:0", "gjsd:1.2e-07", "alpha:1"), ("gjsd:1", "gjsd:0.99999988", "alpha:0"),
                                 ("gjsd:0.9999999999999999", "gjsd:0.99999988", "alpha:0"),  # a rounding away
                                 ("gjsd:1e-9", "gjsd:1.2e-07", "alpha:1")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the endpoints' registry warning
            with pytest.raises(UserError, match=f"trains nothing.*nearest setting that trains is {nearest}.*{shape}"):
                check_trainable(name)
            with pytest.raises(ValueError, match="trains nothing"):
                RunSpec.from_dict({"divergence": name})
        check_trainable(nearest)  # the advice is a setting that is accepted
        RunSpec.from_dict({"divergence": nearest})
    for name in ("gjsd:1e-6", "gjsd:0.5", "reverse_kl", "alpha:0", "alpha:1"):
        check_trainable(name)


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


# -- the families against a high-precision evaluation, at their parameters' ends -----------------------------------
DIGITS = 1500
"""Working digits of the reference: the textbook forms cancel up to about 650 digits at the smallest floats
(m = 1 + beta (u - 1) with beta, log u near 5e-324), and 50 are left beyond that."""
END = 1e-12
LOG_U = st.floats(-30.0, 30.0, allow_nan=False)
GJSD_WEIGHTS = st.one_of(st.floats(0.0, END), st.floats(1.0 - END, 1.0), st.floats(0.0, 1.0))
ALPHAS = st.one_of(st.floats(-END, END), st.floats(1.0 - END, 1.0 + END), st.floats(-4.0, 4.0))


def mp_gjsd(b, L):
    """(f, w_f) of gjsd:b at u = e^L from the textbook form, in ``DIGITS`` digits."""
    with mpmath.workdps(DIGITS):
        b, L = mpmath.mpf(b), mpmath.mpf(L)
        u = mpmath.exp(L)
        m = b * u + 1 - b
        return b * u * L - m * mpmath.log(m), (1 - b) * mpmath.log(m)


def mp_amari(a, L):
    """(f, w_f) of alpha:a at u = e^L from the textbook form, in ``DIGITS`` digits, with the limits at a = 0, 1."""
    with mpmath.workdps(DIGITS):
        a, L = mpmath.mpf(a), mpmath.mpf(L)
        u = mpmath.exp(L)
        if a == 0:
            return u - 1 - L, L
        if a == 1:
            return u * L - u + 1, u - 1
        return (mpmath.exp(a * L) - a * u - (1 - a)) / (a * (a - 1)), (mpmath.exp(a * L) - 1) / a


def assert_accurate(value, exact, what):
    """Relative error below 1e-12 of the high-precision value (and an absolute floor of 1e-300, where the exact
    value itself is beyond float64)."""
    assert abs(mpmath.mpf(value) - exact) <= 1e-12 * abs(exact) + 1e-300, (what, value, float(exact))


@settings(max_examples=400, deadline=None)
@given(b=GJSD_WEIGHTS, L=LOG_U)
def test_gjsd_matches_high_precision_near_its_ends_and_is_non_negative(b, L):
    div = get(f"gjsd:{b!r}")
    assert div.parameter == b
    f_exact, w_exact = mp_gjsd(b, L)
    f, w = float(div.f(torch.tensor([L]))), float(div.opd_plus_advantage(torch.tensor([L])))
    assert f >= 0.0  # Jensen: f = beta u g(ln(u/m)) + (1 - beta) g(-ln m), both terms >= 0
    assert_accurate(f, f_exact, ("f", b, L))
    assert_accurate(w, w_exact, ("w", b, L))


@settings(max_examples=400, deadline=None)
@given(a=ALPHAS, L=LOG_U)
def test_amari_matches_high_precision_near_its_ends_and_is_non_negative(a, L):
    div = get(f"alpha:{a!r}")
    f_exact, w_exact = mp_amari(a, L)
    if abs(f_exact) > 1e300:  # u^a beyond float64 (|a| L > 690)
        return
    f, w = float(div.f(torch.tensor([L]))), float(div.opd_plus_advantage(torch.tensor([L])))
    assert f >= 0.0  # convex with f(1) = f'(1) = 0
    assert_accurate(f, f_exact, ("f", a, L))
    assert_accurate(w, w_exact, ("w", a, L))


def test_the_former_gjsd_form_fails_what_the_registry_passes():
    """Counterfactual: the form the registry used before, beta u ln u - m ln m with ln m by logaddexp, at a
    weight a rounding away from 1 is negative and nowhere near the high-precision value (f is 0.0012 there);
    the property test above would catch it."""
    b, L = 1.0 - 2.0 ** -53, torch.tensor([30.0])
    log_m = torch.logaddexp(L + math.log(b), torch.full_like(L, math.log(1.0 - b)))
    former = float(b * L.exp() * L - log_m.exp() * log_m)
    exact = mp_gjsd(b, 30.0)[0]
    assert former < 0 < exact
    with pytest.raises(AssertionError):
        assert_accurate(former, exact, "former")
    assert_accurate(float(get(f"gjsd:{b!r}").f(L)), exact, "registry")
