"""Advantages, future terms, clip, baselines and surrogate gradients, checked against naive loops and autograd."""
import pytest
import torch

from naive import naive_advantages
from opdlab.core.divergences import get
from opdlab.core.estimators import (DEFAULT_REDUCTION, baselined_advantages, compute_advantages, discounted_future_sum,
                                    expected_advantage_baseline, full_vocabulary_loss, leave_one_out_baseline, reduce,
                                    reinforce_loss, token_advantages)
from opdlab.errors import UserError

pytestmark = pytest.mark.usefixtures("float64")


def _batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp_s = -torch.rand(B, T, generator=g) * 3
    logp_t = -torch.rand(B, T, generator=g) * 3
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    return logp_s, logp_t, mask


def _naive(div, logp_s, logp_t, mask, method, gamma):
    B, T = logp_s.shape
    A = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            log_u = logp_t[b, t] - logp_s[b, t]
            a = -div.f(log_u) if method == "opd" else div.opd_plus_advantage(log_u)
            future = sum(gamma ** (s - t) * div.f(logp_t[b, s] - logp_s[b, s])
                         for s in range(t + 1, T) if mask[b, s] > 0)
            A[b, t] = a - future
    return A


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "gjsd:0.2", "alpha:0.5", "tv"])
@pytest.mark.parametrize("method", ["opd", "opd_plus"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_token_advantages_match_a_naive_loop(name, method, gamma):
    logp_s, logp_t, mask = _batch()
    div = get(name)
    A = token_advantages(div, logp_s, logp_t, mask, method=method, gamma=gamma)
    torch.testing.assert_close(A, _naive(div, logp_s, logp_t, mask, method, gamma))


def test_no_mask_means_every_token_counts():
    logp_s, logp_t, _ = _batch()
    A = token_advantages("jsd", logp_s, logp_t, None, gamma=0.7)
    torch.testing.assert_close(A, _naive(get("jsd"), logp_s, logp_t, torch.ones_like(logp_s), "opd_plus", 0.7))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_discounted_future_sum_on_long_sequences(gamma):
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros_like(x)
    running = torch.zeros(2)
    for t in range(298, -1, -1):  # R_t = gamma * (x_{t+1} + R_{t+1})
        running = gamma * (x[:, t + 1] + running)
        expected[:, t] = running
    torch.testing.assert_close(discounted_future_sum(x, gamma), expected, rtol=1e-9, atol=1e-9)


def test_float32_input_keeps_its_dtype():
    x = torch.randn(2, 50, dtype=torch.float32)
    assert discounted_future_sum(x, 0.5).dtype == torch.float32


def test_clip_binds_and_is_counted():
    logp_s = torch.tensor([[-0.1, -9.0, -0.5, -12.0]])
    logp_t = torch.tensor([[-0.1, -0.1, -6.0, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = compute_advantages("forward_kl", logp_s, logp_t, mask, log_u_clip=2.0)
    assert out.n_clipped == 2 and out.n_tokens == 3  # the masked 4th token is not counted
    torch.testing.assert_close(out.A_BT, torch.tensor([[0.0, 2.0, -2.0, 0.0]]).exp() * mask)
    assert compute_advantages("forward_kl", logp_s, logp_t, mask).n_clipped == 0


def test_baseline_is_subtracted_on_unmasked_tokens_only():
    logp_s, logp_t, mask = _batch()
    b = torch.randn_like(logp_s)
    with_b = token_advantages("hellinger", logp_s, logp_t, mask, baseline_BT=b)
    torch.testing.assert_close(with_b, (token_advantages("hellinger", logp_s, logp_t, mask) - b) * mask)


def test_expected_advantage_baseline_for_reverse_kl_is_minus_kl_minus_one():
    g = torch.Generator().manual_seed(4)
    logp_s = torch.log_softmax(torch.randn(2, 3, 5, generator=g), -1)
    logp_t = torch.log_softmax(torch.randn(2, 3, 5, generator=g), -1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    torch.testing.assert_close(expected_advantage_baseline("reverse_kl", logp_s, logp_t), -kl - 1)
    torch.testing.assert_close(expected_advantage_baseline("jsd", logp_s, logp_t, method="opd"),
                               -get("jsd").exact(logp_t, logp_s))


def test_leave_one_out_baseline_matches_a_loop():
    A = torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(4, 5)
    mask[0, 1] = mask[2, 1] = mask[1, 3] = mask[2, 3] = mask[3, 3] = 0
    b = leave_one_out_baseline(A, mask)
    for i in range(4):
        for t in range(5):
            others = [A[j, t] for j in range(4) if j != i and mask[j, t] > 0]
            expected = sum(others) / len(others) if others else 0.0
            assert float(b[i, t]) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_baseline(A[:1])
    with pytest.raises(ValueError, match="divide the batch"):
        leave_one_out_baseline(A, mask, group_size=3)
    # two groups of two: each sample's baseline is its partner's advantage where the partner is unmasked
    b2 = leave_one_out_baseline(A, mask, group_size=2)
    partner = A[[1, 0, 3, 2]] * mask[[1, 0, 3, 2]]
    torch.testing.assert_close(b2, partner)


def test_non_finite_advantages_ask_for_a_clip():
    logp_s = torch.tensor([[-60.0, -1.0]], dtype=torch.float32)
    logp_t = torch.tensor([[-1.0, -1.0]], dtype=torch.float32)
    with pytest.raises(ValueError, match="pearson_chi2 advantages overflowed.*log_u_clip"):
        token_advantages("pearson_chi2", logp_s, logp_t)
    assert torch.isfinite(token_advantages("pearson_chi2", logp_s, logp_t, log_u_clip=10.0)).all()


def test_reinforce_loss_gradient():
    logits = torch.randn(3, 4, 6, requires_grad=True)
    y = torch.randint(0, 6, (3, 4))
    logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    A = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    mask[1, 2:] = 0
    (grad,) = torch.autograd.grad(reinforce_loss(logp, A, mask, reduction="sequence"), logits)
    onehot = torch.nn.functional.one_hot(y, 6).double()
    expected = -(A * mask)[..., None] * (onehot - torch.softmax(logits, -1).detach()) / 3
    torch.testing.assert_close(grad, expected)
    token_loss = reinforce_loss(logp, A, mask)  # the default reduction divides by the unmasked tokens
    torch.testing.assert_close(token_loss, -(A * mask * logp).sum() / mask.sum())


def test_reduce_divides_the_masked_sum_by_the_sequences_or_the_tokens():
    x = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(reduce(x, mask, "sequence")) == (1 + 2 + 8) / 2
    assert float(reduce(x, mask, "token")) == (1 + 2 + 8) / 3
    assert float(reduce(x, None, "token")) == float(x.mean())
    assert float(reduce(x, torch.zeros_like(x), "token")) == 0.0  # no token counts: divided by 1, not 0
    for bad, phrase in ((dict(reduction="mean"), "unknown reduction"), (dict(mask_BT=2 * mask), "only 0 and 1"),
                        (dict(x_BT=x[:0]), "empty batch")):
        with pytest.raises(UserError, match=phrase):
            reduce(**{**dict(x_BT=x, mask_BT=mask, reduction="token"), **bad})


def test_one_default_reduction_everywhere():
    import inspect

    from opdlab.config.spec import Objective
    assert DEFAULT_REDUCTION == "token" == Objective().reduction
    for fn in (reinforce_loss, full_vocabulary_loss):
        assert inspect.signature(fn).parameters["reduction"].default == DEFAULT_REDUCTION


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "forward_kl"])
@pytest.mark.parametrize("method", ["opd", "opd_plus"])
@pytest.mark.parametrize("baseline, gamma, clip", [("none", 0.0, None), ("expected", 0.5, 0.7), ("loo", 1.0, None),
                                                   ("loo", 0.3, 0.7)])
def test_baselined_advantages_match_a_naive_loop(name, method, baseline, gamma, clip):
    """The function the training loop and the toys share, against plain Python loops over the closed forms."""
    g = torch.Generator().manual_seed(4)
    ls_BTV = torch.log_softmax(torch.randn(6, 5, 7, generator=g, dtype=torch.float64), -1)
    lt_BTV = torch.log_softmax(2 * torch.randn(6, 5, 7, generator=g, dtype=torch.float64), -1)
    y_BT = torch.randint(0, 7, (6, 5), generator=g)
    ls_BT, lt_BT = ls_BTV.gather(-1, y_BT[..., None])[..., 0], lt_BTV.gather(-1, y_BT[..., None])[..., 0]
    mask_BT = torch.ones(6, 5, dtype=torch.float64)
    mask_BT[1, 3:], mask_BT[4, 1:], mask_BT[5, 2] = 0, 0, 0  # ragged ends and a masked environment token
    adv = baselined_advantages(name, ls_BT, lt_BT, mask_BT, method, gamma, baseline, ls_BTV, lt_BTV, group_size=3,
                               log_u_clip=clip)
    want, n_clipped = naive_advantages(name, method, gamma, baseline, ls_BT, lt_BT, mask_BT, ls_BTV, lt_BTV, 3, clip)
    torch.testing.assert_close(adv.A_BT, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert adv.n_clipped == n_clipped and adv.n_tokens == int(mask_BT.sum())
    assert clip is None or n_clipped > 0


def test_baselined_advantages_refuse_unknown_names_and_missing_distributions():
    logp_s, logp_t, mask = _batch()
    with pytest.raises(ValueError, match="unknown baseline 'mean'"):
        baselined_advantages("jsd", logp_s, logp_t, mask, baseline="mean")
    with pytest.raises(ValueError, match="needs the full distributions"):
        baselined_advantages("jsd", logp_s, logp_t, mask, baseline="expected")


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "neyman_chi2"])
def test_full_vocabulary_loss_gives_the_exact_token_local_gradient(name):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    logp_t = torch.log_softmax(torch.randn(2, 3, 5, generator=g), -1)
    logp_s = torch.log_softmax(logits, -1)
    (grad,) = torch.autograd.grad(full_vocabulary_loss(name, logp_s, logp_t, reduction="sequence"), logits)
    # d D_f / d z = sum_a pi(a) (-w(u_a)) (e_a - pi) = -pi * (w - E_pi[w])
    pi = logp_s.exp().detach()
    w = get(name).opd_plus_advantage(logp_t - logp_s.detach())
    expected = -pi * (w - (pi * w).sum(-1, keepdim=True)) / 2
    torch.testing.assert_close(grad, expected)


def test_bad_inputs_get_clear_errors():
    logp_s, logp_t, mask = _batch()
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        token_advantages("jsd", logp_s, logp_t, mask, gamma=1.5)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        token_advantages("jsd", logp_s, logp_t, mask, gamma=-0.1)
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        token_advantages("jsd", logp_s, logp_t, mask, method="ppo")
    with pytest.raises(ValueError, match="unknown divergence"):
        token_advantages("kl", logp_s, logp_t, mask)
    with pytest.raises(ValueError, match="shapes do not match"):
        token_advantages("jsd", logp_s, logp_t[:, :-1], mask)
    with pytest.raises(ValueError, match="mask_BT has shape"):
        token_advantages("jsd", logp_s, logp_t, mask[:, :-1])
    with pytest.raises(ValueError, match=r"expected \(batch, time\)"):
        token_advantages("jsd", logp_s[0], logp_t[0])
    with pytest.raises(ValueError, match="positive"):
        token_advantages("forward_kl", logp_s, logp_t, log_u_clip=-1.0)
    bad = logp_s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logp_student_BT has 1 NaN"):
        token_advantages("jsd", bad, logp_t)
    bad[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="logp_student_BT has 0 NaN and 1 infinite"):
        token_advantages("jsd", bad, logp_t)
    with pytest.raises(ValueError, match="different vocabularies"):
        expected_advantage_baseline("jsd", torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="unknown reduction"):
        reinforce_loss(logp_s, logp_t, mask, reduction="mean")
