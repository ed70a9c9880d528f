"""Named presets: the defaults of a run, held once. Notebooks and the CLI start from one and override fields:

    from opdlab.config import presets
    spec = presets.get("notebook04").spec_for("tool_use").replace(lr=1e-3)

    opdlab train runs/x -p preset smoke -p divergence jsd
    opdlab notebooks 04 -p preset study

A ``Preset`` is a ``RunSpec`` (``spec``), the per-task changes a task needs on top of it (``per_task``, flat
field names), and the seeds a sweep of it runs. ``spec_for(task)`` applies both; it is the one place where a
task's own batch or learning rate is written down.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from opdlab.config.spec import RunSpec
from opdlab.errors import UserError

__all__ = ["Preset", "PRESETS", "get", "names", "resolve"]


@dataclass(frozen=True)
class Preset:
    """A named starting point: ``spec``, ``per_task`` changes, the ``seeds`` of a sweep, and what it is for."""

    spec: RunSpec
    per_task: dict = field(default_factory=dict)
    seeds: tuple = (0, 1, 2)
    about: str = ""

    def spec_for(self, task: str | None = None) -> RunSpec:
        """The spec for ``task`` (default: the preset's own task), with that task's changes applied."""
        task = task or self.spec.task.task
        return self.spec.replace(task=task, **self.per_task.get(task, {}))


_MODELS_04 = dict(teacher_hidden=128, teacher_layers=4, teacher_sft_steps=1200, student_hidden=96, student_layers=4,
                  student_warmup_steps=1500, student_warmup_target=0.6, sft_lr=5e-3)
"""Notebook 04's arithmetic teacher and warm-up student; notebooks 08 and 09 study the same models."""

_NOTEBOOK04 = RunSpec.from_dict(dict(
    steps=50, prompts_per_step=32, samples_per_prompt=4, lr=1e-3, lr_schedule="cosine", baseline="expected",
    log_u_clip=2.0, eval_every=25, eval_n=256, eval_samples=1, final_eval_n=2048, final_eval_sampled=False,
    **_MODELS_04))
"""Notebook 04's run: 50 steps of 32 prompts x 4 samples, evaluated on 256 held-out items along the way and on
2,048 at the end (the paired tests' items: items are far cheaper than seeds), greedy only beyond the first 256
(the sampled accuracy and the divergences stay on the items every evaluation sees). The learning rate here is the
fallback; notebook 04 gives each arm the rate its protocol chose (``opdlab.experiments.protocol``,
``figures/data/04_lr_protocol.csv``)."""

_TOOL_USE_04 = dict(teacher_sft_steps=700, student_warmup_steps=400, student_warmup_target=0.55, lr=3e-4)
"""Tool use's teacher and warm-up train for fewer steps (its task saturates sooner) and distil at 3e-4
(docs/LOG.md)."""

_NOTEBOOK06 = RunSpec.from_dict(dict(
    task="arithmetic", divergence="jsd", steps=4, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=48,
    lr=5e-5, baseline="expected", eval_every=4, eval_n=16, eval_samples=1))
"""Notebook 06 on CPU: SmolLM2-135M-Instruct's arithmetic answers through its chat template are short,
so a 48-token budget leaves its completions whole; 4 steps of 2 prompts x 2 samples and 16 held-out items per
evaluation. The notebook sets the teacher and student paths."""

PRESETS = {
"smoke": Preset(
        RunSpec.from_dict(dict(steps=2, prompts_per_step=4, samples_per_prompt=2, eval_every=2, eval_n=8,
                               eval_samples=1, teacher_hidden=32, teacher_layers=1, teacher_sft_steps=20,
                               student_hidden=32, student_layers=1, student_warmup_steps=10, max_new_tokens=24)),
        seeds=(0,), about="seconds on CPU: tiny models and two steps, for checking that a change runs end to end"),
    "notebook04": Preset(_NOTEBOOK04, per_task={"tool_use": _TOOL_USE_04}, seeds=(0, 1, 2, 3, 4),
                         about="notebook 04's benchmark: distil a warm-up student toward its teacher, 5 seeds"),
    "study": Preset(_NOTEBOOK04, per_task={"tool_use": _TOOL_USE_04}, seeds=tuple(range(16)),
                    about="notebook 04 at 16 seeds, for differences of a few points"),
    "notebook09": Preset(_NOTEBOOK04.replace(divergence="forward_kl"), seeds=(0, 1, 2),
                         about="notebook 09: OPD+ forward KL's variance controls on notebook 04's models and runs"),
    "gpu": Preset(_NOTEBOOK04.replace(prompts_per_step=128, steps=100, final_eval_n=4096),
                  per_task={"tool_use": {**_TOOL_USE_04, "prompts_per_step": 64}},
                  seeds=tuple(range(5)), about="notebook 04 at GPU batch sizes (4x the prompts per step, 100 steps)"),
    "notebook06": Preset(_NOTEBOOK06, seeds=(0, 1, 2),
                         about="notebook 06 on CPU: SmolLM2-135M into its layer-dropped student, 3 seeds, minutes"),
    "notebook06_gpu": Preset(_NOTEBOOK06.replace(steps=100, prompts_per_step=32, samples_per_prompt=4,
                                                 max_new_tokens=96, eval_every=25, eval_n=512),
                             seeds=tuple(range(5)), about="notebook 06 at GPU size: 100 steps of 32 x 4, 5 seeds"),
}
"""Every preset by name."""


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> Preset:
    """The preset called ``name``; a ``UserError`` lists the names otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def resolve(flat: dict, recorded: dict | None = None, recorded_runtime: dict | None = None):
    """``(RunSpec, Runtime)`` from flat settings, as ``opdlab train -p`` and notebooks give them: ``preset``
    (default none: the ``RunSpec`` defaults) names the starting point, runtime fields (``Runtime.field_names``)
    go to the runtime, every other name is a spec field (an unknown one is refused with the known names).
    ``recorded`` is a run directory's config.json: it is the spec's starting point instead of a preset (resume);
    the runtime that directory last ran with (``recorded_runtime``, from run.json, or the runtime keys older
    directories kept in config.json) seeds the runtime, so a resume runs as the run ran unless told otherwise."""
    from opdlab.config.runtime import Runtime

    flat = dict(flat)
    name = flat.pop("preset", None)
    runtime_keys = set(Runtime.field_names())
    run = {k: flat.pop(k) for k in list(flat) if k in runtime_keys}
    if recorded is not None:
        legacy = {k: v for k, v in {**recorded, **(recorded_runtime or {})}.items()
                  if k in runtime_keys and k != "progress"}  # progress bars are this invocation's own
        spec = RunSpec.from_dict({k: v for k, v in recorded.items() if k not in runtime_keys})
        if name is not None:
            raise UserError(f"preset {name!r} starts a new run, and this directory already holds one: resume it "
                            "without -p preset (its config.json is its spec), or use a new run directory")
        return spec.replace(**flat), Runtime(**{**legacy, **run})
    base = get(name).spec_for(flat.get("task")) if name is not None else RunSpec()
    return base.replace(**flat), Runtime(**run)
