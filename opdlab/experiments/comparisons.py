"""Notebook 04's questions, asked of per-item records (``opdlab.experiments.stats`` does the statistics).

* ``arm_label``: one name per arm, the same in tables, figures and prose.
* ``final_items``: every run's records at its last evaluation, with the warm-up student and the teacher (one
  model each, evaluated once on the same items) repeated for every seed, so that an arm and the warm-up pair
  item by item and seed by seed.
* ``pack_items``/``unpack_items``: the same records as one row per run, ``correct`` a string of 0/1 in item
  order: compact enough to commit, and everything a paired test needs.
* ``questions``/``ask``: the family of comparisons, (a)-(f), with Holm over the whole family, chosen on each
  arm's key ``Arm(method, divergence, teacher_topk)`` (never on its label's text), and ``gaps``: the fraction of
  the warm-up -> teacher gap each arm closes, with a bootstrap interval.
* ``claims``/``check_claims``: what the notebook asserts, each claim an interval that excludes zero after Holm;
  a failed claim raises with the numbers, so a counterfactual (arms with no real difference) fails it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from opdlab.config.choices import REPRESENTATIVE_DIVERGENCES
from opdlab.core import objective
from opdlab.errors import UserError
from opdlab.experiments import stats

__all__ = ["WARM_UP", "TEACHER", "Arm", "arm_label", "arm_keys", "LOOKUP_TOPK", "final_items", "pack_items",
           "read_packed", "unpack_items", "questions", "ask", "gaps", "claims", "check_claims", "findings", "power",
           "step_costs", "variance_claims", "kl_claims"]

WARM_UP, TEACHER = "warm-up student", "teacher"
"""The two reference models' arm names."""

_FAMILIES = {
    "a": "beats the warm-up student",
    "b": "stop-gradient falls below the warm-up student",
    "c": "OPD+ forward KL and JSD against reverse KL",
    "d": "OPD+ against supervised KD on teacher samples (same steps and batch)",
    "e": "sampled OPD+ against the full-vocabulary loss",
    "f": "OPD+ from the teacher's top-k against the sampled and full-vocabulary arms",
}
"""What each letter of the family asks."""


class Arm(NamedTuple):
    """What an arm is, as ``questions`` chooses arms: its method, divergence and top-k teacher (None: the whole
    teacher distribution)."""

    method: str
    divergence: str
    teacher_topk: int | None = None

    @property
    def label(self) -> str:
        """``arm_label`` of this arm."""
        return arm_label(*self)


def _topk_or_none(teacher_topk) -> int | None:
    """``teacher_topk`` as a record holds it (None, NaN from a CSV, a float or an int) as None or an int."""
    if teacher_topk is None or (isinstance(teacher_topk, float) and np.isnan(teacher_topk)):
        return None
    return int(teacher_topk)


def arm_label(method: str, divergence: str, teacher_topk=None) -> str:
    """``OPD+ forward KL``, ``stop-gradient Jensen-Shannon`` (the registry's label of each divergence), ``full
    vocabulary, reverse KL``, ``supervised KD``; ``OPD+ forward KL, top-1 teacher`` for a run that sees only the
    teacher's top-k (``core.objective.arm_label``; NaN ``teacher_topk``, as a CSV holds None, is None)."""
    return objective.arm_label(method, divergence, _topk_or_none(teacher_topk))


def _arm(method, divergence, teacher_topk) -> Arm:
    return Arm(method, divergence, _topk_or_none(teacher_topk))


LOOKUP_TOPK = 64
"""The largest ``teacher_topk`` that ``arm_keys`` finds from a label alone."""


def _keys_by_label() -> dict[str, Arm]:
    keys = {}
    for name, method in objective.TABLE.items():
        topks = (None, *range(LOOKUP_TOPK + 1)) if method.topk_loss is not None else (None,)
        for divergence in REPRESENTATIVE_DIVERGENCES:
            for k in topks:
                keys.setdefault(arm_label(name, divergence, k), Arm(name, divergence, k))
    return keys


def arm_keys(labels, arms: pd.DataFrame | None = None) -> dict[str, Arm]:
    """Each arm label's ``Arm``, the references (``WARM_UP``, ``TEACHER``) left out: from ``arms``, a frame with
    columns ``arm, method, divergence, teacher_topk`` (notebook 04's ``04_curves.csv``, a sweep's evaluations),
    or where it is None the label that ``arm_label`` gives an arm of a method of ``core.objective.TABLE`` on one
    of ``REPRESENTATIVE_DIVERGENCES`` with ``teacher_topk`` None or at most ``LOOKUP_TOPK``. A UserError names
    a label that neither gives, or one that ``arms`` gives two keys."""
    labels = [a for a in dict.fromkeys(labels) if a not in (WARM_UP, TEACHER)]
    if arms is None:
        known = _keys_by_label()
        missing = [a for a in labels if a not in known]
        if missing:
            raise UserError(f"no arm of {', '.join(objective.TABLE)} on {', '.join(REPRESENTATIVE_DIVERGENCES)} "
                            f"(top-k up to {LOOKUP_TOPK}) is labelled {missing}: pass arms=, a frame with columns "
                            "arm, method, divergence, teacher_topk naming each arm")
        return {a: known[a] for a in labels}
    given = arms.drop_duplicates(["arm", "method", "divergence", "teacher_topk"])
    twice = given[given["arm"].duplicated()]["arm"].tolist()
    if twice:
        raise UserError(f"arms names two (method, divergence, teacher_topk) under one label: {twice}")
    keys = {r.arm: _arm(r.method, r.divergence, r.teacher_topk) for r in given.itertuples()}
    missing = [a for a in labels if a not in keys]
    if missing:
        raise UserError(f"arms does not name the arms {missing}; it names {sorted(keys)}")
    return {a: keys[a] for a in labels}


def final_items(items: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """Rows ``task, arm, seed, item, correct, ...`` from ``sweep.item_results`` (every run, every step; its last
    step per run is kept) and ``sweep.reference_items`` (teacher and warm-up, repeated for each seed of the
    task). Every arm of a task must have been evaluated on the same items."""
    if items.empty:
        raise UserError("no per-item records: the runs were evaluated before per-item records existed, or not "
                        "at all; rerun them (delete their directories)")
    last = items[items["step"] == items.groupby("run")["step"].transform("max")]
    runs = last.assign(arm=[arm_label(m, d, k) for m, d, k in zip(last["method"], last["divergence"],
                                                                  last["teacher_topk"])])
    refs = references.assign(arm=references["role"].map({"student": WARM_UP, "teacher": TEACHER}))
    seeds = runs.groupby("task")["seed"].unique()
    refs = pd.concat([refs[refs["task"] == t].assign(seed=s) for t in seeds.index for s in seeds[t]],
                     ignore_index=True)
    out = pd.concat([runs, refs], ignore_index=True)
    twice = out[out.duplicated(["task", "arm", "seed", "item"])]
    if len(twice):
        raise UserError(f"two runs share the arm name {twice['arm'].iloc[0]!r} at seed {twice['seed'].iloc[0]}: "
                        "arms that differ only in fields arm_label does not name (baseline, gamma, steps, ...) "
                        "cannot be compared as arms; run them in separate sweeps")
    ids = out.groupby(["task", "arm", "seed"])["item_id"].agg(lambda x: tuple(x.sort_index()))
    for task, part in ids.groupby(level="task"):
        if part.nunique() > 1:
            raise UserError(f"{task}: the arms were not evaluated on the same items (their item ids differ): give "
                            "every run the same final_eval_n (or eval_n) and eval_split as the teacher and warm-up")
    return out[["task", "arm", "seed", "item", "item_id", "correct", "length", "hit_cap"]].astype(
        {"seed": int, "correct": int}).reset_index(drop=True)


def pack_items(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, arm, seed): ``items`` and ``correct`` as a string of 0/1 over the items in order."""
    rows = [dict(task=t, arm=a, seed=s, items=len(part),
                 correct="".join(part.sort_values("item")["correct"].astype(int).astype(str)))
            for (t, a, s), part in frame.groupby(["task", "arm", "seed"], sort=True)]
    return pd.DataFrame(rows)


def read_packed(path) -> pd.DataFrame:
    """A CSV written from ``pack_items``, its ``correct`` column read as text (a plain ``read_csv`` would parse
    ``"0011..."`` as a number and lose the leading zeros)."""
    return pd.read_csv(path, dtype={"correct": str})


def unpack_items(packed: pd.DataFrame) -> pd.DataFrame:
    """``pack_items`` undone: rows ``task, arm, seed, item, correct``."""
    bad = [r.arm for r in packed.itertuples() if not isinstance(r.correct, str) or len(r.correct) != r.items]
    if bad:
        raise UserError(f"packed items of {bad[:3]} do not hold one 0/1 character per item: read the CSV with "
                        "comparisons.read_packed (its correct column as text)")
    rows = [pd.DataFrame(dict(task=r.task, arm=r.arm, seed=int(r.seed), item=np.arange(len(str(r.correct))),
                              correct=np.frombuffer(str(r.correct).encode(), np.uint8) - ord("0")))
            for r in packed.itertuples()]
    return pd.concat(rows, ignore_index=True)


def questions(arms) -> list[tuple[str, object, object]]:
    """The family ``(letter, A, B)`` over the ``Arm``s present (and the references ``WARM_UP``, ``TEACHER``), as
    notebook 04 asks it (see ``_FAMILIES``), chosen on the arms' keys alone; within a letter the arms come in the
    order of their labels."""
    arms = {a for a in arms if isinstance(a, Arm)}

    def of(method, topk=False):
        return sorted((a for a in arms if a.method == method and (a.teacher_topk is not None) == topk),
                      key=lambda a: a.label)
    opd_plus, stop, full, kd = of("opd_plus"), of("opd"), of("full_vocabulary"), of("supervised_kd")
    topk = sorted((a for a in arms if a.teacher_topk is not None), key=lambda a: a.label)
    out = [("a", a, WARM_UP) for a in sorted(opd_plus + topk + full + kd, key=lambda a: a.label)]
    out += [("b", a, WARM_UP) for a in stop]
    rkl = Arm("opd_plus", "reverse_kl")
    out += [("c", Arm("opd_plus", d), rkl) for d in ("forward_kl", "jsd") if Arm("opd_plus", d) in arms
            and rkl in arms]
    out += [("d", a, k) for a in opd_plus for k in kd]
    out += [("e", a, f) for f in full for a in opd_plus if a.divergence == f.divergence]
    for a in topk:
        out += [("f", a, b) for b in [a._replace(teacher_topk=None), *full] if b in arms]
    return out


def ask(frame: pd.DataFrame, alpha: float = 0.05, arms: pd.DataFrame | None = None) -> pd.DataFrame:
    """``stats.compare`` over ``questions`` of each task's arms, one Holm family over all of them, with a
    ``question`` letter and what it asks. Each arm label's key is ``arm_keys(labels, arms)``; the comparisons
    name the arms by the frame's labels."""
    tables = []
    for task, part in frame.groupby("task", sort=True):
        keys = arm_keys(part["arm"].unique(), arms)
        labels = {key: label for label, key in keys.items()} | {WARM_UP: WARM_UP, TEACHER: TEACHER}
        family = [(q, labels[a], labels[b]) for q, a, b in questions(keys.values())]
        if not family:
            raise UserError(f"{task}: no question can be asked of the arms {sorted(part['arm'].unique())}")
        t = stats.compare(part.drop(columns="task"), [(a, b) for _, a, b in family], alpha)
        tables.append(t.assign(task=task, question=[q for q, _, _ in family]))
    table = pd.concat(tables, ignore_index=True)
    table["p_holm"] = stats.holm(table["p"].to_numpy(), alpha)  # one family across tasks
    table["verdict"] = [stats.verdict(r, r["a"], r["b"], alpha) for r in table.to_dict("records")]
    table["asks"] = table["question"].map(_FAMILIES)
    return table[["task", "question", "asks", "a", "b", "seeds", "items", "estimate", "se", "lo", "hi", "p",
                  "p_holm", "mde", "verdict"]]


def gaps(frame: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per task and arm: mean accuracy over seeds and items, each seed's accuracy, and the fraction of the
    warm-up -> teacher gap closed with its hierarchical-bootstrap 95% interval (``stats.gap_closed``; NaN where
    the teacher does not beat the warm-up)."""
    rows = []
    for task, part in frame.groupby("task", sort=True):
        for arm, rows_ in part.groupby("arm", sort=True):
            per_seed = rows_.groupby("seed")["correct"].mean()
            row = dict(task=task, arm=arm, seeds=len(per_seed), items=rows_["item"].nunique(),
                       accuracy=float(rows_["correct"].mean()), seed_min=float(per_seed.min()),
                       seed_max=float(per_seed.max()))
            mean = part.groupby("arm")["correct"].mean()
            gap = mean.get(TEACHER, np.nan) - mean.get(WARM_UP, np.nan)
            if arm not in (WARM_UP, TEACHER) and gap > 0:  # no gap (tiny models): no fraction of it
                g = stats.gap_closed(part, arm, WARM_UP, TEACHER, n_boot, seed)
                row.update(gap_closed=g["estimate"], gap_lo=g["lo"], gap_hi=g["hi"])
            rows.append(row)
    return pd.DataFrame(rows)


def claims(table: pd.DataFrame, not_claimed=()) -> pd.DataFrame:
    """The rows notebook 04 asserts: (a) every arm but stop-gradient beats the warm-up, (b) stop-gradient falls
    below it, less the arms in ``not_claimed`` (a claim the committed data did not support, reported instead);
    the others are findings, reported with the difference this design detects."""
    unknown = sorted(set(not_claimed) - set(table["a"]))
    if unknown:
        raise UserError(f"not_claimed names arms that are not compared: {unknown}; arms: {sorted(set(table['a']))}")
    return table[table["question"].isin(["a", "b"]) & ~table["a"].isin(list(not_claimed))]


def check_claims(table: pd.DataFrame, not_claimed=(), alpha: float = 0.05) -> None:
    """Raise an AssertionError naming every claim of ``claims(table, not_claimed)`` that the data does not
    support: (a) needs a positive difference significant after Holm, (b) a negative one."""
    failed = []
    for r in claims(table, not_claimed).to_dict("records"):
        sign = 1 if r["question"] == "a" else -1
        if not (r["p_holm"] < alpha and sign * r["estimate"] > 0):
            failed.append(f"{r['task']}: {r['a']} vs {r['b']}: {100 * r['estimate']:+.1f} points "
                          f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}], Holm p {r['p_holm']:.3g}")
    if failed:
        raise AssertionError("claims the data does not support:\n" + "\n".join(failed))


def findings(table: pd.DataFrame, arms: pd.DataFrame) -> list[str]:
    """One sentence per comparison, numbers from the data: the estimate in points, its 95% interval, the Holm
    p and the verdict (with the detectable difference where none is detected)."""
    out = []
    acc = arms.set_index(["task", "arm"])["accuracy"]
    for r in table.to_dict("records"):
        out.append(f"({r['question']}) {r['task'].replace('_', ' ')}: {r['a']} ({acc[(r['task'], r['a'])]:.3f}) "
                   f"vs {r['b']} ({acc[(r['task'], r['b'])]:.3f}): {100 * r['estimate']:+.1f} points "
                   f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}], Holm p {r['p_holm']:.2g}; {r['verdict']}")
    return out


def power(frame: pd.DataFrame, table: pd.DataFrame, seeds: int, target: float,
          alpha: float = 0.05) -> pd.DataFrame:
    """For each comparison of ``table`` between two trained arms (questions c-f): the measured variance
    components of its per-item difference, the difference detectable at ``seeds`` seeds and this many items,
    and the fewest seeds (2-64) that detect ``target`` (``stats.plan``; NaN where none does)."""
    rows = []
    for r in table[table["question"].isin(["c", "d", "e", "f"])].to_dict("records"):
        part = frame[frame["task"] == r["task"]]
        a, b = (stats.paired_matrix(part, x).to_numpy(float) for x in (r["a"], r["b"]))
        comp = stats.variance_components(a - b)
        n = a.shape[1]
        need = stats.plan(comp, target, items=(n,), alpha=alpha).iloc[0]
        rows.append(dict(task=r["task"], question=r["question"], a=r["a"], b=r["b"], items=n,
                         sigma2_seed=comp["sigma2_seed"], sigma2_item=comp["sigma2_item"],
                         sigma2_resid=comp["sigma2_resid"], seeds=seeds,
                         mde_at_seeds=float(stats.mde(stats.design_se(comp, seeds, n), seeds - 1, alpha)),
                         target=target, seeds_for_target=need["seeds"]))
    return pd.DataFrame(rows)


def step_costs(train: pd.DataFrame) -> pd.DataFrame:
    """Per task and arm, from the runs' training records (``rundir.reader.results(..., kind="train")``): the median over
    each run's steps of its seconds per step (every ``time_`` lap; the rates left out), then the median over the
    arm's runs, and its sampled tokens per step."""
    laps = [c for c in train.columns if c.startswith("time_") and not c.endswith("_per_s")]
    per_step = train.assign(seconds=train[laps].sum(axis=1),
                            arm=[arm_label(m, d, k) for m, d, k in zip(train["method"], train["divergence"],
                                                                       train["teacher_topk"])])
    runs = per_step.groupby(["task", "arm", "run"]).agg(seconds=("seconds", "median"),
                                                       tokens=("tokens", "median")).reset_index()
    return runs.groupby(["task", "arm"]).agg(seconds_per_step=("seconds", "median"), runs=("run", "nunique"),
                                             tokens_per_step=("tokens", "median")).reset_index()


def variance_claims(variance: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Notebook 09's claims on ``noise.step_noise`` rows (columns ``gamma, baseline, log_u_clip,
    relative_variance, log_relative_variance_loo``), all measured on the same batches: each pooled over the
    settings where both sides are measured (``stats.jackknife_log_ratio`` over the shared batches), Holm over the
    two: ``"no clip / clip"`` (the clip lowers the step variance) and ``"γ = 1 / γ = 0"`` (γ = 1 raises it). A
    claim holds where ``p_holm < alpha`` and the ratio exceeds 1."""
    v = variance.assign(clip=variance["log_u_clip"].notna())

    def loo(rows):
        return np.array([[float(x) for x in str(t).split()] for t in rows])

    def pooled(a, b, keys):
        m = a.merge(b, on=keys, suffixes=("_a", "_b"))
        return stats.jackknife_log_ratio(loo(m["log_relative_variance_loo_a"]),
                                         loo(m["log_relative_variance_loo_b"]), np.log(m["relative_variance_a"]),
                                         np.log(m["relative_variance_b"]), alpha)

    rows = [dict(claim="no clip / clip", **pooled(v[~v["clip"]], v[v["clip"]], ["gamma", "baseline"])),
            dict(claim="γ = 1 / γ = 0", **pooled(v[v["gamma"] == 1.0], v[v["gamma"] == 0.0], ["baseline", "clip"]))]
    out = pd.DataFrame(rows)
    out["p_holm"] = stats.holm(out["p"].to_numpy(), alpha)
    out["holds"] = (out["p_holm"] < alpha) & (out["estimate"] > 0)
    return out


def kl_claims(items: pd.DataFrame, sampled: str = "opd_plus", reference: str | None = "opd") -> pd.DataFrame:
    """Notebook 06's claims on per-item records (columns ``method, step, item, kl_reverse``, and ``seed`` where
    there are several): the ``sampled`` method's per-item KL to the teacher after (its last step) against before
    (step 0), and against the ``reference`` method after, each ``stats.paired_test`` over seeds x items (seed by
    seed: a seed's run against that seed's own step 0 and its own reference run), Holm over the two. A claim holds
    where its 95% interval lies below zero and its Holm p is below 0.05."""
    last = int(items["step"].max())
    items = items if "seed" in items.columns else items.assign(seed=0)

    def kl(method, step):
        rows = items[(items["method"] == method) & (items["step"] == step)]
        if rows.empty:
            raise UserError(f"no per-item records of {method!r} at step {step}")
        if rows.duplicated(["seed", "item"]).any():
            raise UserError(f"{method!r} at step {step} has two records of one seed and item: one run per seed")
        table = rows.pivot(index="seed", columns="item", values="kl_reverse").dropna(axis=1, how="all")
        if table.isna().any().any():  # (items scored greedy only have no KL in any seed: dropped above)
            raise UserError(f"the per-item KL of {method!r} at step {step} is missing for some seed and item: every "
                            "seed's run must score the same items")
        return table.sort_index().sort_index(axis=1)

    def paired(a, b, x, y):
        if not (x.index.equals(y.index) and x.columns.equals(y.columns)):
            raise UserError(f"{a!r} and {b!r} are not on the same seeds and items (seeds {list(x.index)} against "
                            f"{list(y.index)}): a paired test pairs each seed's item with itself")
        return a, b, x.to_numpy(float), y.to_numpy(float)

    pairs = [paired(f"{sampled} after", f"{sampled} before", kl(sampled, last), kl(sampled, 0))]
    if reference is not None and (items["method"] == reference).any():
        pairs.append(paired(f"{sampled} after", f"{reference} after", kl(sampled, last), kl(reference, last)))
    out = pd.DataFrame([dict(a=a, b=b, seeds=x.shape[0], items=x.shape[1], **stats.paired_test(x, y))
                        for a, b, x, y in pairs])
    out["p_holm"] = stats.holm(out["p"].to_numpy())
    out["holds"] = (out["hi"] < 0) & (out["p_holm"] < 0.05)
    return out
