"""Numerics that hold for any logits: masked tokens never reach f, and the full-vocabulary sums stay finite (and
equal to a float64 reference) when the student puts a token up to 100 nats below the others."""
import warnings

import pytest
import torch

from opdlab.config.choices import REPRESENTATIVE_DIVERGENCES
from opdlab.core.divergences import get, over_row_chunks
from opdlab.core.estimators import compute_advantages, expected_advantage_baseline, full_vocabulary_loss

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # gjsd:0 and gjsd:1 warn that they are identically zero
    EVERY = [*REPRESENTATIVE_DIVERGENCES, "gjsd:0", "gjsd:1", "alpha:0", "alpha:1", "alpha:2", "alpha:-1"]
    DIVS = {name: get(name) for name in EVERY}
LOG_U = [-100.0, -50.0, 50.0, 98.0, 100.0]


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("method", ["opd", "opd_plus"])
@pytest.mark.parametrize("log_u", LOG_U)
def test_a_masked_token_never_reaches_f(name, method, log_u):
    logp_s = torch.tensor([[-1.0, -1.0 - max(log_u, 0.0), -2.0]])
    logp_t = torch.tensor([[-1.5, -1.0 + min(log_u, 0.0), -2.5]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    adv = compute_advantages(DIVS[name], logp_s, logp_t, mask, method, gamma=1.0, log_u_clip=None)
    assert adv.A_BT[0, 1] == 0 and torch.isfinite(adv.A_BT).all() and adv.n_clipped == 0
    clean = compute_advantages(DIVS[name], logp_s[:, [0, 2]], logp_t[:, [0, 2]], None, method, gamma=1.0)
    torch.testing.assert_close(adv.A_BT[:, [0, 2]], clean.A_BT, rtol=0, atol=0)
    # a baseline that is not finite at a masked context does not leak either
    b_BT = torch.tensor([[0.1, float("inf"), 0.2]])
    assert torch.isfinite(compute_advantages(DIVS[name], logp_s, logp_t, mask, method, baseline_BT=b_BT).A_BT).all()


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("log_u", LOG_U)
def test_an_unmasked_extreme_token_is_finite_or_asks_for_a_clip(name, log_u):
    logp_s = torch.tensor([[-1.0, -1.0 - max(log_u, 0.0)]])
    logp_t = torch.tensor([[-1.5, -1.0 + min(log_u, 0.0)]])
    for method in ("opd", "opd_plus"):
        try:
            A = compute_advantages(DIVS[name], logp_s, logp_t, None, method).A_BT
            assert torch.isfinite(A).all()
        except ValueError as err:
            assert "log_u_clip" in str(err)
        assert torch.isfinite(compute_advantages(DIVS[name], logp_s, logp_t, None, method, log_u_clip=20.0).A_BT).all()


def _extreme_distributions(V=1000, nats=100.0, seed=0):
    """Student: one token ``nats`` below the others at each of 3 contexts; teacher: random logits (spread 2)."""
    g = torch.Generator().manual_seed(seed)
    logits_s = torch.randn(3, 4, V, generator=g)
    logits_s[:, :, 7] -= nats
    logits_t = 2 * torch.randn(3, 4, V, generator=g)
    return torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("nats", [50.0, 100.0])
def test_full_vocabulary_sums_are_finite_and_exact(name, nats):
    div = DIVS[name]
    logp_s, logp_t = _extreme_distributions(nats=nats)
    for method in ("f", "opd", "opd_plus"):
        if method == "f":
            value = div.exact(logp_t, logp_s)
            reference = div.exact(logp_t.double(), logp_s.double())  # float64 holds every term here
        else:
            value = expected_advantage_baseline(div, logp_s, logp_t, method)
            reference = expected_advantage_baseline(div, logp_s.double(), logp_t.double(), method)
        # finite wherever the exact value fits in float32 (chi^2-like ones can exceed it: then inf, never NaN)
        largest = torch.finfo(torch.float32).max
        fits = reference.abs() < largest / 4  # room for the intermediate terms of a difference
        assert not torch.isnan(value).any() and torch.isfinite(value[fits]).all(), (name, method)
        assert torch.isinf(value[reference.abs() >= largest]).all()
        torch.testing.assert_close(value[fits].double(), reference[fits], rtol=1e-4, atol=1e-5)
        if name not in ("pearson_chi2", "alpha:2"):  # bounded by the log-ratios: always finite
            assert bool(fits.all()), (name, method)
    # and the exact loss has a finite gradient where it is finite itself
    student = logp_s.clone().requires_grad_(True)
    loss = full_vocabulary_loss(div, student, logp_t)
    loss.backward()
    assert not torch.isfinite(loss) or torch.isfinite(student.grad).all(), name


def test_a_divergence_too_large_for_the_dtype_is_inf_not_nan():
    logp_s, logp_t = _extreme_distributions(V=8, nats=100.0)  # Pearson: q^2 / p ~ e^95 > float32's largest
    D = get("pearson_chi2").exact(logp_t, logp_s)
    assert not torch.isnan(D).any() and torch.isinf(D).any()
    assert torch.isfinite(get("pearson_chi2").exact(logp_t.double(), logp_s.double())).all()


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "alpha:0.5"])
def test_chunked_sums_are_the_unchunked_ones_bit_for_bit(name):
    logp_s, logp_t = _extreme_distributions(V=50, nats=3.0)
    div = DIVS[name]
    whole = div.exact(logp_t, logp_s)
    chunked = over_row_chunks(lambda a, b: div.exact(a, b), logp_t, logp_s, chunk_elements=120)
    assert torch.equal(whole, chunked)
    plain = (logp_s.exp() * div.f(logp_t - logp_s)).sum(-1)  # ordinary inputs: the plain formula, bit for bit
    assert torch.equal(whole, plain)
