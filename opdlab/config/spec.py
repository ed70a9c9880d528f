"""``RunSpec``: what an OPD run computes, in five named frozen parts, hashed into the run's name.

    RunSpec
      task       TaskSpec    task, max_new_tokens
      objective  Objective   divergence, method, gamma, baseline, log_u_clip, reduction, teacher_topk
      optim      Optim       steps, prompts_per_step, samples_per_prompt, lr, lr_schedule, weight_decay,
                             grad_clip, seed
      models     ModelsSpec  arch, teacher/student sizes and supervised schedules, teacher_path, student_path
      eval       EvalSpec    eval_every, eval_n, eval_samples, final_eval_n

Where and how a run is computed (cache directory, device, threads, compiled decoding, sampler, checkpoints,
progress) is ``opdlab.config.runtime.Runtime``, never part of the spec nor of the run's name.

Every field name is unique across the parts, so a spec also reads and writes as one flat dict: papermill
parameters, ``opdlab train -p FIELD VALUE`` and the run directory's ``config.json`` use the flat names
(``RunSpec.from_dict``, ``to_dict``, ``replace``). Each part validates its own fields when built and raises a
``UserError`` naming the field and what it accepts. Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields

from opdlab.config.checks import is_int
from opdlab.config.choices import (BASELINES, DEFAULT_REDUCTION, EVAL_SPLITS, LR_SCHEDULES, REDUCTIONS,
                                   SPARSE_BASELINES, TRAIN_METHODS, VALIDATION_SEED, check_trainable)
from opdlab.config.recipe import ARCHITECTURES, ModelRecipe
from opdlab.errors import UserError

__all__ = ["RunSpec", "TaskSpec", "Objective", "Optim", "ModelsSpec", "EvalSpec", "PARTS", "LEGACY_RUNTIME_FIELDS",
           "run_name"]


def _check(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise UserError(f"{name} = {value!r} is invalid: expected {allowed}")


def _number(value) -> bool:
    """A finite int or float (not a bool): inf and NaN pass a ``> 0`` test but break the run later."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ints(part, names, minimum: int) -> None:
    for name in names:
        value = getattr(part, name)
        _check(is_int(value) and value >= minimum, name, value, f"an int >= {minimum}")


def _positive(part, names) -> None:
    for name in names:
        value = getattr(part, name)
        _check(_number(value) and value > 0, name, value, "a positive finite number")


def _path(part, names) -> None:
    for name in names:
        value = getattr(part, name)
        _check(value is None or (isinstance(value, str) and value.strip() != ""), name, value,
               "None or the path of a directory, as a non-empty string")


@dataclass(frozen=True)
class TaskSpec:
    """The task and the completion budget."""

    task: str = "arithmetic"
    """Task name for ``opdlab.tasks.get_task`` (``"arithmetic"``, ``"tool_use"``, ``"gsm_symbolic"``, ...)."""
    max_new_tokens: int | None = None
    """Longest completion, environment tokens included; None: the longest of 500 training targets + 8."""

    def __post_init__(self):
        _check(isinstance(self.task, str) and self.task != "", "task", self.task, "a task name such as 'arithmetic'")
        _check(self.max_new_tokens is None or (is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
               "max_new_tokens", self.max_new_tokens, "None (automatic) or an int >= 1")


@dataclass(frozen=True)
class Objective:
    """The estimator: which f-divergence, which advantage, and its variance controls (docs/math.md §3-§6)."""

    divergence: str = "reverse_kl"
    """f-divergence, any name ``opdlab.core.divergences.get`` accepts (``"forward_kl"``, ``"jsd"``, ``"gjsd:0.1"``)."""
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
    """``"token"`` divides the summed terms by the number of unmasked tokens, ``"sequence"`` by the number of
    sequences; only ``"sequence"`` keeps the estimate unbiased (docs/math.md §4)."""
    teacher_topk: int | None = None
    """None: the teacher's whole distribution is at hand. k >= 0: the teacher sends only its
    top-k log-probabilities at each position and that of the sampled token, as a served teacher does, and OPD+ is
    estimated from that alone, exactly on the support and from the sample on the tail (``opdlab.core.sparse``,
    docs/math.md §8); k = 0 is one-sample OPD+. Baselines then: ``"none"``, ``"tail"`` or ``"loo"``."""

    def __post_init__(self):
        try:
            check_trainable(self.divergence)  # parses it, and refuses an objective that trains nothing
        except (ValueError, TypeError) as err:
            raise UserError(f"divergence = {self.divergence!r} is invalid: {err}") from None
        _check(self.method in TRAIN_METHODS, "method", self.method, f"one of {TRAIN_METHODS}")
        _check(self.teacher_topk is None or (is_int(self.teacher_topk) and self.teacher_topk >= 0), "teacher_topk",
               self.teacher_topk, "None (the whole teacher distribution) or an int >= 0")
        _check(self.reduction in REDUCTIONS, "reduction", self.reduction, f"one of {REDUCTIONS}")
        _check(_number(self.gamma) and 0 <= self.gamma <= 1, "gamma", self.gamma, "a number in [0, 1]")
        _check(self.log_u_clip is None or (_number(self.log_u_clip) and self.log_u_clip > 0),
               "log_u_clip", self.log_u_clip, "None or a positive finite number")
        if self.teacher_topk is None:
            _check(self.baseline in BASELINES, "baseline", self.baseline, f"one of {BASELINES}")
            return
        _check(self.method == "opd_plus", "method", self.method,
               "'opd_plus' with teacher_topk: the top-k estimator is OPD+'s (opdlab.core.sparse)")
        _check(self.baseline in SPARSE_BASELINES, "baseline", self.baseline,
               f"one of {SPARSE_BASELINES} with teacher_topk: 'expected' needs the teacher's whole distribution")


@dataclass(frozen=True)
class Optim:
    """The optimisation: steps, batch, AdamW, and the seed of the prompts' order and of sampling."""

    steps: int = 40
    """Optimizer steps of distillation."""
    prompts_per_step: int = 16
    """Distinct training prompts per step."""
    samples_per_prompt: int = 4
    """Completions sampled per prompt (batch = prompts_per_step * samples_per_prompt)."""
    lr: float = 1e-4
    """AdamW learning rate (peak, with ``lr_schedule="cosine"``)."""
    lr_schedule: str = "constant"
    """``"constant"`` or ``"cosine"`` (warm-up over 5% of steps, cosine decay to 10% of ``lr``): the step's
    learning rate follows from its index alone, so a resumed run takes the same rates."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this value (the norm before clipping is logged)."""
    seed: int = 0
    """Seed of the training prompts' order and of sampling."""

    def __post_init__(self):
        _ints(self, ("steps", "seed"), 0)
        _check(self.seed != VALIDATION_SEED, "seed", self.seed,
               f"any seed but {VALIDATION_SEED}, the stream of the validation items (eval_split='validation')")
        _ints(self, ("prompts_per_step", "samples_per_prompt"), 1)
        _positive(self, ("lr", "grad_clip"))
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        _check(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
               "a finite number >= 0")


@dataclass(frozen=True)
class ModelsSpec:
    """The teacher and the student: built from recipes and trained once per recipe (``lm.cache``), or local
    checkpoint directories."""

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
    """Supervised warm-up steps of the student (with ``student_warmup_target``, the most it may take)."""
    student_warmup_target: float | None = None
    """None, or end the warm-up at the first check (every 25 steps) where the student's greedy accuracy on 128
    training-split prompts reaches this value (``opdlab.config.recipe.ModelRecipe.sft_target``)."""
    sft_batch: int = 64
    """Sequences per supervised step (teacher and warm-up)."""
    sft_lr: float = 5e-3
    """Peak learning rate of supervised training (teacher and warm-up)."""
    teacher_path: str | None = None
    """A local checkpoint directory to use as the teacher instead of the task-trained one."""
    student_path: str | None = None
    """A local checkpoint directory to start the student from instead of the warm-up model."""

    def __post_init__(self):
        _check(self.arch in ARCHITECTURES, "arch", self.arch, f"one of {ARCHITECTURES}")
        _ints(self, ("teacher_sft_steps", "student_warmup_steps"), 0)
        _ints(self, ("teacher_hidden", "teacher_layers", "student_hidden", "student_layers", "sft_batch"), 1)
        for name in ("teacher_hidden", "student_hidden"):
            _check(getattr(self, name) % 32 == 0 or (getattr(self, name) < 32 and getattr(self, name) % 2 == 0), name,
                   getattr(self, name), "a multiple of 32 (heads of width 32), or an even number below 32 for a single "
                   "head (rotary position embeddings turn pairs of dimensions)")
        _positive(self, ("sft_lr",))
        _check(self.student_warmup_target is None
               or (_number(self.student_warmup_target) and 0 < self.student_warmup_target <= 1),
               "student_warmup_target", self.student_warmup_target, "None or an accuracy in (0, 1]")
        _path(self, ("teacher_path", "student_path"))

    def recipe(self, role: str) -> ModelRecipe:
        """The ``ModelRecipe`` of ``"teacher"`` or ``"student"``."""
        if role not in ("teacher", "student"):
            raise UserError(f"role must be 'teacher' or 'student', got {role!r}")
        teacher = role == "teacher"
        hidden = self.teacher_hidden if teacher else self.student_hidden
        return ModelRecipe(
            arch=self.arch, hidden=hidden, layers=self.teacher_layers if teacher else self.student_layers,
            heads=max(1, hidden // 32), intermediate=3 * hidden, sft_batch=self.sft_batch, sft_lr=self.sft_lr,
            sft_steps=self.teacher_sft_steps if teacher else self.student_warmup_steps,
            seed=0 if teacher else 1, sft_target=None if teacher else self.student_warmup_target)


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation: when, on how many examples, with how many samples each."""

    eval_every: int = 10
    """Evaluate on the held-out split every this many steps (and at step 0 and at the end)."""
    eval_n: int = 128
    """Held-out examples per evaluation (the same examples, in the same order, for every run of a task)."""
    eval_samples: int = 2
    """k of sampled accuracy avg@k (k samples per held-out example at temperature 1)."""
    final_eval_n: int | None = None
    """None, or the held-out examples of the last evaluation (the first ``eval_n`` of them are the ones every
    evaluation sees): the final comparison between arms is where items buy the most power per CPU-second."""
    eval_split: str = "test"
    """Where the evaluation items come from: ``"test"`` (the held-out split, for results) or ``"validation"``
    (training-split problems from a stream of their own, disjoint from every test item: for choosing
    hyperparameters, ``opdlab.experiments.protocol``)."""
    final_eval_sampled: bool = True
    """Where ``final_eval_n`` exceeds ``eval_n``: True samples and scores the divergences on all the last
    evaluation's items; False does so on its first ``eval_n`` only (every evaluation's items, so the curves compare
    like with like) and scores the rest greedy only, their sampled and divergence columns empty (NaN). Paired
    comparisons of greedy accuracy are the same either way; False skips most of the last evaluation's work."""

    def __post_init__(self):
        _ints(self, ("eval_every", "eval_n", "eval_samples"), 1)
        _check(isinstance(self.final_eval_sampled, bool), "final_eval_sampled", self.final_eval_sampled,
               "True or False")
        _check(self.eval_split in EVAL_SPLITS, "eval_split", self.eval_split, f"one of {EVAL_SPLITS}")
        _check(self.final_eval_n is None or (is_int(self.final_eval_n) and self.final_eval_n >= 1), "final_eval_n",
               self.final_eval_n, "None or an int >= 1")


ADDED_LATER = {"eval_split": "test", "final_eval_sampled": True}
"""Fields added after run directories were written, and the value those runs computed with (``RunSpec.digest``)."""

PARTS = {"task": TaskSpec, "objective": Objective, "optim": Optim, "models": ModelsSpec, "eval": EvalSpec}
"""The parts of a ``RunSpec`` by attribute name, in order."""

_FIELD_PART = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}
"""Flat field name -> the part that holds it (names are unique across parts)."""
assert len(_FIELD_PART) == sum(len(fields(cls)) for cls in PARTS.values()), "field names must be unique across parts"

LEGACY_RUNTIME_FIELDS = ("cache", "device", "compile_decode", "checkpoint_every")
"""Keys that run directories written before the spec/runtime split carry in their ``config.json``: they say how
that run was computed, not what, so reading such a directory ignores them (``opdlab.rundir.writer``)."""


@dataclass(frozen=True)
class RunSpec:
    """What one OPD run computes (see the module doc). Build it from parts, from a preset
    (``opdlab.config.presets.get``), or flat: ``RunSpec.from_dict({"divergence": "jsd", "lr": 3e-4})``."""

    task: TaskSpec = TaskSpec()
    objective: Objective = Objective()
    optim: Optim = Optim()
    models: ModelsSpec = ModelsSpec()
    eval: EvalSpec = EvalSpec()

    def __post_init__(self):
        for name, cls in PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"RunSpec.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        o = self.objective
        _check(o.baseline != "loo" or self.optim.samples_per_prompt >= 2, "baseline", o.baseline,
               "'none' or 'expected' when samples_per_prompt is 1 (a leave-one-out baseline needs >= 2 samples)")

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """Every flat field name, part by part."""
        return tuple(_FIELD_PART)

    @staticmethod
    def defaults() -> dict:
        """The default of every flat field."""
        return RunSpec().to_dict()

    def to_dict(self) -> dict:
        """The flat dict of every field (what ``config.json`` holds)."""
        return {k: v for name in PARTS for k, v in dataclasses.asdict(getattr(self, name)).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, flat: dict, base: "RunSpec | None" = None) -> "RunSpec":
        """A spec from flat fields over ``base`` (default: the defaults); an unknown name is refused by name,
        with the closest known names."""
        unknown = sorted(set(flat) - set(_FIELD_PART))
        if unknown:
            import difflib
            hints = {u: difflib.get_close_matches(u, _FIELD_PART, n=2) for u in unknown}
            said = "; ".join(f"{u!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for u, h in hints.items())
            raise UserError(f"unknown run field(s) {said}; known: {', '.join(_FIELD_PART)}")
        base = base if base is not None else cls()
        by_part = {name: {} for name in PARTS}
        for key, value in flat.items():
            by_part[_FIELD_PART[key]][key] = value
        return cls(**{name: dataclasses.replace(getattr(base, name), **changes) if changes else getattr(base, name)
                      for name, changes in by_part.items()})

    def replace(self, **flat) -> "RunSpec":
        """A copy with flat field changes (validated)."""
        return self.from_dict(flat, base=self)

    def digest(self) -> str:
        """sha256 of the flat fields as sorted JSON: the identity of what the run computes. A field added after
        run directories existed (``ADDED_LATER``) is left out while it holds the value those runs computed with,
        so their names stay valid."""
        flat = {k: v for k, v in self.to_dict().items() if k not in ADDED_LATER or v != ADDED_LATER[k]}
        return hashlib.sha256(json.dumps(flat, indent=2, sort_keys=True).encode()).hexdigest()


def run_name(spec: RunSpec) -> str:
    """``<task>-<divergence>-<method>-s<seed>-<first 8 hex of spec.digest()>``: a new directory for new settings.
    Only the spec is hashed, so the cache directory, the device or any other ``Runtime`` field leave the name
    as it is."""
    o = spec.objective
    return f"{spec.task.task}-{o.divergence.replace(':', '_')}-{o.method}-s{spec.optim.seed}-{spec.digest()[:8]}"
