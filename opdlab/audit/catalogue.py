"""The catalogue of per-token distillation estimators the field uses, each written as its source writes it.

Notation (docs/math.md §1): student pi (the sampler), teacher q, y ~ pi(.|c), u = q(y)/pi(y), log u =
logp_teacher - logp_student. Each function returns one value per sampled token, shape (B, T); its gradient
mode says what the training code does with it (``opdlab.audit.expected``). ``follows`` is the hand derivation of the
expected gradient, checked by ``tests/audit/test_audit.py`` on exact toys; None where there is none to state.

Every entry carries a ``Source`` (``opdlab.audit.sources``): repository, path, the commit read, the line range,
a short verbatim excerpt and the defaults it models. Scale factors (a KL coefficient, token-mean against
sequence-sum reductions over a fixed length) are left out: they change a step size, not a direction. Sampling
and scoring temperatures other than 1 are modelled as a toy whose logits are already divided by them.
``OUT_OF_SCOPE`` lists the peers' losses this version does not transcribe, each with its reason.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from opdlab.audit.sources import OPDLAB, OUT_OF_SCOPE, SOURCES
from opdlab.audit.types import DIVERGENCES, Estimator, Term, low_mass_mask
from opdlab.core.divergences import get

__all__ = ["CATALOGUE", "OUT_OF_SCOPE", "SOURCES"]


# --- sampled-token KL estimators (Schulman's k1, k2, k3, as verl's kl_penalty writes them) ------------------------
def k1_pg(logp_student_BT, logp_teacher_BT):
    """Sampled-token reverse KL as a detached reward, A = log q(y) - log pi(y) = log u (k1), policy gradient.

    E[g] = -E[log u grad log pi] = grad KL(pi || q). tinker-cookbook's incorporate_kl_penalty (advantage minus
    kl_penalty_coef times (sampled logprob - teacher logprob), then an importance-sampling loss: the same gradient
    on-policy); the same form in slime, SkyRL, NeMo-RL's MOPD and verl's policy-gradient mode with k1.
    """
    return logp_teacher_BT - logp_student_BT


def k1_backprop(logp_student_BT, logp_teacher_BT):
    """k1 = log pi(y) - log q(y) backpropagated directly: E[grad log pi] = 0, so it follows nothing.

    verl refuses loss_mode="k1" with use_policy_gradient=False, but only the literal "k1": its alias "kl", which
    kl_penalty_forward treats identically, passes the check (``verl_kl_alias_backprop``).
    """
    return logp_student_BT - logp_teacher_BT


def k2_backprop(logp_student_BT, logp_teacher_BT):
    """k2 = ½ (log pi - log q)^2 backpropagated: grad = -log u grad log pi, so E[g] = grad KL(pi || q)."""
    return 0.5 * (logp_student_BT - logp_teacher_BT).square()


def k3_backprop(logp_student_BT, logp_teacher_BT):
    """k3 = (u - 1) - log u backpropagated through log pi under student sampling: grad = (1 - u) grad log pi,
    so E[g] = -E[u grad log pi] = grad KL(q || pi): the *forward* KL, although k3's value estimates the reverse.
    Unclamped (verl's clamps are in ``verl_k3``).
    """
    log_u = logp_teacher_BT - logp_student_BT
    return log_u.exp() - 1.0 - log_u


def verl_k3(logp_student_BT, logp_teacher_BT):
    """verl's k3 exactly as kl_penalty_forward writes it: log u clamped to [-20, 20], then k3 clamped to
    [-10, 10] (where a clamp binds, that token's gradient is 0)."""
    log_u = torch.clamp(logp_teacher_BT - logp_student_BT, min=-20, max=20)
    return torch.clamp(log_u.exp() - log_u - 1, min=-10, max=10)


def k3_plus_backprop(logp_student_BT, logp_teacher_BT):
    """verl's "k3+" straight-through: the value of k3, the gradient of k2 (backward - sg(backward) + sg(forward)).
    E[g] = grad KL(pi || q)."""
    k2 = 0.5 * (logp_student_BT - logp_teacher_BT).square()
    return k2 - k2.detach() + verl_k3(logp_student_BT, logp_teacher_BT).detach()


def k3_pg(logp_student_BT, logp_teacher_BT):
    """A = -k3, detached, in a policy-gradient path: E[g] = E[(u - 1 - log u) grad log pi] = grad RKL - grad FKL.
    Unclamped (verl's configuration with its clamps is ``verl_dataclass_default``)."""
    return -k3_backprop(logp_student_BT, logp_teacher_BT)


def k2_pg(logp_student_BT, logp_teacher_BT):
    """A = -k2 = -½ (log u)^2, detached: E[g] = E[½ (log u)^2 grad log pi], neither KL's gradient."""
    return -k2_backprop(logp_student_BT, logp_teacher_BT)


def abs_pg(logp_student_BT, logp_teacher_BT):
    """A = -|log pi - log q|, detached (verl "abs" with use_policy_gradient): E[g] = E[|log u| grad log pi]."""
    return -(logp_student_BT - logp_teacher_BT).abs()


def abs_backprop(logp_student_BT, logp_teacher_BT):
    """verl "abs" backpropagated (use_policy_gradient=False, which verl allows): grad |log pi - log q| =
    -sign(log u) grad log pi, so E[g] = -E[sign(log u) grad log pi] = 2 grad TV (TV's OPD+ weight is ½ sign)."""
    return (logp_student_BT - logp_teacher_BT).abs()


# --- verl's three defaults -------------------------------------------------------------------------------------
def verl_yaml_default(logp_student_BT, logp_teacher_BT):
    """verl with its YAML defaults (verl/trainer/config/distillation/distillation.yaml: loss_mode k3,
    use_policy_gradient false, loss_max_clamp null): ``verl_k3`` backpropagated. E[g] = grad KL(q || pi) where
    the clamps do not bind: the forward KL. k3 > 10 once u > 13.6 or so, and there the clamp zeroes the gradient
    of exactly the tokens the teacher prefers most; that happens on the toys, so no hand derivation is claimed."""
    return verl_k3(logp_student_BT, logp_teacher_BT)


def verl_dataclass_default(logp_student_BT, logp_teacher_BT, loss_max_clamp=10.0):
    """verl with DistillationLossConfig's dataclass defaults (loss_mode k3, use_policy_gradient True,
    loss_max_clamp 10): A = -clamp(k3, -10, 10), detached ("use negative distillation loss as reward"), in the
    vanilla PPO loss (the policy gradient on-policy). E[g] = grad RKL - grad FKL where the clamps do not bind
    (they bind on the sequence toys, as in ``verl_yaml_default``)."""
    return -verl_k3(logp_student_BT, logp_teacher_BT).clamp(-loss_max_clamp, loss_max_clamp)


def verl_example_default(logp_student_BT, logp_teacher_BT, loss_max_clamp=10.0):
    """verl's shipped example scripts (examples/on_policy_distillation_trainer/run_qwen3_8b_fsdp.sh and the other
    k1 recipes: loss_mode k1, use_policy_gradient True, loss_max_clamp 10): A = -clamp(log pi - log q, -10, 10)
    = clamp(log u, -10, 10), detached. Reverse KL where |log u| < 10; beyond, the advantage saturates at ±10
    (it does not vanish), so E[g] departs from grad RKL on tokens the teacher and student disagree on strongly."""
    return -(logp_student_BT - logp_teacher_BT).clamp(-loss_max_clamp, loss_max_clamp)


def _top_half(logp_BTV, k=None):
    """Indices of the k = ceil(V / 2) most likely tokens (the toys' stand-in for a peer's top-k support:
    peers use k = 32-128 of a ~150k vocabulary; on a 3- or 8-token toy a half keeps the truncation visible)."""
    return torch.topk(logp_BTV, k or math.ceil(logp_BTV.shape[-1] / 2), dim=-1).indices


def verl_forward_kl_topk(logp_student_BTV, logp_teacher_BTV, loss_max_clamp=10.0, log_prob_min_clamp=-10.0):
    """verl loss_mode forward_kl_topk backpropagated (the megatron example's default; use_policy_gradient False):
    sum over the teacher's top-k S of q_a (log q_a - log pi_a), not renormalised, log-probabilities floored at
    log_prob_min_clamp, the sum clamped below at 0 and to ±loss_max_clamp. E[g] = -sum_{a in S} q_a grad log pi_a
    (where no clamp binds): the forward KL's gradient without the tail outside S.
    """
    idx = _top_half(logp_teacher_BTV)
    lt = torch.gather(logp_teacher_BTV, -1, idx).clamp_min(log_prob_min_clamp)
    ls = torch.gather(logp_student_BTV, -1, idx).clamp_min(log_prob_min_clamp)
    kl = (lt.exp() * (lt - ls)).sum(-1).clamp_min(0.0)
    return kl.clamp(-loss_max_clamp, loss_max_clamp)


def nemo_rl_mixed_topk(logp_student_BTV, logp_teacher_BTV, mixed_kl_weight=0.5, top_k=None):
    """NeMo-RL DistillationLossFn with its defaults (kl_type mixed, mixed_kl_weight 0.5, zero_outside_topk
    False), backpropagated: on the teacher's top-k S both distributions are renormalised (log_softmax of the
    gathered logits), and the loss is w KL(q_S || pi_S) + (1 - w) KL(pi_S || q_S). Renormalising on S makes it
    blind to how much mass the student puts outside S, so it follows no divergence of the full distributions.
    """
    idx = _top_half(logp_teacher_BTV, top_k)
    ls = torch.log_softmax(torch.gather(logp_student_BTV, -1, idx), -1)
    lt = torch.log_softmax(torch.gather(logp_teacher_BTV, -1, idx), -1)
    forward = (lt.exp() * (lt - ls)).sum(-1)
    reverse = (ls.exp() * (ls - lt)).sum(-1)
    return mixed_kl_weight * forward + (1 - mixed_kl_weight) * reverse


def miles_topk_reward(logp_student_BTV, logp_teacher_BTV):
    """miles' top-k OPD reward (--opd-log-prob-top-k > 0, strategy only-student, weight mode student_p): at each
    position, R = sum_{a in S} w_a (log pi_a - log q_a) over the student's top-k S with w the student's
    probabilities renormalised on S, and the advantage -R, detached, at the sampled token. R does not depend on
    which token was sampled, so E[-R grad log pi(y)] = -R E[grad log pi(y)] = 0 at every context: the term adds
    variance and no expected gradient.
    """
    idx = _top_half(logp_student_BTV)
    ls = torch.gather(logp_student_BTV, -1, idx)
    lt = torch.gather(logp_teacher_BTV, -1, idx)
    return -(torch.softmax(ls, -1) * (ls - lt)).sum(-1).detach()


# --- MiniLLM (TRL) and discounted returns ------------------------------------------------------------------------
def k1_ratio_undetached(logp_student_BT, logp_teacher_BT):
    """A = log q - log pi computed from the student's forward pass and *not* detached, in the GRPO ratio loss
    -(pi/sg(pi)) A. The extra term -grad A = grad log pi(y_t) has zero mean: E[g] = grad KL(pi || q), with
    more variance. TRL MiniLLMTrainer: _compute_advantage builds the rewards from student_log_probs_on_labels
    gathered from the differentiable log_softmax and adds them to inputs["advantages"] before GRPO's loss.
    """
    return logp_teacher_BT - logp_student_BT


def full_vocab_reverse_kl(logp_student_BTV, logp_teacher_BTV):
    """Full-vocabulary KL(pi || q) at each visited context, backpropagated: MiniLLM's single-step term
    (F.kl_div(teacher_log_probs, student_log_probs, log_target=True), summed over the vocabulary)."""
    return F.kl_div(logp_teacher_BTV, logp_student_BTV, reduction="none", log_target=True).sum(-1)


def minillm_discounted(logp_student_BT, logp_teacher_BT, gamma=0.95):
    """TRL MiniLLM's reverse-KL advantage with gamma > 0 and length normalisation, as _compute_advantage writes
    it: R_t = log q - log pi (not detached), A_t = sum_{i>=t} gamma^i R_i / sum_{i>=t} gamma^i (the powers
    gamma^i count from the first completion token), in the GRPO ratio loss. TRL's default is gamma = 0;
    gamma = 0.95 is the MiniLLM paper's (arXiv 2306.08543) choice. A mixture of token-local and sequence terms.
    """
    T = logp_student_BT.shape[-1]
    gamma_pow_T = gamma ** torch.arange(T, dtype=logp_student_BT.dtype)
    R = logp_teacher_BT - logp_student_BT
    returns = (R * gamma_pow_T).flip(-1).cumsum(-1).flip(-1)
    lengths = gamma_pow_T.flip(-1).cumsum(-1).flip(-1)
    return returns / lengths


def k1_return(logp_student_BT, logp_teacher_BT, gamma=1.0):
    """Discounted return-to-go of the k1 reward, detached: A_t = sum_{s>=t} gamma^(s-t) log u_s, policy gradient.

    tinker-cookbook's kl_discount_factor (discounted_future_sum_vectorized over the per-token advantages; default
    0, where this is ``k1_pg``). gamma = 1 gives the gradient of the sequence reverse KL E[sum_t KL_t];
    0 < gamma < 1 mixes the two.
    """
    T = logp_student_BT.shape[-1]
    r = logp_teacher_BT - logp_student_BT
    d_TT = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # s - t
    weight_TT = torch.where(d_TT >= 0, gamma ** d_TT.clamp_min(0).to(r.dtype), torch.zeros((), dtype=r.dtype))
    return r @ weight_TT.T


def iw_opd(logp_student_BT, logp_teacher_BT, gamma=0.5, epsilon=1e-8):
    """TRL IWOPDTrainer._compute_iw_opd_loss (IW-OPD, arXiv 2606.22600): a = sg(log q - log pi), the weight
    w_t = 1 + gamma (1 - sum_{s<t} |a_s| / sum_s |a_s|) in [1, 1 + gamma], detached, and A_t = w_t a_t, policy
    gradient. The weight ignores a's sign and is normalised over the whole sequence, so it depends on the future
    tokens: no registry gradient exactly, close to reverse KL (on one context w = 1 + gamma, exactly reverse KL).
    """
    a = (logp_teacher_BT - logp_student_BT).detach()
    abs_a = a.abs()
    prefix = abs_a.cumsum(-1) - abs_a
    total = abs_a.sum(-1, keepdim=True).clamp_min(epsilon)
    return (1.0 + gamma * (1.0 - prefix / total)) * a


# --- JSD advantages and full-vocabulary GKD --------------------------------------------------------------------
def trinity_jsd_advantage(logp_student_BT, logp_teacher_BT, beta=0.5):
    """Trinity-RFT JSDAdvantage._js_divergence_per_token from the sampled tokens' log-probabilities s, t only:
    log m = log(beta e^t + (1 - beta) e^s), JSD_token = beta e^t (t - log m) + (1 - beta) e^s (s - log m),
    A = -kl_coef JSD_token (kl_coef = 1), computed from old_log_probs (detached), policy gradient. For beta <= 0
    or >= 1 that version returns 0. E[g] = sum_a pi_a JSD_token(a) grad log pi_a: the reward's own dependence on
    pi is dropped (the stop-gradient of OPD) and its terms are weighted by the sampled tokens' probabilities.
    """
    s, t = logp_student_BT, logp_teacher_BT
    log_m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
    jsd = beta * t.exp() * (t - log_m) + (1 - beta) * s.exp() * (s - log_m)
    return -jsd


def gkd_generalized_jsd(logp_student_BTV, logp_teacher_BTV, beta=0.5):
    """TRL GKD's generalized_jsd_loss at each sampled context, over the full vocabulary, backpropagated:
    beta = 0: KL(q || pi); beta = 1: KL(pi || q); otherwise with the mixture M = beta q + (1 - beta) pi,
    beta KL(q || M) + (1 - beta) KL(pi || M) (= the registry's gjsd:beta). The interior tends to 0 as beta -> 0
    or 1, so the two special cases are jumps.
    """
    if beta == 0:
        jsd = F.kl_div(logp_student_BTV, logp_teacher_BTV, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(logp_teacher_BTV, logp_student_BTV, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=logp_student_BTV.dtype)
        log_M = torch.logsumexp(torch.stack([logp_student_BTV + torch.log1p(-b), logp_teacher_BTV + torch.log(b)]),
                                0)
        jsd = (b * F.kl_div(log_M, logp_teacher_BTV, reduction="none", log_target=True)
               + (1 - b) * F.kl_div(log_M, logp_student_BTV, reduction="none", log_target=True))
    return jsd.sum(-1)


# --- bounded and power advantages, and a selection -------------------------------------------------------------
def tv_sign(logp_student_BT, logp_teacher_BT):
    """Sign-only advantage A = sign(log u), detached (TV-OPD, arXiv 2609.08341): E[g] = 2 grad TV, since the
    OPD+ weight of total variation is ½ sign(u - 1)."""
    return torch.sign(logp_teacher_BT - logp_student_BT)


def power_opd(logp_student_BT, logp_teacher_BT, alpha=5.0):
    """PowerOPD (arXiv 2606.17199): the reward r = q(y)^alpha - pi(y)^alpha, the teacher's and student's
    probabilities of the sampled token each raised to alpha (bounded in [-1, 1]), detached, policy gradient;
    alpha = 5 recommended. E[g] = -sum_a (q_a^alpha - pi_a^alpha) grad pi_a = alpha/(1 + alpha) grad d_alpha(pi, q),
    Basu's density-power divergence with the student as the data density: not an f-divergence.
    """
    return (alpha * logp_teacher_BT).exp() - (alpha * logp_student_BT).exp()


def opsa_low_probability(logp_student_BT, logp_student_BTV, advantage=-0.5, frac=0.2):
    """OPSA (arXiv 2608.31046): a fixed negative advantage (-0.5 in its fixed-negative preset) on the
    lowest-probability fraction (f = 0.2) of sampled tokens, every other token masked out, policy gradient.
    The batch quantile is modelled by its large-batch limit at each context (``low_mass_mask``). Because the
    selection depends on pi, E[g] = c grad sum_{a in S} pi_a with c = 0.5 and S held fixed: it pushes the
    student's low-probability mass down (its expectation is not 0, unlike a constant advantage on every token).
    """
    p_BTV = logp_student_BTV.detach().exp()
    tau_BT = (low_mass_mask(logp_student_BTV, frac) * p_BTV).amax(-1)  # S = {a: pi_a <= tau}; 0 when S is empty
    return advantage * (logp_student_BT.detach().exp() <= tau_BT).to(logp_student_BT.dtype)


# --- the catalogue ----------------------------------------------------------------------------------------------
def _entry(name, terms, claims=None, scope="token_local", follows=None, doc_fn=None, source=None) -> Estimator:
    terms = tuple(Term(fn, mode) for fn, mode in terms)
    fn = doc_fn or terms[0].fn
    return Estimator(name, terms, claims, scope, follows, inspect.cleandoc(fn.__doc__ or ""),
                     source or SOURCES[name])


def _opd(div_name: str, method: str):
    div = get(div_name)

    def advantage(logp_student_BT, logp_teacher_BT):
        return div.advantage(logp_teacher_BT - logp_student_BT, method)

    formula = "-f(u)" if method == "opd" else "w_f(u) = -f(u) + u f'(u)"
    advantage.__name__ = f"{method}_{div.name}"
    advantage.__doc__ = (f"{'Stop-gradient OPD' if method == 'opd' else 'OPD+'} for {div.label}: A = {formula}, "
                         f"detached, policy gradient (opdlab.core.divergences; OPD+ paper, arXiv 2606.01039).")
    return advantage


def _build() -> dict[str, Estimator]:
    pg, bp, ir = "policy_gradient", "backprop", "importance_ratio"
    part = functools.partial
    entries = [
        _entry("k1_pg", [(k1_pg, pg)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("k1_backprop", [(k1_backprop, bp)], "reverse_kl", follows={}),
        _entry("verl_kl_alias_backprop", [(k1_backprop, bp)], "reverse_kl", follows={}),
        _entry("k2_backprop", [(k2_backprop, bp)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("k3_backprop", [(k3_backprop, bp)], "reverse_kl", follows={"forward_kl": 1.0}),
        _entry("k3_plus_backprop", [(k3_plus_backprop, bp)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("k3_pg", [(k3_pg, pg)], "reverse_kl", follows={"reverse_kl": 1.0, "forward_kl": -1.0}),
        _entry("k2_pg", [(k2_pg, pg)], "reverse_kl"),
        _entry("abs_pg", [(abs_pg, pg)], "reverse_kl"),
        _entry("abs_backprop", [(abs_backprop, bp)], "reverse_kl", follows={"tv": 2.0}),
        _entry("verl_yaml_default", [(verl_yaml_default, bp)], "reverse_kl"),
        _entry("verl_dataclass_default", [(verl_dataclass_default, pg)], "reverse_kl"),
        _entry("verl_example_default", [(verl_example_default, pg)], "reverse_kl"),
        _entry("verl_forward_kl_topk", [(verl_forward_kl_topk, bp)], "forward_kl"),
        _entry("nemo_rl_mixed_topk", [(nemo_rl_mixed_topk, bp)], "jsd"),
        _entry("miles_topk_reward", [(miles_topk_reward, pg)], "reverse_kl", follows={}),
        _entry("k1_ratio_undetached", [(k1_ratio_undetached, ir)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("minillm_trl_default", [(k1_ratio_undetached, ir), (full_vocab_reverse_kl, bp)], "reverse_kl",
               follows={"reverse_kl": 2.0}, doc_fn=_minillm_doc),
        _entry("minillm_gamma0.95_normalised", [(minillm_discounted, ir)], "reverse_kl", scope="sequence"),
        _entry("k1_return_gamma1", [(k1_return, pg)], "reverse_kl", scope="sequence", follows={"reverse_kl": 1.0}),
        _entry("k1_return_gamma0.5", [(part(k1_return, gamma=0.5), pg)], "reverse_kl", scope="sequence",
               doc_fn=k1_return),
        _entry("iw_opd", [(iw_opd, pg)], "reverse_kl"),
        _entry("trinity_jsd_advantage", [(trinity_jsd_advantage, pg)], "jsd"),
        _entry("gkd_jsd_beta0.5", [(gkd_generalized_jsd, bp)], "jsd", follows={"jsd": 1.0}),
        _entry("gkd_beta0", [(part(gkd_generalized_jsd, beta=0.0), bp)], "forward_kl",
               follows={"forward_kl": 1.0}, doc_fn=gkd_generalized_jsd),
        _entry("gkd_beta0.001", [(part(gkd_generalized_jsd, beta=1e-3), bp)], "forward_kl",
               follows={"gjsd:0.001": 1.0}, doc_fn=gkd_generalized_jsd),
        _entry("gkd_beta1", [(part(gkd_generalized_jsd, beta=1.0), bp)], "reverse_kl",
               follows={"reverse_kl": 1.0}, doc_fn=gkd_generalized_jsd),
        _entry("tv_sign", [(tv_sign, pg)], "tv", follows={"tv": 2.0}),
        _entry("power_opd_alpha5", [(power_opd, pg)], None, follows={"dpd:5": 5 / 6}),
        _entry("opsa_low_probability", [(opsa_low_probability, pg)], None, follows={"low_mass:0.2": 0.5}),
    ]
    for name in DIVERGENCES:
        d = get(name).name
        entries.append(_entry(f"opd:{d}", [(_opd(d, "opd"), pg)], d,
                              follows={"reverse_kl": 1.0} if d == "reverse_kl" else None, source=OPDLAB))
        entries.append(_entry(f"opd_plus:{d}", [(_opd(d, "opd_plus"), pg)], d, follows={d: 1.0}, source=OPDLAB))
    return {e.name: e for e in entries}


def _minillm_doc():
    """TRL MiniLLMTrainer with its defaults (rkl_advantage=True, single_step_decomposition=True, gamma=0): the
    undetached k1 advantage in the GRPO ratio loss (``k1_ratio_undetached``) plus the full-vocabulary single-step
    reverse KL (``full_vocab_reverse_kl``). Both terms follow grad KL(pi || q), so the current token's reverse KL
    is counted twice: E[g] = 2 grad RKL.
    """


CATALOGUE = _build()
