"""A declared protocol for the learning rate, the same for every arm, scored on validation items only.

For each task and arm, one run per learning rate of ``grid`` at ``PROTOCOL_SEED`` (a seed no result uses),
evaluated at its end on validation items (``eval_split="validation"``: training-split problems from a stream of
their own, disjoint from every test item; where the problem space is small some coincide with training
prompts). The chosen rate maximises the validation accuracy; a tie goes to the smaller rate. A choice at either
end of the grid is flagged (``at_edge``): the best rate may lie beyond it. The choice reads no test item (the
sweep also scores the teacher and warm-up on test items for its reference lines; the protocol ignores them), so
it cannot follow the results it is used for. Choices are grouped by the arm's design, so two arms that share a
label but differ in any trained field are chosen for apart.

    table = choose_lr(base, ["arithmetic"], arms, [3e-4, 1e-3, 3e-3], "runs/04-protocol")
    arms_with_lr, missing = apply(spec_for_task, arms, table)

``table`` has one row per (task, arm, lr): the arm's ``design`` (its spec less rate, seed and evaluation),
``validation_accuracy``, ``items`` and ``chosen``; notebook 04 commits it (``figures/data/04_lr_protocol.csv``)
and applies it to the arms whose design it holds.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec
from opdlab.errors import UserError
from opdlab.experiments.comparisons import arm_label
from opdlab.rundir.reader import stored_config

__all__ = ["PROTOCOL_SEED", "choose_lr", "design", "apply"]

PROTOCOL_SEED = 1000
"""The training seed of the protocol's runs: none of a preset's seeds (``presets`` has at most 16)."""


def choose_lr(base: RunSpec, tasks, arms, grid, runs_dir, runtime: Runtime | None = None,
              task_overrides: dict | None = None, workers="auto") -> pd.DataFrame:
    """Train every (task, arm, lr in ``grid``) once at ``PROTOCOL_SEED``, score each on the validation items of its
    last evaluation, and mark the best rate per (task, arm). ``arms``: the sweep's arm dicts (an arm that sets
    ``lr`` itself is refused: the protocol sets it). Returns rows ``task, arm, design, lr, validation_accuracy,
    items, chosen, at_edge``."""
    from opdlab.experiments.sweep import sweep

    if not isinstance(grid, (list, tuple)) or not grid or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in grid):
        raise UserError(f"lr grid must be a non-empty list of positive learning rates, got {grid!r}")
    if any(isinstance(a, dict) and "lr" in a for a in arms):
        raise UserError("an arm that sets its own lr cannot be part of the learning-rate protocol; drop its 'lr' "
                        "(the protocol chooses it)")
    variants = [{"lr": float(lr), "eval_split": "validation"} for lr in sorted(set(grid))]
    evals, _ = sweep(base, list(tasks), [], [], [PROTOCOL_SEED], runs_dir, runtime, task_overrides=task_overrides,
                     workers=workers, extra_arms=arms, variants=variants)
    last = evals[evals["step"] == evals.groupby("run")["step"].transform("max")]
    specs = [RunSpec.from_dict(stored_config(Path(runs_dir) / run)) for run in last["run"]]
    table = pd.DataFrame(dict(
        task=last["task"].to_numpy(),
        arm=[arm_label(m, d, k) for m, d, k in zip(last["method"], last["divergence"], last["teacher_topk"])],
        design=[design(spec) for spec in specs], lr=[spec.optim.lr for spec in specs],
        validation_accuracy=last["greedy_accuracy"].to_numpy(), items=last["eval_items"].to_numpy()))
    table = table.sort_values(["task", "arm", "design", "lr"], kind="stable").reset_index(drop=True)
    best = table.groupby(["task", "design"])["validation_accuracy"].transform("max")
    first = table[table["validation_accuracy"] == best].groupby(["task", "design"]).head(1).index  # the smaller lr
    table["chosen"] = table.index.isin(first)
    table["at_edge"] = table["chosen"] & table["lr"].isin([min(grid), max(grid)])  # the best may lie beyond
    return table


def design(spec: RunSpec) -> str:
    """What a learning-rate choice applies to: the spec with its rate, seed and evaluation set aside (12 hex
    digits of its digest; evaluation draws from generators of its own, so it does not change what a run learns).
    A choice made for other models, steps, batch or estimator does not carry over."""
    return RunSpec(task=spec.task, objective=spec.objective, optim=spec.optim, models=spec.models) \
        .replace(lr=1.0, seed=0).digest()[:12]


def apply(base: RunSpec, arms, table: pd.DataFrame | None) -> tuple[list[dict], list[str]]:
    """``arms`` with each one's ``lr`` set to the rate ``table`` chose for its design on ``base`` (a task's spec,
    overrides applied); and the labels of the arms it holds no choice for (none, or one made for another design:
    they keep ``base``'s rate)."""
    from opdlab.experiments.sweep import arm_fields

    chosen = {} if table is None else table[table["chosen"]].set_index("design")["lr"].to_dict()
    out, missing = [], []
    for arm in map(arm_fields, arms):
        key = design(base.replace(**arm))
        if key in chosen:
            out.append({**arm, "lr": float(chosen[key])})
        else:
            out.append(arm)
            missing.append(arm_label(arm["method"], arm["divergence"], arm.get("teacher_topk")))
    return out, missing
