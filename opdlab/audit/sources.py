"""Where each catalogue entry of ``opdlab.audit.catalogue`` comes from: the peer code it transcribes, pinned.

``SOURCES`` maps an entry's name to its ``Source`` (repository, path, the commit read, line range, a short
verbatim excerpt, the defaults modelled). ``OUT_OF_SCOPE`` names the peers' losses this version does not
transcribe, each with the reason. Both are data: a test checks that every entry carries a complete pin, and
docs/audit.md renders them (``opdlab.report.audit_table``).
"""
from __future__ import annotations

from opdlab.audit.types import Source

__all__ = ["SOURCES", "OUT_OF_SCOPE", "OPDLAB"]

VERL = "verl-project/verl"
VERL_AT = "1dda039b9c6311889a9c9a26040677e1254814f9 (v0.8.0-337)"
TRL = "huggingface/trl"
TRL_AT = "f2cd57710ae345ea6428ae95363267fcf38a3dc8 (1.10.0.dev0)"
TINKER = "thinking-machines-lab/tinker-cookbook"
TINKER_AT = "9dfcc3a2cf44432d621a01005073dc6d76a1e87a"
CORE = "verl/trainer/ppo/core_algos.py"
LOSSES = "verl/trainer/distillation/losses.py"


def _verl(path, lines, excerpt, defaults, **kw) -> Source:
    return Source(VERL, path, VERL_AT, lines, excerpt, defaults, **kw)


_KL_PENALTY = dict(path=CORE, lines="2215-2244")
SOURCES: dict[str, Source] = {
    "k1_pg": Source(TINKER, "tinker_cookbook/distillation/train_on_policy.py", TINKER_AT, "91-103, 146-147",
                    "kl_advantages = -kl_penalty_coef * float_masks[i] * reverse_kl[i]",
                    "kl_penalty_coef 1.0, kl_discount_factor 0.0, loss_fn importance_sampling (on-policy: the "
                    "policy gradient); coefficient left out (a scale)"),
    "k1_backprop": _verl(**_KL_PENALTY, excerpt='if kl_penalty in ("kl", "k1"):\n        return logprob - ref_logprob',
                         defaults="not a verl configuration: verl refuses loss_mode k1 when use_policy_gradient is "
                                  "False (verl/workers/config/distillation.py 120-124); see verl_kl_alias_backprop"),
    "verl_kl_alias_backprop": _verl(
        "verl/workers/config/distillation.py", "120-124",
        'if not self.use_policy_gradient and self.loss_mode == "k1":',
        'loss_mode "kl" (kl_penalty_forward treats "kl" and "k1" alike, core_algos.py 2227), '
        "use_policy_gradient False: the refusal checks only the literal \"k1\""),
    "k2_backprop": _verl(**_KL_PENALTY, excerpt='if kl_penalty in ("mse", "k2"):\n        return 0.5 * (logprob - '
                                                 'ref_logprob).square()',
                         defaults="loss_mode k2 (or mse), use_policy_gradient False, loss_max_clamp null (the YAML)"),
    "k3_backprop": _verl(**_KL_PENALTY, excerpt="kld = (ratio - kl - 1).contiguous()",
                         defaults="k3 without verl's clamps (they are in verl_yaml_default); torchrl's "
                                  "DistillationLoss reverse mode is reported to compute the same, not read here"),
    "k3_plus_backprop": _verl(CORE, "2200-2212",
                              "return backward_score - backward_score.detach() + forward_score.detach()",
                              'a kl_penalty name ending in "+" (e.g. "k3+"); the forward value keeps verl\'s k3 '
                              "clamps"),
    "k3_pg": _verl(LOSSES, "268-284", "advantages=-distillation_losses.detach(),",
                   "loss_mode k3, use_policy_gradient True, no clamps (the clamped form is "
                   "verl_dataclass_default)"),
    "k2_pg": _verl(LOSSES, "268-284", "advantages=-distillation_losses.detach(),",
                   "loss_mode k2 (or mse), use_policy_gradient True, no loss clamp"),
    "abs_pg": _verl(LOSSES, "268-284", "advantages=-distillation_losses.detach(),",
                    "loss_mode abs, use_policy_gradient True"),
    "abs_backprop": _verl(**_KL_PENALTY,
                          excerpt='if kl_penalty == "abs":\n        return (logprob - ref_logprob).abs()',
                          defaults="loss_mode abs, use_policy_gradient False (allowed: only k1 is refused)"),
    "verl_yaml_default": _verl("verl/trainer/config/distillation/distillation.yaml", "24-43",
                               "loss_mode: k3 ... loss_max_clamp: null ... use_policy_gradient: false",
                               "the YAML that hydra loads: k3 backpropagated, no loss clamp (kl_penalty_forward's own "
                               "clamps: log u to [-20, 20], k3 to [-10, 10], core_algos.py 2238-2244)"),
    "verl_dataclass_default": _verl("verl/workers/config/distillation.py", "65-85",
                                    'loss_mode: str = "k3" ... loss_max_clamp: Optional[float] = 10.0 ... '
                                    "use_policy_gradient: bool = True",
                                    "DistillationLossConfig() built in Python: k3 as a detached reward, clamp ±10 "
                                    "(losses.py 258-260), vanilla policy loss, clip ratio 0.2 (on-policy: inactive)"),
    "verl_example_default": _verl("examples/on_policy_distillation_trainer/run_qwen3_8b_fsdp.sh", "14-16, 111-116",
                                  "distillation.distillation_loss.loss_max_clamp=10.0",
                                  "every k1 example script (fsdp, veomni, mopd, vl, 0.6b): loss_mode k1, "
                                  "use_policy_gradient True, loss_max_clamp 10 applied as clamp(-10, 10) "
                                  "(losses.py 258-260), log_prob_min_clamp -10 (used by the top-k losses only)"),
    "verl_forward_kl_topk": _verl("verl/trainer/distillation/fsdp/losses.py", "124-130",
                                  "distillation_losses = kl_divergence(log_q=student_topk_log_probs, "
                                  "log_p=teacher_topk_log_probs)",
                                  "examples/.../run_qwen3_8b_megatron.sh: loss_mode forward_kl_topk, "
                                  "use_policy_gradient False, topk 64, loss_max_clamp 10, log_prob_min_clamp -10; "
                                  "clamp_min(0) (losses.py 365); k = ceil(V/2) on the toys",
                                  note="the megatron path (megatron/losses.py) masks tokens below "
                                       "log_prob_min_clamp instead of flooring them; the fsdp path is transcribed"),
    "nemo_rl_mixed_topk": Source("NVIDIA-NeMo/RL", "nemo_rl/algorithms/loss/loss_functions.py",
                                 "7ea279abfbeb698b092856d0dab61e7cf39bc909", "1109-1182",
                                 "kl_forward = teacher_probs * (teacher_topk_logprobs - student_topk_logprobs)",
                                 "kl_type mixed, mixed_kl_weight 0.5, zero_outside_topk False: both top-k "
                                 "log-probabilities renormalised by log_softmax (nemo_rl/distributed/model_utils.py "
                                 "2003-2011); topk_logits_k 64 (examples/configs/distillation_math.yaml 13); "
                                 "k = ceil(V/2) on the toys"),
    "miles_topk_reward": Source("radixark/miles", "miles/rollout/on_policy_distillation.py",
                                "31f1ca961a94cb860cec3b2dea34ec332bfa8f76", "252-348",
                                "reverse_kl = sum(\n            w * (s_logp - t_logp) for w, s_logp, t_logp in zip(",
                                "--opd-log-prob-top-k > 0 (default 0: the k1 path), --opd-top-k-strategy "
                                "only-student, --opd-reward-weight-mode student_p, weights normalised "
                                "(miles/utils/arguments.py 1633-1660); entering the advantage as adv - opd_kl_coef "
                                "* reverse_kl (miles/backends/training_utils/loss_hub/opd.py 54); k = ceil(V/2)"),
    "k1_ratio_undetached": Source(TRL, "trl/experimental/minillm/minillm_trainer.py", TRL_AT, "330, 385-392",
                                  'inputs["advantages"] = inputs["advantages"].unsqueeze(1) + reverse_kl_advantage',
                                  "rkl_advantage True, gamma 0, kd_temperature as the toy's",
                                  holds_for="TRL's experimental MiniLLMTrainer as of 1.10.0.dev0; reported "
                                            "removed by TRL 1.16 (not checked here)"),
    "minillm_trl_default": Source(TRL, "trl/experimental/minillm/minillm_trainer.py", TRL_AT, "273-275, 385-392",
                                  "reg_loss = F.kl_div(\n            teacher_log_probs, student_log_probs, "
                                  'reduction="none", log_target=True',
                                  "rkl_advantage True, single_step_decomposition True, gamma 0 "
                                  "(minillm_config.py 62-83)",
                                  holds_for="TRL's experimental MiniLLMTrainer as of 1.10.0.dev0; reported "
                                            "removed by TRL 1.16 (not checked here)"),
    "minillm_gamma0.95_normalised": Source(TRL, "trl/experimental/minillm/minillm_trainer.py", TRL_AT, "330-345",
                                           "advantages = advantages.flip(1).cumsum(dim=1).flip(1)",
                                           "gamma 0.95 (the MiniLLM paper's; TRL's default is 0), "
                                           "length_normalization True",
                                           holds_for="TRL 1.10.0.dev0; reported removed by TRL 1.16 (not checked "
                                                     "here)"),
    "k1_return_gamma1": Source(TINKER, "tinker_cookbook/distillation/train_on_policy.py", TINKER_AT, "103-105",
                               "kl_advantages = discounted_future_sum_vectorized(kl_advantages, kl_discount_factor)",
                               "kl_discount_factor 1 (the default is 0); discounted_future_sum_vectorized sums "
                               "gamma^k x[i+k] over k >= 0 (tinker_cookbook/rl/metrics.py 192-211)"),
    "k1_return_gamma0.5": Source(TINKER, "tinker_cookbook/distillation/train_on_policy.py", TINKER_AT, "103-105",
                                 "kl_advantages = discounted_future_sum_vectorized(kl_advantages, "
                                 "kl_discount_factor)", "kl_discount_factor 0.5"),
    "iw_opd": Source(TRL, "trl/experimental/iw_opd/iw_opd_trainer.py", TRL_AT, "1256-1266",
                     "weights = (1.0 + self.iw_opd_gamma * (1.0 - prefix_abs_advantages / "
                     "total_abs_advantages)).detach()",
                     "iw_opd_gamma 0.5, iw_opd_epsilon 1e-8 (iw_opd_config.py 219-226), rollout log-probs = the "
                     "student's (on-policy), temperature as the toy's",
                     note="the authors' own code for arXiv 2606.22600 is reported to use the same weight; not read "
                          "here"),
    "trinity_jsd_advantage": Source("agentscope-ai/Trinity-RFT", "trinity/algorithm/advantage_fn/jsd_advantage.py",
                                    "3ae104b6a846f0c8e35807d3884b0c081525e03d", "46-87",
                                    "jsd = beta * kl_teacher + (1 - beta) * kl_student",
                                    "lambda_coef 0.5, kl_coef 1.0 (default_args); advantages from old_log_probs",
                                    holds_for="this commit: its kl_teacher and kl_student carry the factors "
                                              "p_teacher, p_student; other versions of the file differ"),
    "gkd_jsd_beta0.5": Source(TRL, "trl/experimental/gkd/gkd_trainer.py", TRL_AT, "239-297",
                              "jsd = beta * kl_teacher + (1 - beta) * kl_student",
                              "beta 0.5, temperature 0.9 (gkd_config.py 55-67; modelled as the toy's logits), "
                              "lmbda 0.5 (the on-policy half is what is audited)",
                              holds_for="trl/experimental/gkd/ from TRL 1.x (earlier trl/trainer/gkd_trainer.py); "
                                        "the DistillationTrainer keeps the same branches"),
    "gkd_beta0": Source(TRL, "trl/experimental/gkd/gkd_trainer.py", TRL_AT, "279-280",
                        'jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)',
                        "beta 0: the special-cased forward KL", holds_for="trl/experimental/gkd/ from TRL 1.x"),
    "gkd_beta0.001": Source(TRL, "trl/experimental/gkd/gkd_trainer.py", TRL_AT, "283-297",
                            "jsd = beta * kl_teacher + (1 - beta) * kl_student",
                            "beta 1e-3: the interior branch next to the beta = 0 special case",
                            holds_for="trl/experimental/gkd/ from TRL 1.x"),
    "gkd_beta1": Source(TRL, "trl/experimental/gkd/gkd_trainer.py", TRL_AT, "281-282",
                        'jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)',
                        "beta 1: the special-cased reverse KL", holds_for="trl/experimental/gkd/ from TRL 1.x"),
    "tv_sign": Source("arXiv 2609.08341", "", "paper", "", "",
                      "A = sign(log u); the bounded variant [1 - e^Δ]₊ is not included", read=False,
                      note="no code of the paper could be read here"),
    "power_opd_alpha5": Source("EIT-NLP/PowerOPD", "opd_dynamics/trainer.py",
                               "65819e14a49c940fa7b2977f07872cabd6229129", "121-123, 391-401",
                               "power_diff_full = torch.exp(self.power_reward_alpha * teacher_logp_full) - "
                               "torch.exp(\n            self.power_reward_alpha * student_logp_full",
                               "reward_mode sampled_power_diff, power_reward_alpha 5 (scripts/run_poweropd.sh 10; "
                               "the config's default is 0.1), reward_normalization none, loss -(reward * logp) "
                               "with the reward detached"),
    "opsa_low_probability": Source("arXiv 2608.31046", "", "paper", "", "",
                                   "f 0.2 of each batch's tokens (lowest student probability), A = -0.5 (the "
                                   "fixed-negative preset), the rest masked; the batch quantile modelled per "
                                   "context in its large-batch limit", read=False,
                                   note="its code could not be read here; the form is the one reported from it"),
}
OPDLAB = Source("opdlab", "opdlab/core/divergences.py", "this tree", "Divergence.advantage",
                 'if method == "opd_plus":\n            return self.opd_plus_advantage(log_u)',
                 "method opd or opd_plus, gamma 0, no baseline, no clip", note="opdlab's own reference")

# The peers' losses this catalogue version does not transcribe, and why (a test reads this).
OUT_OF_SCOPE: dict[str, str] = {
    "trl_sparse_gjsd_tail_bucket": (
        "TRL's server distillation (trl/experimental/server_distillation/server_distillation_trainer.py 197-238 at "
        f"{TRL_AT}: loss_top_k 1, loss_add_tail True) builds its support from the teacher's top-1 token and the "
        "sampled token's id, then adds the tail bucket log(1 - sum exp(support)). The audit's functions receive the "
        "sampled token's log-probabilities, not its id, so this support cannot be rebuilt from their inputs without "
        "a top-k payload that carries token ids (opdlab.core.sparse's)."),
}
