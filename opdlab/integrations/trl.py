"""OPD and OPD+ for every registered f-divergence inside TRL's ``DistillationTrainer`` (``pip install opdlab[trl]``).

A user keeps TRL's trainer, data, chat templates, generation (vLLM included), launchers (``accelerate``,
DeepSpeed, FSDP) and config, and names the estimator in an ``OPDConfig``, a ``DistillationConfig`` with seven more
fields::

    args = OPDConfig(output_dir="out", divergence="forward_kl", method="opd_plus", gamma=0.0, baseline="expected")
    OPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data).train()

``OPDTrainer`` overrides one seam of ``DistillationTrainer``: ``_compute_loss(unwrapped_student, inputs,
num_items_in_batch) -> (loss, entropy_sum, n_valid)``, which TRL runs inside the DDP/FSDP wrapper's forward on the
completions it generated. TRL's own loss there is the full-vocabulary generalised JSD differentiated through the
student; here the loss is opdlab's (docs/math.md §3-§5, arXiv 2606.01039 Eq. 7):

- ``method="opd_plus"``: ``L = -(1/n) sum_t A_t log pi_theta(y_t|c_t)`` with
  ``A_t = w_f(u_t) - sum_{s>t} gamma^(s-t) f(u_s) - b(c_t)``, ``u_t = pi_T(y_t|c_t) / pi_theta(y_t|c_t)``;
- ``method="opd"``: the same with ``-f(u_t)`` in place of ``w_f(u_t)`` (the stop-gradient baseline);
- ``method="full_vocabulary"``: ``L = (1/n) sum_t D_f(pi_T(.|c_t) || pi_theta(.|c_t))`` (exact at each visited
  context, the token-local gradient without sampling noise at the token);
- ``teacher_topk=k`` with ``"opd_plus"``: only the teacher's top-k log-probabilities and the sampled token's
  reach the estimator, as from a served teacher (``opdlab.core.sparse``: exact on the support, the tail from the
  sample, unbiased for every f; baselines ``none``, ``tail`` or ``loo``).

The loss is ``opdlab.core.objective.loss``, the one the training step minimises (its advantages from
``estimators.baselined_advantages``, its losses ``estimators.reinforce_loss`` / ``estimators.full_vocabulary_loss`` /
``sparse.sparse_surrogate``); nothing here re-derives them. Departures from
TRL's loss: the student's (B, T, V) logits are materialised (TRL projects hidden states chunk by chunk), and the
logits are those of the model's own forward (its logit scaling and soft-capping included) at temperature 1.

Reduction: TRL divides a rank's summed loss by the global batch's unmasked tokens over the number of ranks, so
that DDP's gradient average and gradient accumulation give the global ``"token"`` mean; ``reduction="token"``
keeps exactly that. ``reduction="sequence"`` divides by the rank's sequences times the accumulation steps (the
global ``(1/B) sum`` after DDP's average), the reduction under which gamma = 1 is unbiased for the sequence
gradient. The ``"loo"`` baseline groups a rank's micro-batch as one group (TRL samples one completion per
prompt; another prompt's sample at the same position is independent of this one, so the baseline stays unbiased).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from opdlab.config.choices import BASELINES, REDUCTIONS, SPARSE_BASELINES, allowed_divergences, check_trainable
from opdlab.core import objective
from opdlab.core.divergences import get as get_divergence
from opdlab.errors import UserError
from opdlab.lm.sampling import gather_logp
from opdlab.lm.tokenizer import check_compatible

try:
    from trl import DistillationConfig, DistillationTrainer
except ImportError as err:  # the extra is optional; say how to get it
    raise ImportError("opdlab.integrations.trl needs TRL >= 1.16 (its DistillationTrainer): "
                      "pip install 'opdlab[trl]'") from err

__all__ = ["OPDConfig", "OPDTrainer", "INTEGRATION_METHODS", "SAMPLING_SETTINGS", "check_settings", "opd_loss"]

INTEGRATION_METHODS = objective.names(samples_from="student")
"""The methods that learn from the student's own samples (TRL generates from the student): ``"opd"`` and
``"opd_plus"`` estimate from the sampled token; ``"full_vocabulary"`` is exact at each context."""

SAMPLING_SETTINGS = {"top_k": 0, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}
"""TRL's sampling settings, at the values that sample from pi_theta itself. Any other value draws tokens from
another policy, which a sampled-token estimator needs to be pi_theta; only ``"full_vocabulary"`` (exact at the
contexts it is given, however they were reached) accepts them."""

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")
_STATS = ("n_clipped", "n_tokens", "divergence_sum", "adv_sum", "log_u_sum", "entropy_sum")


@dataclass
class OPDConfig(DistillationConfig):
    """TRL's ``DistillationConfig`` plus the estimator (see the module doc); checked by ``check_settings``."""

    divergence: str = field(default="reverse_kl", metadata={"help": "an opdlab divergence: " + allowed_divergences()})
    method: str = field(default="opd_plus", metadata={"help": "opd (stop-gradient), opd_plus or full_vocabulary"})
    gamma: float = field(default=0.0, metadata={"help": "weight of the future terms, in [0, 1] (0: token-local)"})
    baseline: str = field(default="none", metadata={"help": "none, expected (exact per-context mean) or loo"})
    log_u_clip: float | None = field(default=None, metadata={"help": "clamp |log u| to this first (None: no clip)"})
    reduction: str = field(default="token", metadata={"help": "token (TRL's) or sequence"})
    teacher_topk: int | None = field(default=None, metadata={
        "help": "None: the whole teacher distribution; k: only its top-k log-probabilities and the sampled "
                "token's reach the estimator (what a served teacher sends; method opd_plus, baseline none, tail "
                "or loo)"})

    def __post_init__(self):
        super().__post_init__()
        check_settings(self)


def check_settings(args) -> None:
    """Raise a ``UserError`` naming the setting and what is allowed, for an unknown divergence, method, baseline
    or reduction, gamma outside [0, 1], a non-positive clip, TRL's ``beta`` or a temperature other than 1 (the
    divergence is named by ``divergence``, and its objective is at temperature 1), and a sampled-token method with a
    setting only the full-vocabulary loss accepts (``SAMPLING_SETTINGS``, or gamma / a baseline there)."""
    try:
        get_divergence(args.divergence)
        check_trainable(args.divergence)  # as the run spec: an objective that trains nothing is refused
    except (TypeError, ValueError) as err:
        raise UserError(f"OPDConfig.divergence: {err}") from None
    _check_choice("method", args.method, INTEGRATION_METHODS)
    topk = getattr(args, "teacher_topk", None)
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
            raise UserError(f"OPDConfig.teacher_topk must be None or an int >= 0, got {topk!r}")
        if objective.get(args.method).topk_loss is None:
            raise UserError(f"teacher_topk needs {_either(objective.names_with_topk())} (the top-k estimator is "
                            f"OPD+'s, opdlab.core.sparse), got {args.method!r}")
        _check_choice("baseline", args.baseline, SPARSE_BASELINES)  # 'expected' needs the whole teacher
    else:
        _check_choice("baseline", args.baseline, BASELINES)
    _check_choice("reduction", args.reduction, REDUCTIONS)
    if not 0.0 <= args.gamma <= 1.0:
        raise UserError(f"OPDConfig.gamma must lie in [0, 1] (0: token-local, 1: the sequence gradient), "
                        f"got {args.gamma}")
    if args.log_u_clip is not None and not args.log_u_clip > 0:
        raise UserError(f"OPDConfig.log_u_clip must be positive or None, got {args.log_u_clip}")
    if args.beta != 1.0:
        raise UserError(f"beta={args.beta} is TRL's generalised-JSD weight, which OPDTrainer does not read: name the "
                        f"divergence instead (divergence='gjsd:<weight on the teacher>', or one of "
                        f"{allowed_divergences()}) and leave beta at 1.0")
    sampling = {**{k: getattr(args, k) for k in SAMPLING_SETTINGS}, "temperature": args.temperature,
                **(args.generation_kwargs or {})}
    if sampling["temperature"] != 1.0:
        raise UserError(f"temperature={sampling['temperature']}: opdlab's objectives are at temperature 1 and its "
                        "estimators sample from pi_theta itself; set temperature=1.0")
    if not objective.get(args.method).sampled:
        if args.gamma != 0.0 or args.baseline != "none":
            raise UserError(f"method={args.method!r} does not estimate from the sampled token and has no "
                            f"advantages: gamma ({args.gamma}) and baseline ({args.baseline!r}) apply to "
                            f"{_either(objective.names(sampled=True))} only")
        return
    changed = {k: sampling[k] for k, v in SAMPLING_SETTINGS.items() if k in sampling and sampling[k] != v}
    if sampling.get("do_sample", True) is False or sampling.get("num_beams", 1) != 1:
        changed.update({k: sampling[k] for k in ("do_sample", "num_beams") if k in sampling})
    if changed:
        exact = [m for m in INTEGRATION_METHODS if not objective.get(m).sampled]
        raise UserError(f"method={args.method!r} estimates from tokens sampled from pi_theta itself, but "
                        f"{changed} samples from another policy (allowed: {SAMPLING_SETTINGS}, do_sample=True, "
                        f"num_beams=1); only {_either(exact)} accepts these settings")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _either(methods) -> str:
    """``method='a' or method='b'``, for messages."""
    return " or ".join(f"method={m!r}" for m in methods)


def opd_loss(args, logits_student_BTV, logits_teacher_BTV, ids_BT, mask_BT, denominator=None):
    """``(loss, stats)``: opdlab's surrogate on the completions ``ids_BT`` (see the module doc).

    ``logits_*_BTV`` predict ``ids_BT`` (position t's logits are those before token t); the teacher's carry no
    graph. ``denominator``: the sum of the per-token terms is divided by it (TRL's global normaliser); None uses
    ``args.reduction`` on this batch alone, as ``estimators.reinforce_loss`` does. ``stats`` is a float64 tensor of
    ``_STATS`` sums over unmasked tokens (clipped log u, tokens, exact D_f, advantages, log u after the clip, the
    student's entropy in nats), for logging.
    """
    div = get_divergence(args.divergence)
    logp_student_BT, logp_student_BTV = gather_logp(logits_student_BTV.float(), ids_BT)
    logp_teacher_BT, logp_teacher_BTV = gather_logp(logits_teacher_BTV.float().detach(), ids_BT)
    mask_BT = mask_BT.to(logp_student_BT.dtype)
    scores = objective.Scores(logp_teacher_BT, logp_teacher_BTV, logp_student_BT, logp_student_BTV, ids_BT)
    reduction = args.reduction if denominator is None else "sequence"
    loss, adv = objective.loss(args, div, scores, mask_BT, None, reduction)
    if denominator is not None:  # "sequence" divided by B: undo it, divide by the global normaliser
        loss = loss * (ids_BT.shape[0] / denominator)
    with torch.no_grad():
        D = (div.exact(logp_teacher_BTV, logp_student_BTV.detach()) * mask_BT).sum()
        n = mask_BT.sum()
        H = (-(logp_student_BTV.exp() * logp_student_BTV).sum(-1) * mask_BT).sum()
        if adv is None:
            log_u_sum = ((logp_teacher_BT - logp_student_BT.detach()) * mask_BT).sum()
            parts = [0.0, n, D, 0.0, log_u_sum, H]
        else:
            parts = [adv.n_clipped, n, D, adv.A_BT.sum(), adv.log_u_BT.sum(), H]
        stats = torch.stack([torch.as_tensor(p, dtype=torch.float64, device=ids_BT.device) for p in parts])
    return loss, stats


class OPDTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` with opdlab's loss (module doc). Arguments are TRL's, with ``args`` an
    ``OPDConfig``, plus ``teacher_processing_class``: the teacher's tokenizer, checked against the student's (the
    same tokens with the same ids, and the same chat template); default: loaded from ``teacher_model`` when that
    is a path or model id, otherwise not checked (TRL checks only that the vocabulary sizes agree).
    """

    def __init__(self, model, teacher_model=None, args: OPDConfig | None = None, *pos,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = OPDConfig(f"{str(name).split('/')[-1]}-OPD")
        if not isinstance(args, OPDConfig):
            raise UserError(f"OPDTrainer takes an OPDConfig (a DistillationConfig with divergence, method, gamma, "
                            f"baseline, log_u_clip, reduction), got {type(args).__name__}")
        check_settings(args)
        if teacher_processing_class is None and isinstance(teacher_model, str):
            from transformers import AutoTokenizer
            teacher_processing_class = AutoTokenizer.from_pretrained(
                teacher_model, revision=args.teacher_model_revision, trust_remote_code=args.trust_remote_code)
        super().__init__(model, teacher_model, args, *pos, **kwargs)
        if teacher_processing_class is not None and self.teacher_model is not None:
            self._check_teacher_tokenizer(teacher_processing_class)

    def _check_teacher_tokenizer(self, teacher_processing_class) -> None:
        teacher_tok = getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        student = self.accelerator.unwrap_model(self.model)
        try:
            check_compatible(teacher, student, teacher_tok, self._tokenizer)
        except ValueError as err:
            raise UserError(str(err)) from None
        templates = getattr(teacher_tok, "chat_template", None), getattr(self._tokenizer, "chat_template", None)
        if None not in templates and templates[0] != templates[1]:
            raise UserError("teacher and student tokenizers have different chat templates: the teacher would score "
                            "completions written in the student's template, not its own; give both one template "
                            "(e.g. teacher_tokenizer.chat_template = student_tokenizer.chat_template) or "
                            "distil between models that share one")

    def _completion_logits(self, unwrapped, input_ids, attention_mask, T: int, multimodal: dict):
        """The model's logits before each of the last ``T`` tokens, shape (B, T, V), from its own forward."""
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **multimodal)
        if "logits_to_keep" in inspect.signature(base.forward).parameters:
            kwargs["logits_to_keep"] = T + 1
        return unwrapped(**kwargs).logits[:, -(T + 1):-1]

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's loss seam: opdlab's ``opd_loss`` on the completions in ``inputs``; returns
        ``(loss, entropy_sum, n_valid)`` like TRL's, and keeps the step's ``_STATS`` for ``compute_loss``."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask_BT = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool results inside a completion were not sampled: they do not count
            mask_BT = mask_BT * inputs["tool_mask"]
        ids_BT, T = inputs["completion_ids"], inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        logits_student_BTV = self._completion_logits(unwrapped_student, input_ids, attention_mask, T, multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            logits_teacher_BTV = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                           self._completion_logits, unwrapped_teacher, input_ids,
                                                           attention_mask, T, multimodal)
        device = logits_student_BTV.device  # a model split over devices may end its forward elsewhere
        loss, self._opd_stats = opd_loss(self.args, logits_student_BTV, logits_teacher_BTV.to(device),
                                         ids_BT.to(device), mask_BT.to(device),
                                         self._denominator(ids_BT.shape[0], num_items_in_batch))
        return loss, self._opd_stats[_STATS.index("entropy_sum")].float(), mask_BT.sum().to(device)

    def _denominator(self, B: int, num_items_in_batch):
        """TRL's global normaliser in training (``num_items_in_batch``: the global unmasked tokens over the ranks),
        or for ``"sequence"`` this rank's sequences times the accumulation steps; None in evaluation (the batch's
        own reduction)."""
        if num_items_in_batch is None:
            return None
        if self.args.reduction == "sequence":
            # the window's own length during train() (the last one may be shorter); the configured one outside it
            return B * getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's ``compute_loss`` (which calls ``_compute_loss`` inside the wrapper's forward), then the step's
        estimator statistics summed over ranks: clip fraction, exact D_f per token, mean advantage and log u."""
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        s = dict(zip(_STATS, self.accelerator.gather(self._opd_stats[None]).sum(0).tolist()))
        n, metrics = max(s["n_tokens"], 1.0), self._metrics["train" if self.model.training else "eval"]
        metrics["opd/exact_divergence"].append(s["divergence_sum"] / n)
        metrics["opd/log_u_mean"].append(s["log_u_sum"] / n)
        logs = objective.get(self.args.method).logs
        if "clip_fraction" in logs:
            metrics["opd/clip_fraction"].append(s["n_clipped"] / n)
        if "adv_mean" in logs:
            metrics["opd/adv_mean"].append(s["adv_sum"] / n)
        return out
