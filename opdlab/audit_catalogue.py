"""The catalogue of per-token distillation estimators the field uses, each written as its source writes it.

Notation (docs/math.md §1): student pi (the sampler), teacher q, y ~ pi(.|c), u = q(y)/pi(y), log u =
logp_teacher - logp_student. Each function returns one value per sampled token, shape (B, T); its gradient
mode says what the training code does with it (``opdlab.audit``). ``follows`` is the hand derivation of the
expected gradient, checked by ``tests/test_audit.py`` on exact toys; None where there is none to state.

Sources were read in their public repositories; where a detail could not be checked (a default, a clamp, an
exact weight), the entry's docstring says so. Scale factors (a KL coefficient, token-mean against sequence-sum
reductions over a fixed length) are left out: they change a step size, not a direction.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from opdlab.audit import DIVERGENCES, Estimator, Term
from opdlab.divergences import get

__all__ = ["CATALOGUE"]


# --- sampled-token KL estimators (Schulman's k1, k2, k3) ------------------------------------------------------
def k1_pg(logp_student_BT, logp_teacher_BT):
    """Sampled-token reverse KL as a detached reward, A = log q(y) - log pi(y) = log u (k1), policy gradient.

    E[g] = -E[log u grad log pi] = grad KL(pi || q). The OPD of most frameworks: tinker-cookbook
    (tinker_cookbook/distillation/train_on_policy.py, incorporate_kl_penalty: advantage minus kl_penalty_coef
    times (sampled logprob - teacher logprob), then an importance-sampling loss, the same gradient on-policy);
    THUDM/slime (apply_opd_kl_to_advantages); Trinity-RFT OnPolicyDistillAdvantage; verl distillation with
    loss_mode=k1 and use_policy_gradient=True.
    """
    return logp_teacher_BT - logp_student_BT


def k1_backprop(logp_student_BT, logp_teacher_BT):
    """k1 = log pi(y) - log q(y) backpropagated directly: E[grad log pi] = 0, so it follows nothing.

    verl's kl_penalty (verl/trainer/ppo/core_algos.py, "kl"/"k1") used as a loss; that verl's distillation refuses
    this combination is a claim that could not be confirmed here.
    """
    return logp_student_BT - logp_teacher_BT


def k2_backprop(logp_student_BT, logp_teacher_BT):
    """k2 = ½ (log pi - log q)^2 backpropagated: grad = -log u grad log pi, so E[g] = grad KL(pi || q).

    verl kl_penalty "k2"/"mse" (verl/trainer/ppo/core_algos.py) as a directly differentiated loss.
    """
    return 0.5 * (logp_student_BT - logp_teacher_BT).square()


def k3_backprop(logp_student_BT, logp_teacher_BT):
    """k3 = (u - 1) - log u backpropagated through log pi under student sampling: grad = (1 - u) grad log pi,
    so E[g] = -E[u grad log pi] = grad KL(q || pi): the *forward* KL, although k3's value estimates the reverse.

    verl kl_penalty "k3"/"low_var_kl" (verl/trainer/ppo/core_algos.py) used as a loss (use_kl_loss; verl
    distillation loss_mode=k3 with use_policy_gradient=False). verl also clamps log u to [-20, 20] and k3 to
    [-10, 10]; the clamps are left out here (where they bind, that token's gradient is 0). That this is verl's
    distillation default, and torchrl's DistillationLoss reverse mode, is a reading not checked here.
    """
    log_u = logp_teacher_BT - logp_student_BT
    return log_u.exp() - 1.0 - log_u


def k3_plus_backprop(logp_student_BT, logp_teacher_BT):
    """verl's "k3+" straight-through: the value of k3, the gradient of k2 (backward - sg(backward) + sg(forward)).

    verl/trainer/ppo/core_algos.py, kl_penalty with a name ending in "+". E[g] = grad KL(pi || q).
    """
    k2 = 0.5 * (logp_student_BT - logp_teacher_BT).square()
    return k2 - k2.detach() + k3_backprop(logp_student_BT, logp_teacher_BT).detach()


def k3_pg(logp_student_BT, logp_teacher_BT):
    """A = -k3, detached, in a policy-gradient path: E[g] = E[(u - 1 - log u) grad log pi] = grad RKL - grad FKL.

    verl distillation with loss_mode=k3 (or low_var_kl) and use_policy_gradient=True ("use negative
    distillation loss as reward"); verl's clamps are left out, as in ``k3_backprop``.
    """
    return -k3_backprop(logp_student_BT, logp_teacher_BT)


def k2_pg(logp_student_BT, logp_teacher_BT):
    """A = -k2 = -½ (log u)^2, detached: E[g] = E[½ (log u)^2 grad log pi], neither KL's gradient.

    verl distillation with loss_mode=k2 (or mse) and use_policy_gradient=True.
    """
    return -k2_backprop(logp_student_BT, logp_teacher_BT)


def abs_pg(logp_student_BT, logp_teacher_BT):
    """A = -|log pi - log q|, detached (verl kl_penalty "abs" as a reward): E[g] = E[|log u| grad log pi]."""
    return -(logp_student_BT - logp_teacher_BT).abs()


# --- MiniLLM (TRL's port) and discounted returns ---------------------------------------------------------------
def k1_ratio_undetached(logp_student_BT, logp_teacher_BT):
    """A = log q - log pi computed from the student's forward pass and *not* detached, in the GRPO ratio loss
    -(pi/sg(pi)) A. The extra term -grad A = grad log pi(y_t) has zero mean: E[g] = grad KL(pi || q), with
    more variance.

    huggingface/trl, trl/experimental/minillm/minillm_trainer.py: _compute_advantage builds the rewards from
    student_log_probs_on_labels gathered from the differentiable log_softmax and adds them to
    inputs["advantages"] before GRPO's _compute_loss (no detach in the code read, TRL v1.10).
    """
    return logp_teacher_BT - logp_student_BT


def full_vocab_reverse_kl(logp_student_BTV, logp_teacher_BTV):
    """Full-vocabulary KL(pi || q) at each visited context, backpropagated: MiniLLM's single-step term.

    TRL MiniLLMTrainer._single_step_decomposition_loss: F.kl_div(teacher_log_probs, student_log_probs,
    log_target=True), summed over the vocabulary (TRL averages over tokens; a scale here).
    """
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

    tinker-cookbook's kl_discount_factor (incorporate_kl_penalty discounts the future per-token reverse-KL
    penalty; default 0, where this is ``k1_pg``). gamma = 1 gives the gradient of the sequence reverse KL
    E[sum_t KL_t]; 0 < gamma < 1 mixes. The exact discount convention of tinker's helper was not read line by line.
    """
    T = logp_student_BT.shape[-1]
    r = logp_teacher_BT - logp_student_BT
    d_TT = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # s - t
    weight_TT = torch.where(d_TT >= 0, gamma ** d_TT.clamp_min(0).to(r.dtype), torch.zeros((), dtype=r.dtype))
    return r @ weight_TT.T


def iw_opd(logp_student_BT, logp_teacher_BT):
    """Position-weighted k1 advantage (IW-OPD, arXiv 2606.22600; TRL experimental.iw_opd IWOPDTrainer): the
    token's k1 reward times the teacher/student prefix ratio w_t = prod_{s<t} u_s, detached, so late tokens
    after a drifting prefix weigh less. Policy gradient.

    The paper's exact weight (any clip or normalisation of the prefix ratio) was not checked: this is the
    unclipped ratio. E[g] = sum_c P_teacher(c) grad KL_c: reverse KL on the teacher's context distribution,
    which is no registry gradient on sequences (on one context it is reverse KL).
    """
    log_u = logp_teacher_BT - logp_student_BT
    log_w = torch.cumsum(log_u, -1) - log_u  # sum_{s<t}
    return log_w.exp().detach() * log_u


# --- JSD advantages and full-vocabulary GKD --------------------------------------------------------------------
def trinity_jsd_advantage(logp_student_BT, logp_teacher_BT, beta=0.5):
    """Trinity-RFT JSDAdvantage (trinity/algorithm/advantage_fn/jsd_advantage.py): from the sampled tokens' log
    probabilities s, t only, log m = log(beta e^t + (1 - beta) e^s), JSD_token = beta (t - log m) + (1 - beta)
    (s - log m), A = -JSD_token (kl_coef = 1), detached (old_log_probs), policy gradient.

    With m/pi = beta u + 1 - beta: A = ln(beta u + 1 - beta) - beta ln u, so E[g] = grad GJSD_beta / (1 - beta)
    - beta grad KL(pi || q): for beta = 0.5, 2 grad JSD - ½ grad RKL.
    """
    s, t = logp_student_BT, logp_teacher_BT
    if beta == 0:
        jsd = s - t
    elif beta == 1:
        jsd = t - s
    else:
        log_m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
        jsd = beta * (t - log_m) + (1 - beta) * (s - log_m)
    return -jsd


def gkd_generalized_jsd(logp_student_BTV, logp_teacher_BTV, beta=0.5):
    """TRL GKD's generalized_jsd_loss (trl/trainer/gkd_trainer.py, GKDTrainer; the DistillationTrainer and
    GOLD keep the same branches) at each sampled context, over the full vocabulary, backpropagated:
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
        log_M = torch.logsumexp(torch.stack([logp_student_BTV + torch.log(1 - b), logp_teacher_BTV + torch.log(b)]), 0)
        jsd = (b * F.kl_div(log_M, logp_teacher_BTV, reduction="none", log_target=True)
               + (1 - b) * F.kl_div(log_M, logp_student_BTV, reduction="none", log_target=True))
    return jsd.sum(-1)


# --- bounded and power advantages, and a control ----------------------------------------------------------------
def tv_sign(logp_student_BT, logp_teacher_BT):
    """Sign-only advantage A = sign(log u), detached (TV-OPD, arXiv 2609.08341): E[g] = 2 grad TV, since the
    OPD+ weight of total variation is ½ sign(u - 1). The paper's bounded variant [1 - e^Δ]₊ is not included:
    which Δ it means could not be checked.
    """
    return torch.sign(logp_teacher_BT - logp_student_BT)


def power_reward(logp_student_BT, logp_teacher_BT, alpha=0.5):
    """Box-Cox / power reward A = (u^alpha - 1)/alpha, detached (PowerOPD, arXiv 2606.17199; log u is its
    alpha -> 0 limit). It is the OPD+ weight of the Amari alpha-divergence, so E[g] = grad D_alpha. That the
    paper transforms the ratio u (and not the teacher probability alone) is this entry's reading.
    """
    return torch.expm1(alpha * (logp_teacher_BT - logp_student_BT)) / alpha


def constant_negative(logp_student_BT):
    """A constant negative advantage A = -1 (the control of arXiv 2608.31046): -c E[grad log pi] = 0 per state.

    The teacher is ignored; any effect in training comes from elsewhere (sampling noise, optimiser, reductions).
    """
    return -torch.ones_like(logp_student_BT)


# --- the catalogue ----------------------------------------------------------------------------------------------
def _entry(name, terms, claims=None, scope="token_local", follows=None, doc_fn=None) -> Estimator:
    terms = tuple(Term(fn, mode) for fn, mode in terms)
    fn = doc_fn or terms[0].fn
    return Estimator(name, terms, claims, scope, follows, inspect.cleandoc(fn.__doc__ or ""))


def _opd(div_name: str, method: str):
    div = get(div_name)

    def advantage(logp_student_BT, logp_teacher_BT):
        return div.advantage(logp_teacher_BT - logp_student_BT, method)

    formula = "-f(u)" if method == "opd" else "w_f(u) = -f(u) + u f'(u)"
    advantage.__name__ = f"{method}_{div.name}"
    advantage.__doc__ = (f"{'Stop-gradient OPD' if method == 'opd' else 'OPD+'} for {div.label}: A = {formula}, "
                         f"detached, policy gradient (opdlab.divergences; OPD+ paper, arXiv 2606.01039).")
    return advantage


def _build() -> dict[str, Estimator]:
    pg, bp, ir = "policy_gradient", "backprop", "importance_ratio"
    gkd = functools.partial
    entries = [
        _entry("k1_pg", [(k1_pg, pg)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("k1_backprop", [(k1_backprop, bp)], "reverse_kl", follows={}),
        _entry("k2_backprop", [(k2_backprop, bp)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("k3_backprop", [(k3_backprop, bp)], "reverse_kl", follows={"forward_kl": 1.0}),
        _entry("k3_plus_backprop", [(k3_plus_backprop, bp)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("k3_pg", [(k3_pg, pg)], "reverse_kl", follows={"reverse_kl": 1.0, "forward_kl": -1.0}),
        _entry("k2_pg", [(k2_pg, pg)], "reverse_kl"),
        _entry("abs_pg", [(abs_pg, pg)], "reverse_kl"),
        _entry("k1_ratio_undetached", [(k1_ratio_undetached, ir)], "reverse_kl", follows={"reverse_kl": 1.0}),
        _entry("minillm_trl_default", [(k1_ratio_undetached, ir), (full_vocab_reverse_kl, bp)], "reverse_kl",
               follows={"reverse_kl": 2.0}, doc_fn=_minillm_doc),
        _entry("minillm_gamma0.95_normalised", [(minillm_discounted, ir)], "reverse_kl", scope="sequence"),
        _entry("k1_return_gamma1", [(k1_return, pg)], "reverse_kl", scope="sequence", follows={"reverse_kl": 1.0}),
        _entry("k1_return_gamma0.5", [(gkd(k1_return, gamma=0.5), pg)], "reverse_kl", scope="sequence",
               doc_fn=k1_return),
        _entry("iw_opd", [(iw_opd, pg)], "reverse_kl"),
        _entry("trinity_jsd_advantage", [(trinity_jsd_advantage, pg)], "jsd",
               follows={"jsd": 2.0, "reverse_kl": -0.5}),
        _entry("trinity_jsd_advantage_beta1", [(gkd(trinity_jsd_advantage, beta=1.0), pg)], "forward_kl",
               follows={"reverse_kl": -1.0}, doc_fn=_trinity_beta1_doc),
        _entry("gkd_jsd_beta0.5", [(gkd_generalized_jsd, bp)], "jsd", follows={"jsd": 1.0}),
        _entry("gkd_beta0", [(gkd(gkd_generalized_jsd, beta=0.0), bp)], "forward_kl",
               follows={"forward_kl": 1.0}, doc_fn=gkd_generalized_jsd),
        _entry("gkd_beta0.001", [(gkd(gkd_generalized_jsd, beta=1e-3), bp)], "forward_kl",
               follows={"gjsd:0.001": 1.0}, doc_fn=gkd_generalized_jsd),
        _entry("gkd_beta1", [(gkd(gkd_generalized_jsd, beta=1.0), bp)], "reverse_kl",
               follows={"reverse_kl": 1.0}, doc_fn=gkd_generalized_jsd),
        _entry("tv_sign", [(tv_sign, pg)], "tv", follows={"tv": 2.0}),
        _entry("power_reward_alpha0.5", [(power_reward, pg)], "alpha:0.5", follows={"alpha:0.5": 1.0}),
        _entry("constant_negative", [(constant_negative, pg)], None, follows={}),
    ]
    for name in DIVERGENCES:
        d = get(name).name
        entries.append(_entry(f"opd:{d}", [(_opd(d, "opd"), pg)], d,
                              follows={"reverse_kl": 1.0} if d == "reverse_kl" else None))
        entries.append(_entry(f"opd_plus:{d}", [(_opd(d, "opd_plus"), pg)], d, follows={d: 1.0}))
    return {e.name: e for e in entries}


def _minillm_doc():
    """TRL MiniLLMTrainer with its defaults (trl/experimental/minillm, v1.10: rkl_advantage=True,
    single_step_decomposition=True, gamma=0): the undetached k1 advantage in the GRPO ratio loss
    (``k1_ratio_undetached``) plus the full-vocabulary single-step reverse KL (``full_vocab_reverse_kl``).
    Both terms follow grad KL(pi || q), so the current token's reverse KL is counted twice: E[g] = 2 grad RKL.
    """


def _trinity_beta1_doc():
    """Trinity-RFT JSDAdvantage at lambda_coef (beta) = 1, documented there as KL(teacher || student): the
    branch JSD_token = t - s gives A = s - t = -log u, detached, so E[g] = E[log u grad log pi] = -grad
    KL(pi || q): it ascends the reverse KL, and its expectation under student samples is not the forward KL.
    """


CATALOGUE = _build()
