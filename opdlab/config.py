"""``TrainConfig``: every setting of an OPD training run, shared by the CLI and the notebooks.

A frozen dataclass of flat literals (so papermill parameters and ``--flag value`` map onto it one to one).
Building one validates every field and raises a ValueError that names the field and what it accepts. It
imports no torch: the allowed values come from ``opdlab.choices`` and ``opdlab.lm.recipe``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields

from opdlab.choices import BASELINES, DEFAULT_REDUCTION, LR_SCHEDULES, REDUCTIONS, TRAIN_METHODS, parse_divergence
from opdlab.lm.recipe import ARCHITECTURES, ModelRecipe
from opdlab.tasks.base import is_int

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """One OPD run: task, estimator, optimisation, evaluation, and the teacher and student recipes."""

    task: str = "arithmetic"
    """Task name for ``opdlab.tasks.get_task`` (``"arithmetic"``, ``"tool_use"``, ...)."""
    divergence: str = "reverse_kl"
    """f-divergence, any name ``opdlab.divergences.get`` accepts (``"forward_kl"``, ``"jsd"``, ``"gjsd:0.1"``)."""
    method: str = "opd_plus"
    """``"opd"``: stop-gradient advantage -f(u); ``"opd_plus"``: w_f(u) = -f(u) + u f'(u) (arXiv 2606.01039;
    docs/math.md §3). Reference arms: ``"full_vocabulary"`` (the exact token-local gradient at the visited
    contexts) and ``"supervised_kd"`` (cross-entropy on teacher samples), see ``choices.REFERENCE_METHODS``."""
    gamma: float = 0.0
    """Weight of the future terms sum_{s>t} gamma^(s-t) f(u_s), in [0, 1]; 0 is the paper's token-local form,
    1 the sequence gradient (unbiased only with ``reduction="sequence"``, docs/math.md §4)."""
    baseline: str = "none"
    """``"none"``; ``"expected"``: b(c_t) = sum_a pi_theta(a) A(a) over the vocabulary; ``"loo"``: leave-one-out
    mean over the samples of the same prompt (needs samples_per_prompt >= 2)."""
    log_u_clip: float | None = None
    """Clamp log u to [-c, c] before the advantage (for unbounded weights such as forward KL's w = u); None: off."""
    reduction: str = DEFAULT_REDUCTION
    """Surrogate reduction: ``"token"`` (the default) divides the summed terms by the number of unmasked tokens,
    ``"sequence"`` by the number of sequences. Only ``"sequence"`` keeps the estimate unbiased: for grad J with
    gamma = 1, for the token-local gradient with gamma = 0 (docs/math.md §4)."""
    steps: int = 40
    """Optimizer steps of distillation."""
    prompts_per_step: int = 16
    """Distinct training prompts per step."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt (batch = prompts_per_step * samples_per_prompt)."""
    max_new_tokens: int | None = None
    """Longest completion, environment tokens included; None: the longest of 500 training targets + 8."""
    lr: float = 1e-4
    """AdamW learning rate (constant). Small: Adam moves every weight by about lr per step whatever the
    gradient's noise, and the REINFORCE gradient of these sharp teachers helps only within a short step."""
    lr_schedule: str = "constant"
    """``"constant"`` or ``"cosine"`` (warm-up over 5% of steps, cosine decay to 10% of ``lr``): the step's
    learning rate follows from its index alone, so a resumed run takes the same rates."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this value (the norm before clipping is logged)."""
    eval_every: int = 10
    """Evaluate on the held-out split every this many steps (and at step 0 and at the end)."""
    eval_n: int = 128
    """Held-out examples per evaluation."""
    eval_samples: int = 2
    """k of sampled accuracy avg@k (k samples per held-out example at temperature 1)."""
    checkpoint_every: int = 10
    """Save model, optimizer, RNG state and step every this many steps (and at the end)."""
    seed: int = 0
    """Seed of the training prompts' order and of sampling."""
    device: str = "auto"
    """``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``; bf16 autocast on CUDA."""
    compile_decode: bool = False
    """Sample through a ``torch.compile``d decode step (``opdlab.lm.decoder``): the same tokens to float rounding,
    about 1.37x faster sampling on CPU once compiled (about 10-15 s per process and model size). It decides how a
    run is computed, not what: it is left out of the run's name and of the check on resume (``HOW_ONLY``)."""
    teacher_path: str | None = None
    """A local checkpoint directory to use as the teacher instead of the task-trained one."""
    student_path: str | None = None
    """A local checkpoint directory to start the student from instead of the warm-up model."""
    arch: str = "qwen3"
    """Architecture of the built models: ``"qwen3"`` or ``"llama"``."""
    teacher_hidden: int = 128
    """Teacher width (hidden size); heads = hidden / 32, MLP width = 3 * hidden."""
    teacher_layers: int = 4
    """Teacher depth."""
    teacher_sft_steps: int = 1200
    """Supervised steps that train the teacher (cached on disk by a hash of its recipe)."""
    student_hidden: int = 96
    """Student width."""
    student_layers: int = 4
    """Student depth."""
    student_warmup_steps: int = 600
    """Supervised warm-up steps of the student: short, so it starts clearly weaker than the teacher (with
    ``student_warmup_target``, the most it may take)."""
    student_warmup_target: float | None = None
    """None, or end the warm-up at the first check (every 25 steps) where the student's greedy accuracy on 128
    training-split prompts reaches this value: where a short warm-up ends on a steep learning curve varies with
    the machine, a target fixes where the student starts (``lm.recipe.ModelRecipe.sft_target``)."""
    sft_batch: int = 64
    """Sequences per supervised step (teacher and warm-up)."""
    sft_lr: float = 5e-3
    """Peak learning rate of supervised training (teacher and warm-up)."""
    cache: str | None = None
    """Cache directory of trained teachers and warm-up students; None: $OPDLAB_CACHE or ~/.cache/opdlab."""

    def __post_init__(self):
        _validate(self)

    def recipe(self, role: str) -> ModelRecipe:
        """The ``ModelRecipe`` of ``"teacher"`` or ``"student"``."""
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        hidden = self.teacher_hidden if role == "teacher" else self.student_hidden
        return ModelRecipe(
            arch=self.arch, hidden=hidden, layers=self.teacher_layers if role == "teacher" else self.student_layers,
            heads=max(1, hidden // 32), intermediate=3 * hidden, sft_batch=self.sft_batch, sft_lr=self.sft_lr,
            sft_steps=self.teacher_sft_steps if role == "teacher" else self.student_warmup_steps,
            seed=0 if role == "teacher" else 1, sft_target=None if role == "teacher" else self.student_warmup_target)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, without: tuple[str, ...] = ()) -> str:
        """The fields as sorted, indented JSON, leaving out the fields named in ``without``."""
        return json.dumps({k: v for k, v in self.to_dict().items() if k not in without}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` (validated)."""
        return self.from_dict({**self.to_dict(), **changes})


HOW_ONLY = ("compile_decode",)
"""Fields that choose how a run is computed, not what it computes: ``train.run_name`` leaves them out of the
name, and a run directory may be resumed with either value."""


def _check(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"TrainConfig.{name} = {value!r} is invalid: expected {allowed}")


def _number(value) -> bool:
    """A finite int or float (not a bool): inf and NaN pass a ``> 0`` test but break the run later."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(c: TrainConfig) -> None:
    try:
        parse_divergence(c.divergence)
    except (ValueError, TypeError) as err:
        raise ValueError(f"TrainConfig.divergence = {c.divergence!r} is invalid: {err}") from None
    _check(isinstance(c.task, str) and c.task != "", "task", c.task, "a task name such as 'arithmetic'")
    _check(c.method in TRAIN_METHODS, "method", c.method, f"one of {TRAIN_METHODS}")
    _check(c.baseline in BASELINES, "baseline", c.baseline, f"one of {BASELINES}")
    _check(c.lr_schedule in LR_SCHEDULES, "lr_schedule", c.lr_schedule, f"one of {LR_SCHEDULES}")
    _check(c.reduction in REDUCTIONS, "reduction", c.reduction, f"one of {REDUCTIONS}")
    _check(c.arch in ARCHITECTURES, "arch", c.arch, f"one of {ARCHITECTURES}")
    _check(_number(c.gamma) and 0 <= c.gamma <= 1, "gamma", c.gamma, "a number in [0, 1]")
    _check(c.student_warmup_target is None or (_number(c.student_warmup_target) and 0 < c.student_warmup_target <= 1),
           "student_warmup_target", c.student_warmup_target, "None or an accuracy in (0, 1]")
    _check(c.log_u_clip is None or (_number(c.log_u_clip) and c.log_u_clip > 0),
           "log_u_clip", c.log_u_clip, "None or a positive finite number")
    for name in ("steps", "teacher_sft_steps", "student_warmup_steps"):
        _check(is_int(getattr(c, name)) and getattr(c, name) >= 0, name, getattr(c, name), "an int >= 0")
    _check(c.max_new_tokens is None or (is_int(c.max_new_tokens) and c.max_new_tokens >= 1), "max_new_tokens",
           c.max_new_tokens, "None (automatic) or an int >= 1")
    for name in ("prompts_per_step", "samples_per_prompt", "eval_every", "eval_n",
                 "eval_samples", "checkpoint_every", "teacher_hidden", "teacher_layers", "student_hidden",
                 "student_layers", "sft_batch"):
        _check(is_int(getattr(c, name)) and getattr(c, name) >= 1, name, getattr(c, name), "an int >= 1")
    for name in ("teacher_hidden", "student_hidden"):
        _check(getattr(c, name) % 32 == 0 or getattr(c, name) < 32, name, getattr(c, name),
               "a multiple of 32 (heads of width 32), or less than 32 for a single head")
    for name in ("lr", "grad_clip", "sft_lr"):
        _check(_number(getattr(c, name)) and getattr(c, name) > 0, name, getattr(c, name),
               "a positive finite number")
    _check(_number(c.weight_decay) and c.weight_decay >= 0, "weight_decay", c.weight_decay,
           "a finite number >= 0")
    _check(c.baseline != "loo" or c.samples_per_prompt >= 2, "baseline", c.baseline,
           "'none' or 'expected' when samples_per_prompt is 1 (a leave-one-out baseline needs >= 2 samples)")
    _check(is_int(c.seed) and c.seed >= 0, "seed", c.seed, "an int >= 0")
    _check(isinstance(c.compile_decode, bool), "compile_decode", c.compile_decode, "True or False")
    _check(isinstance(c.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device) is not None,
           "device", c.device, "'auto', 'cpu', 'cuda' or 'cuda:N' with N a device number")
    for name in ("teacher_path", "student_path", "cache"):
        value = getattr(c, name)
        _check(value is None or (isinstance(value, str) and value.strip() != ""), name, value,
               "None or the path of a directory, as a non-empty string")
