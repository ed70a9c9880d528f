"""OPD+ from a top-k teacher: the payload, the two exact limits (k = 0, S = V), and unbiasedness by enumeration
on categorical and sequence toys for every registry divergence and a sympy f."""
import pandas as pd
import pytest
import torch

from opdlab.app import cli
from opdlab.core.divergences import CHUNK_ELEMENTS
from opdlab.core.estimators import baselined_advantages, full_vocabulary_loss, reinforce_loss
from opdlab.core.sparse import (PEER_FORMS, TopK, payload_on_support, sparse_loss, sparse_surrogate, sparse_terms,
                                tail_log_ratio, topk_payload)
from opdlab.errors import UserError
from opdlab.exact.symbolic import as_divergence
from opdlab.exact.topk_toy import (categorical_peer_gradient, categorical_topk_moments, make_near_teacher,
                                   sequence_topk_moments, sequence_topk_table, topk_table)
from opdlab.exact.toy import exact_gradient, exact_sequence_gradient, make_sequence, token_local_gradient
from opdlab.experiments.montecarlo import DIVERGENCES

pytestmark = pytest.mark.usefixtures("float64")

JEFFREYS = as_divergence("u*log(u) - log(u)", "jeffreys")  # an f the registry does not hold
EVERY = list(DIVERGENCES) + [JEFFREYS]
KS = (1, 8, 32)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _batch(B=4, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_s = torch.randn(B, T, V, generator=g).requires_grad_(True)
    logits_t = 2 * torch.randn(B, T, V, generator=g)
    tokens = torch.multinomial(torch.softmax(logits_s.detach(), -1).reshape(-1, V), 1, generator=g).reshape(B, T)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    return logits_s, logits_t, tokens, mask


def _grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


# -- the payload ------------------------------------------------------------------------------------------------
def test_topk_payload_is_what_a_served_teacher_sends():
    logits_s, logits_t, tokens, _ = _batch()
    payload = topk_payload(logits_t, tokens, 3)
    logp_t = torch.log_softmax(logits_t, -1)
    top = logp_t.topk(3, -1)
    assert payload.k == 3 and torch.equal(payload.ids_BTK.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(payload.logp_teacher_BTK, logp_t.gather(-1, payload.ids_BTK), rtol=0, atol=1e-14)
    torch.testing.assert_close(payload.logp_teacher_sampled_BT, logp_t.gather(-1, tokens[..., None])[..., 0],
                               rtol=0, atol=1e-14)
    half = topk_payload(logits_t.to(torch.bfloat16), tokens, 3)  # a bf16 teacher: log-probabilities in float32
    assert half.logp_teacher_BTK.dtype == torch.float32 and bool((half.logp_teacher_BTK <= 0).all())
    assert topk_payload(logits_t, tokens, 0).k == 0 and topk_payload(logits_t, tokens, 11).k == 11


@pytest.mark.parametrize("k", [-1, 12, 2.0, True])
def test_topk_payload_refuses_a_k_outside_the_vocabulary(k):
    _, logits_t, tokens, _ = _batch()
    with pytest.raises(UserError, match=r"teacher top-k must be an integer in \[0, 11\]"):
        topk_payload(logits_t, tokens, k)


def test_a_payload_is_checked():
    ids = torch.tensor([[[1, 2, 1]]])
    with pytest.raises(UserError, match="repeats a token id"):
        TopK(ids, torch.full((1, 1, 3), -2.0), torch.tensor([[-1.0]]))
    with pytest.raises(UserError, match=r"logp_teacher_sampled_BT of shape \(B, T\)"):
        TopK(torch.tensor([[[1, 2]]]), torch.full((1, 1, 2), -2.0), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="above 0"):
        TopK(torch.tensor([[[1, 2]]]), torch.tensor([[[0.5, -1.0]]]), torch.tensor([[-1.0]]))
    logits_s, logits_t, tokens, _ = _batch()
    bad = TopK(torch.full((4, 6, 1), 11), torch.full((4, 6, 1), -1.0), torch.full((4, 6), -1.0))
    with pytest.raises(UserError, match=r"in \[0, 11\)"):
        sparse_loss("jsd", torch.log_softmax(logits_s, -1), tokens, bad)


def test_the_expected_baseline_is_refused_with_the_reason():
    logits_s, logits_t, tokens, _ = _batch()
    payload = topk_payload(logits_t, tokens, 3)
    with pytest.raises(UserError, match="needs the teacher's log-probability of every token.*tail"):
        sparse_loss("jsd", torch.log_softmax(logits_s, -1), tokens, payload, baseline="expected")
    with pytest.raises(UserError, match="unknown baseline 'mean'.*none, tail, loo"):
        sparse_loss("jsd", torch.log_softmax(logits_s, -1), tokens, payload, baseline="mean")


# -- the two limits ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("gamma, clip, baseline, reduction", [(0.0, None, "none", "sequence"),
                                                              (0.7, 0.5, "none", "token"),
                                                              (1.0, None, "loo", "sequence"),
                                                              (0.3, 0.8, "loo", "token")])
def test_k0_is_todays_sampled_opd_plus(name, gamma, clip, baseline, reduction):
    """An empty support sends only the sampled token's value: the estimator is reinforce_loss of
    baselined_advantages, the same numbers (the future terms, the clip, leave-one-out and both reductions)."""
    logits_s, logits_t, tokens, mask = _batch()
    logp_s = torch.log_softmax(logits_s, -1)
    payload = topk_payload(logits_t, tokens, 0)
    ours = _grad(sparse_loss(name, logp_s, tokens, payload, mask, gamma, baseline, 2, clip, reduction), logits_s)
    logp_s_BT, logp_t_BT = logp_s.gather(-1, tokens[..., None])[..., 0], payload.logp_teacher_sampled_BT
    A = baselined_advantages(name, logp_s_BT.detach(), logp_t_BT, mask, "opd_plus", gamma, baseline,
                             group_size=2, log_u_clip=clip).A_BT
    today = _grad(reinforce_loss(logp_s_BT, A, mask, reduction), logits_s)
    torch.testing.assert_close(ours, today, rtol=1e-13, atol=1e-13 * float(today.abs().max()))


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("baseline", ["none", "tail"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_the_whole_vocabulary_is_the_full_vocabulary_method(name, baseline, reduction):
    logits_s, logits_t, tokens, mask = _batch()
    logp_s, logp_t = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)
    ours = _grad(sparse_loss(name, logp_s, tokens, topk_payload(logits_t, tokens, 11), mask, baseline=baseline,
                             reduction=reduction), logits_s)
    full = _grad(full_vocabulary_loss(name, logp_s, logp_t, mask, reduction), logits_s)
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-12 * float(full.abs().max()))


def test_with_a_clip_the_support_uses_the_clipped_weight():
    """Under log_u_clip the exact part weighs grad log pi(a) by pi(a) w_f(clip(log u_a)), as the dense
    estimator's expected baseline does: at S = V that is the mean of the clipped advantage."""
    logits_s, logits_t, tokens, _ = _batch(B=1, T=1)
    logp_s, logp_t = torch.log_softmax(logits_s, -1), torch.log_softmax(logits_t, -1)
    div = as_divergence("u*log(u)")  # forward KL, as any sympy f
    ours = _grad(sparse_loss(div, logp_s, tokens, topk_payload(logits_t, tokens, 11), log_u_clip=0.5), logits_s)
    weight = logp_s.detach().exp() * div.opd_plus_advantage((logp_t - logp_s.detach()).clamp(-0.5, 0.5))
    manual = _grad(-(weight * logp_s).sum(), logits_s)
    torch.testing.assert_close(ours, manual, rtol=1e-12, atol=1e-14)
    unclipped = _grad(sparse_loss(div, logp_s, tokens, topk_payload(logits_t, tokens, 11)), logits_s)
    assert float((unclipped - manual).abs().max()) > 1e-3  # the clip binds on this batch


def test_a_sampled_token_in_the_support_is_counted_once():
    """At gamma = 0 a token in S contributes only through the exact part: its sampled value is not used."""
    logits_s, logits_t, tokens, mask = _batch()
    logp_s = torch.log_softmax(logits_s, -1)
    payload = topk_payload(logits_t, tokens, 5)
    in_S = (payload.ids_BTK == tokens[..., None]).any(-1)
    assert bool(in_S.any()) and bool((~in_S).any())
    moved = TopK(payload.ids_BTK, payload.logp_teacher_BTK,
                 torch.where(in_S, payload.logp_teacher_sampled_BT - 3.0, payload.logp_teacher_sampled_BT))
    for baseline in ("none", "tail"):
        a = _grad(sparse_loss("jsd", logp_s, tokens, payload, mask, baseline=baseline), logits_s)
        b = _grad(sparse_loss("jsd", logp_s, tokens, moved, mask, baseline=baseline), logits_s)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- unbiased on the toys, by enumeration -----------------------------------------------------------------------
def _every_sample_gradient(div, toy, payload_of, baseline):
    """Per-sample gradients of sparse_loss for each of the K tokens of a categorical toy (one logits copy each)."""
    K = toy.n_tokens
    theta = toy.logits_student_K.expand(K, K).clone().requires_grad_(True)
    tokens = torch.arange(K)[:, None]
    loss = sparse_loss(div, torch.log_softmax(theta, -1)[:, None], tokens, payload_of(tokens), baseline=baseline,
                       reduction="sequence")
    return _grad(loss * K, theta)


@pytest.mark.parametrize("name", EVERY)
def test_categorical_expected_gradient_is_exact(name):
    toy = make_near_teacher(64, seed=3, temperature=0.5)
    pi, target = toy.logp_student_K.exp(), exact_gradient(name, toy)
    teacher = toy.logp_teacher_K.expand(64, 1, 64)
    for k in KS:
        for baseline in ("none", "tail"):
            G = _every_sample_gradient(name, toy, lambda tokens: topk_payload(teacher, tokens, k), baseline)
            mean = pi @ G
            assert _cos(mean, target) >= 0.9999
            assert float((mean - target).norm()) <= 1e-12 * float(target.norm())
            # the closed form of sparse_toy (used by the table) is this enumeration
            closed_mean, closed_var = categorical_topk_moments(name, toy, k, baseline)
            torch.testing.assert_close(closed_mean, mean, rtol=1e-10, atol=1e-12 * float(target.norm()))
            assert closed_var == pytest.approx(float(pi @ (G - mean).pow(2).sum(-1)), rel=1e-9)


def test_a_support_that_depends_on_the_sample_is_biased():
    """The counterfactual the exactness check must catch: S = top-(k-1) plus the sampled token."""
    toy = make_near_teacher(64, seed=3, temperature=0.5)
    pi, target = toy.logp_student_K.exp(), exact_gradient("jsd", toy)
    teacher = toy.logp_teacher_K.expand(64, 1, 64)

    def with_the_sample(tokens):
        top = teacher.topk(8, -1).indices
        swapped = torch.cat([top[..., :7], tokens[..., None]], -1)
        ids = torch.where((top == tokens[..., None]).any(-1, keepdim=True), top, swapped)
        return payload_on_support(teacher, tokens, ids)

    mean = pi @ _every_sample_gradient("jsd", toy, with_the_sample, "none")
    assert float((mean - target).norm()) > 1e-2 * float(target.norm()) and _cos(mean, target) < 0.9999


@pytest.mark.parametrize("form", list(PEER_FORMS))
def test_the_peers_sparse_forms_are_biased(form):
    toy = make_near_teacher(64, seed=3, temperature=0.5)
    for name in ("reverse_kl", "forward_kl", "jsd"):
        target = exact_gradient(name, toy)
        peer = categorical_peer_gradient(name, toy, 8, form)  # the threshold sparse_loss meets, failed
        assert _cos(peer, target) < 0.9999 and float((peer - target).norm()) > 1e-2 * float(target.norm())
        # at S = V each is D_f itself (the tail bucket and the normaliser are empty or 1)
        torch.testing.assert_close(categorical_peer_gradient(name, toy, 64, form), target, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", EVERY)
def test_with_the_tail_baseline_the_support_part_is_the_tail_bucket_gradient(name):
    """grad [sum_S pi f(u) + (1 - Pi_S) f(u_bar)] = -sum_S pi (w(u_a) - w(u_bar)) grad log pi: the exact part with
    b = w(u_bar) is the tail bucket's gradient, for any f, and the sample adds the residual
    1[y not in S] (w(u_y) - w(u_bar)) grad log pi(y), which the bucket drops. A sampled token in S adds
    nothing else at gamma = 0, so its gradient is the bucket's; a token outside adds the residual."""
    toy = make_near_teacher(64, seed=3, temperature=0.5)
    teacher = toy.logp_teacher_K.expand(64, 1, 64)
    G = _every_sample_gradient(name, toy, lambda tokens: topk_payload(teacher, tokens, 8), "tail")
    bucket = categorical_peer_gradient(name, toy, 8, "tail_bucket")
    top = toy.logp_teacher_K.topk(8).indices
    torch.testing.assert_close(G[top], bucket.expand(8, -1), rtol=1e-9, atol=1e-12 * float(bucket.norm()))
    outside = torch.ones(64, dtype=torch.bool).index_fill(0, top, False)
    assert float((G[outside] - bucket).norm(dim=-1).max()) > 1e-3 * float(bucket.norm())


@pytest.mark.parametrize("name", EVERY)
def test_sequence_expected_gradient_is_exact(name):
    """40 tokens, horizon 2: every one of the 1600 sequences through sparse_loss. gamma = 0 targets the
    token-local gradient, gamma = 1 the sequence gradient (future terms over the sampled tokens)."""
    toy = make_sequence(40, 2, seed=1, temperature=0.5)
    targets = {0.0: token_local_gradient(name, toy), 1.0: exact_sequence_gradient(name, toy)}
    for gamma, target in targets.items():
        for k in KS:
            for baseline in ("none", "tail"):
                mean, _ = sequence_topk_moments(name, toy, k, gamma, baseline)
                assert _cos(mean, target) >= 0.9999, (gamma, k, baseline)
                assert float((mean - target).norm()) <= 1e-12 * float(target.norm()), (gamma, k, baseline)


def test_leave_one_out_is_unbiased_over_every_pair():
    """G = 2: enumerate both samples of a group; the first sample's gradient averages to the exact one."""
    toy = make_near_teacher(12, seed=2, temperature=0.5)
    K, k = toy.n_tokens, 3
    pairs = torch.cartesian_prod(torch.arange(K), torch.arange(K))  # (K^2, 2)
    theta = toy.logits_student_K.expand(K * K * 2, K).clone().requires_grad_(True)
    tokens = pairs.reshape(-1, 1)
    payload = topk_payload(toy.logp_teacher_K.expand(K * K * 2, 1, K), tokens, k)
    loss = sparse_loss("forward_kl", torch.log_softmax(theta, -1)[:, None], tokens, payload, baseline="loo",
                       group_size=2, reduction="sequence")
    G = _grad(loss * K * K * 2, theta).reshape(K * K, 2, K)[:, 0]
    pi = toy.logp_student_K.exp()
    weight = pi[pairs[:, 0]] * pi[pairs[:, 1]]
    target = exact_gradient("forward_kl", toy)
    assert float((weight @ G - target).norm()) <= 1e-12 * float(target.norm())


def test_the_tail_baseline_lowers_the_variance_where_the_support_holds_the_mass():
    """Reverse KL on near-teacher toys: sparse at k = 32 has less variance than one sample, and the tail
    baseline less again; k = V has none (categorical: one context)."""
    table = topk_table(["reverse_kl"], 32, n_toys=3, n_tokens=400)
    var = table.groupby(["method", "baseline"]).relative_variance.mean()
    assert var[("sparse", "tail")] < var[("sparse", "none")] < var[("opd_plus", "none")]
    assert (table.query("method == 'sparse'").cosine > 0.9999).all()
    toy = make_near_teacher(50, seed=0)
    assert categorical_topk_moments("reverse_kl", toy, 50, "tail")[1] == pytest.approx(0.0, abs=1e-20)


def test_the_sequence_table_keeps_the_contexts_variance():
    """On a sequence toy the full-vocabulary method keeps the variance of the contexts it visits (so the table
    compares something), every unbiased method has cosine 1, and the tail bucket does not."""
    table = sequence_topk_table(["reverse_kl"], 8, n_toys=1, vocab_size=12, horizon=2).set_index("method")
    assert table.loc["full_vocabulary", "relative_variance"] > 0.1
    assert (table.loc[["opd_plus", "full_vocabulary", "sparse"], "cosine"] > 0.9999).all()
    assert table.loc["tail_bucket", "cosine"] < 0.9999


def test_the_tail_ratio_over_row_chunks_of_a_large_vocabulary():
    """A 49,152-token vocabulary (SmolLM2's) over more than CHUNK_ELEMENTS entries: the student's tail mass is
    summed chunk by chunk, and equals the masked sum done at once; S = V gives u_bar = 1 (log 0)."""
    g = torch.Generator().manual_seed(0)
    V, T = 49152, CHUNK_ELEMENTS // 49152 + 2
    logits_s, logits_t = torch.randn(1, T, V, generator=g), 3 * torch.randn(1, T, V, generator=g)
    logp_s = torch.log_softmax(logits_s, -1)
    tokens = torch.zeros(1, T, dtype=torch.long)
    payload = topk_payload(logits_t, tokens, 32)
    outside = torch.ones(1, T, V, dtype=torch.bool).scatter(-1, payload.ids_BTK, False)
    log_tail_s = torch.where(outside, logp_s, -torch.inf).logsumexp(-1)
    log_tail_q = torch.where(outside, torch.log_softmax(logits_t, -1), -torch.inf).logsumexp(-1)
    torch.testing.assert_close(tail_log_ratio(logp_s, payload), log_tail_q - log_tail_s, rtol=1e-9, atol=1e-9)
    whole = topk_payload(logits_t[:, :2, :50], tokens[:, :2], 50)
    assert torch.equal(tail_log_ratio(logp_s[:, :2, :50], whole), torch.zeros(1, 2))


def test_sparse_terms_report_the_clip():
    logits_s, logits_t, tokens, mask = _batch()
    terms = sparse_terms("forward_kl", torch.log_softmax(logits_s, -1), tokens, topk_payload(logits_t, tokens, 4),
                         mask, log_u_clip=0.5)
    assert terms.n_tokens == int(mask.sum()) and terms.n_clipped > 0
    assert bool((terms.weight_BTK[mask == 0] == 0).all()) and bool((terms.A_BT[mask == 0] == 0).all())


def test_a_sympy_f_matches_its_registry_entry():
    L = torch.linspace(-3, 3, 13)
    ours, registry = as_divergence("u*log(u)"), __import__("opdlab.core.divergences").core.divergences.get("forward_kl")
    for fn in ("f", "f_prime", "opd_plus_advantage"):
        torch.testing.assert_close(getattr(ours, fn)(L), getattr(registry, fn)(L))
    with pytest.raises(ValueError, match="convex"):
        as_divergence("-u*log(u)")


# -- opdlab toy --teacher-topk ------------------------------------------------------------------------------------
def test_cli_toy_teacher_topk_prints_and_writes_the_table(capsys, tmp_path):
    csv = tmp_path / "topk.csv"
    argv = ["toy", "--teacher-topk", "8", "-d", "reverse_kl", "jsd", "--n-toys", "2", "--n-tokens", "200",
            "--csv", str(csv)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher top-8 of 200 tokens" in out and "sparse+tail" in out and "renormalised" in out
    saved = pd.read_csv(csv)
    direct = topk_table(["reverse_kl", "jsd"], 8, n_toys=2, n_tokens=200)
    pd.testing.assert_frame_equal(saved, direct, check_exact=False)
    cosine_rows = out.split("cos(E[g], grad D_f)")[1].split("E||g")[0].splitlines()
    jsd = [float(x) for x in next(r for r in cosine_rows if r.startswith("jsd")).split()[1:]]
    assert jsd[:4] == pytest.approx([1.0] * 4, abs=1e-4) and min(jsd[4:]) < 0.99


def test_cli_toy_teacher_topk_out_of_range(capsys):
    assert cli.main(["toy", "--teacher-topk", "8", "--n-tokens", "8", "--n-toys", "1"]) == 2
    assert "teacher top-k must be an integer in [1, 7]" in capsys.readouterr().err


def test_the_step_call_in_float32():
    """What a training step does: the teacher's logits become a payload, and the student's float32
    log-probabilities meet only that. At k = V its gradient is the exact one (float64) to float32 precision:
    no further off than full_vocabulary_loss computed in float32."""
    logits_s, logits_t, tokens, mask = _batch(B=4, T=5, V=300)

    def gradient(dtype, sparse):
        theta = logits_s.detach().to(dtype).requires_grad_(True)
        logp_s = torch.log_softmax(theta, -1)
        if not sparse:
            return _grad(full_vocabulary_loss("jsd", logp_s, torch.log_softmax(logits_t.to(dtype), -1), mask,
                                              "token"), theta).double()
        payload = topk_payload(logits_t.to(dtype), tokens, 300)
        loss, terms = sparse_surrogate("jsd", logp_s, tokens, payload, mask, 0.0, "tail", 2, None, "token")
        assert loss.dtype == dtype and terms.n_tokens == int(mask.sum())
        return _grad(loss, theta).double()

    exact = gradient(torch.float64, sparse=False)
    error = {sparse: float((gradient(torch.float32, sparse) - exact).abs().max() / exact.abs().max())
             for sparse in (True, False)}
    assert error[True] <= max(error[False], 1e-6)
