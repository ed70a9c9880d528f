"""Numbers rendered from committed data, never typed: ``docs/results.md`` whole, and the marked regions of
``README.md`` and ``docs/*.md``.

    opdlab report            regenerate them from figures/data/*.csv (and benchmarks/results/*.csv)
    opdlab report --check    exit 1, naming each file or region that differs from what the data gives

``docs/results.md`` holds one section per notebook (``SECTIONS``: a title and the function that renders it from
the repository root). A region is the text between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``, each
alone on its line; ``REGIONS`` maps NAME to the function that renders it. ``render`` gives every document's text
as the data says it should be, ``check`` lists what differs, ``write`` writes it. A new table is one function
and an entry in one of the two.

Rounding is stated where a number appears: accuracies, cosines and rates to 3 decimals, the gap closed to whole
percent, noise scales to whole tokens. Each table is built with pandas and written by ``DataFrame.to_markdown``
(tabulate, its strings kept verbatim).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from opdlab.core.objective import divergence_title, label as method_label
from opdlab.errors import UserError
from opdlab.report.format import (data as _data, doc as _doc, f as _f, interval as _interval, p as _p, pct as _pct,
                                  points as _points, prose as _prose, table as _table)

__all__ = ["REGIONS", "SECTIONS", "RESULTS", "ROOT", "render", "check", "write", "arms", "comparisons", "headline"]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "docs/results.md"
_MARKER = re.compile(r"^<!-- (/?)report:([\w.-]+) -->$", re.M)


def arms(root: Path) -> pd.DataFrame:
    """Notebook 04's arms per task (``04_arms.csv``) as formatted cells: accuracy on the final items (mean over
    seeds and items, 3 decimals), the lowest and highest seed, the gap closed with its bootstrap interval (whole
    percent) and the difference from the warm-up (points, 1 decimal) with its interval and Holm p
    (``04_comparisons.csv``, question a or b)."""
    table, comp = _data(root, "04_arms.csv"), _data(root, "04_comparisons.csv")
    warm = comp[comp["question"].isin(["a", "b"])].set_index(["task", "a"])
    rank = [lambda a: a.startswith("OPD+") and "top-" not in a, lambda a: "top-" in a and a.startswith("OPD+"),
            lambda a: a.startswith("full vocabulary"), lambda a: a == "supervised KD",
            lambda a: a.startswith("stop-gradient"), lambda a: a == "teacher"]
    table = table.assign(_rank=[next((i for i, f in enumerate(rank) if f(a)), len(rank)) for a in table["arm"]])
    table = table.sort_values(["task", "_rank", "arm"], kind="stable")
    rows = []
    for r in table.to_dict("records"):
        if r["arm"] in ("teacher", "warm-up student"):  # one model each, the same for every seed
            rows.append({"task": r["task"].replace("_", " "), "arm": r["arm"], "accuracy": _f(r["accuracy"]),
                         "seeds (lowest–highest)": "one model", "gap closed [95%]": "–",
                         "vs warm-up, points [95%]": "–", "Holm p": "–"})
            continue
        w = warm.loc[(r["task"], r["arm"])] if (r["task"], r["arm"]) in warm.index else None
        rows.append({"task": r["task"].replace("_", " "), "arm": r["arm"],
                     "accuracy": _f(r["accuracy"]), "seeds (lowest–highest)":
                     f"{int(r['seeds'])} ({_f(r['seed_min'], 2)}–{_f(r['seed_max'], 2)})",
                     "gap closed [95%]": "–" if pd.isna(r.get("gap_closed")) else
                     f"{_pct(r['gap_closed'])} [{_pct(r['gap_lo'])}, {_pct(r['gap_hi'])}]",
                     "vs warm-up, points [95%]": "–" if w is None else
                     f"{_points(w['estimate'])} {_interval(w['lo'], w['hi'])}",
                     "Holm p": "–" if w is None else _p(w["p_holm"])})
    return pd.DataFrame(rows)


def comparisons(root: Path) -> pd.DataFrame:
    """Notebook 04's family of paired comparisons (``04_comparisons.csv``) as formatted cells."""
    comp = _data(root, "04_comparisons.csv")
    return pd.DataFrame({"": comp["question"].map(lambda q: f"({q})"), "task": comp["task"].str.replace("_", " "),
                         "A − B": [f"{a} − {b}" for a, b in zip(comp["a"], comp["b"])],
                         "points [95%]": [f"{_points(e)} {_interval(lo, hi)}"
                                          for e, lo, hi in zip(comp["estimate"], comp["lo"], comp["hi"])],
                         "Holm p": comp["p_holm"].map(_p), "detectable": comp["mde"].map(lambda m: f"{100 * m:.1f}"),
                         "verdict": comp["verdict"]})


def _design(root: Path) -> str:
    table, comp = _data(root, "04_arms.csv"), _data(root, "04_comparisons.csv")
    trained = table[~table["arm"].isin(["warm-up student", "teacher"])]
    return (f"{int(trained['seeds'].max())} seeds, {int(comp['items'].max()):,} held-out items per run, "
            f"{len(trained)} arms")


def headline(root: Path) -> str:
    """README's table: notebook 04's arms, each against the warm-up it starts from, paired over seeds x items."""
    return _table(arms(root).drop(columns="task" if _data(root, "04_arms.csv")["task"].nunique() == 1 else [])) + \
        "\n\n" + _prose(
        f"Held-out greedy accuracy at each run's last step ({_design(root)}; `figures/data/04_arms.csv`), and "
        "its difference from the warm-up student, paired item by item and seed by seed (standard errors clustered "
        "by seed and by item; the 95% interval is each comparison's own, the Holm p adjusts for notebook 04's "
        "whole family of comparisons; "
        "`figures/data/04_comparisons.csv`). The gap closed is (arm − warm-up) / (teacher − warm-up), with a "
        "hierarchical-bootstrap interval.")


# -- the other notebooks ---------------------------------------------------------------------------------------

def _derivation(root: Path) -> str:
    tab = _data(root, "01_advantage_table.csv")
    frame = pd.DataFrame({"divergence": tab["label"], "f(u)": tab["f"].map(lambda x: f"`{x}`"),
                          "OPD+ advantage w_f(u)": tab["opd_plus_advantage"].map(lambda x: f"`{x}`"),
                          "stop-gradient error u f'(u)": tab["stop_gradient_error"].map(lambda x: f"`{x}`"),
                          "constant error": tab["error_is_constant"].map({True: "yes", False: "no"})})
    return _doc("What sympy derives for each registry divergence: the OPD+ advantage and the error the "
                "stop-gradient makes, and whether that error is a constant (which vanishes in expectation).", frame)


def _toy_cosines(root: Path) -> str:
    cos = _data(root, "02_cosines.csv")
    stats = cos.groupby(["divergence", "method"], sort=False)["cosine"].agg(["mean", "min"]).unstack("method")
    frame = pd.DataFrame({"divergence": [divergence_title(d) for d in stats.index],
                          "stop-gradient OPD, mean": stats[("mean", "opd")].map(_f),
                          "stop-gradient OPD, min": stats[("min", "opd")].map(_f),
                          "OPD+, mean": stats[("mean", "opd_plus")].map(_f),
                          "OPD+, min": stats[("min", "opd_plus")].map(_f)})
    runs = _data(root, "02_training.csv").groupby(["divergence", "method"], sort=False)
    ends = runs.agg(start=("D_f", "first"), end=("D_f", "last"), steps=("step", "max")).reset_index()
    training = pd.DataFrame({"divergence": ends["divergence"].map(divergence_title),
                             "method": ends["method"].map(method_label),
                             "D_f at step 0": ends["start"].map(_f), "D_f at the end": ends["end"].map(_f),
                             "steps": ends["steps"].astype(str)})
    return _doc(f"Exact cosine of each estimator's expected gradient to the true gradient over "
                f"{cos['toy_seed'].nunique()} random categorical toys (3 decimals).", frame,
                "Toy training on a categorical toy: the divergence D_f at the start and at the end (3 decimals).",
                training)


def _gamma(root: Path) -> str:
    gam = _data(root, "03_gamma_tradeoff.csv")
    gam = gam[(gam["method"] == "opd_plus") & (gam["baseline"] == "none")]
    frame = pd.DataFrame({"divergence": gam["divergence"].map(divergence_title), "γ": gam["gamma"].map(str),
                          "bias, sequence": gam["bias_sequence"].map(_f),
                          "bias, token-local": gam["bias_token_local"].map(_f),
                          "variance": gam["variance"].map(_f), "samples": gam["n_samples"].astype(str)})
    return _doc("OPD+ without a baseline on tabular sequence toys: the bias against the sequence and the "
                "token-local gradients, and the per-sample variance, against γ (3 decimals).", frame)


def _checkpoints(root: Path) -> str:
    fin = _data(root, "06_final.csv")
    frame = pd.DataFrame({"method": fin["method"].map(method_label),
                          "divergence": fin["divergence"].map(divergence_title), "task": fin["task"],
                          "seeds": fin["seeds"].astype(str),
                          "reverse KL before": fin["exact_reverse_kl_before"].map(lambda x: _f(x, 2)),
                          "reverse KL after": fin["exact_reverse_kl_after"].map(lambda x: _f(x, 2)),
                          "accuracy before": fin["greedy_accuracy_before"].map(_f),
                          "accuracy after": fin["greedy_accuracy_after"].map(_f),
                          "teacher accuracy": fin["teacher_accuracy"].map(_f),
                          "at the token cap, before": fin["hit_cap_rate_before"].map(_pct),
                          "after": fin["hit_cap_rate_after"].map(_pct),
                          "teacher": fin["teacher_hit_cap_rate"].map(_pct)})
    claims = _data(root, "06_claims.csv")
    paired = pd.DataFrame({"A − B": [f"{a} − {b}" for a, b in zip(claims["a"], claims["b"])],
                           "per-item KL, nats [95%]": [f"{e:+.2f} [{lo:+.2f}, {hi:+.2f}]" for e, lo, hi in
                                                       zip(claims["estimate"], claims["lo"], claims["hi"])],
                           "Holm p": claims["p_holm"].map(_p),
                           "claim": claims["holds"].map({True: "holds", False: "not supported"})})
    return _doc("A layer-dropped SmolLM2 student: the exact per-token reverse KL to the teacher (nats, 2 "
                "decimals) and held-out greedy accuracy before and after distillation, means over the seeds, and "
                "the share of greedy completions that hit the token cap.", frame,
                f"Paired over {int(claims['seeds'].iloc[0])} seeds × {int(claims['items'].iloc[0])} held-out items, "
                "Holm over the two:", paired)


def _audit(root: Path) -> str:
    ver = _data(root, "07_verdicts.csv")
    ver = ver[ver["kind"] == "categorical"]
    frame = pd.DataFrame({"estimator": ver["estimator"], "mode": ver["mode"], "claims": ver["claims"].fillna("–"),
                          "follows": ver["closest"], "cosine": ver["closest_cosine"].map(_f),
                          "step scale": ver["closest_scale"].map(lambda x: _f(x, 2)),
                          "cosine to its claim": ver["cos_claimed"].map(_f)})
    return _doc("Which divergence's exact token-local gradient each estimator's expected gradient follows on "
                "categorical toys (3 decimals; `07_verdicts.csv` also holds the sequence toys).", frame)


def _noise(root: Path) -> str:
    noise, tokens = _data(root, "08_noise.csv"), _data(root, "08_sampled_tokens.csv")
    frame = pd.DataFrame({"variant": noise["variant"], "one step's cosine": noise["cos_mean"].map(_f),
                          "redraw mean's cosine": noise["cos_of_mean"].map(_f),
                          "noise scale (tokens)": noise["B_noise"].map(lambda x: f"{x:,.0f}"),
                          "tokens per step": noise["tokens"].astype(str),
                          "weights with SNR > 1": noise["snr_above_1"].map(_f),
                          "predicted cosine at 4× tokens": noise["cosine_at_4x"].map(_f)})
    ruled_out = tokens["log_u"] < -2
    share = (tokens["advantage"][ruled_out] ** 2).sum() / (tokens["advantage"] ** 2).sum()
    return _doc("The gradient noise of one OPD step at fixed contexts of notebook 04's arithmetic warm-up student "
                "(3 decimals; the noise scale to whole tokens).", frame,
                f"Of {len(tokens):,} sampled tokens, a fraction {_f(ruled_out.mean())} has log u < −2 (the teacher "
                f"rules them out) and carries a fraction {_f(share)} of the squared advantage.")


def _tradeoff(root: Path) -> str:
    noise, claims, comp = _data(root, "09_noise.csv"), _data(root, "09_claims.csv"), _data(root, "09_comparisons.csv")
    frame = pd.DataFrame({"clip": noise["clip"], "γ": noise["gamma"].map(lambda g: f"{g:g}"),
                          "baseline": noise["baseline"],
                          "relative step variance (×/÷ jackknife SE)": [
                              f"{v:.2f} (×/÷ {np.exp(se):.2f})" for v, se in
                              zip(noise["relative_variance"], noise["log_relative_variance_se"])]})
    pooled = pd.DataFrame({"claim": claims["claim"], "ratio [95%]": [
        f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in zip(claims["ratio"], claims["lo_ratio"], claims["hi_ratio"])],
        "settings": claims["settings"].astype(str), "Holm p": claims["p_holm"].map(_p),
        "detectable ratio": claims["detectable_ratio"].map(lambda r: f"{r:.2f}")})
    acc = pd.DataFrame({"A − B": [f"{a} − {b}" for a, b in zip(comp["a"], comp["b"])],
                        "points [95%]": [f"{_points(e)} {_interval(lo, hi)}"
                                         for e, lo, hi in zip(comp["estimate"], comp["lo"], comp["hi"])],
                        "Holm p": comp["p_holm"].map(_p), "verdict": comp["verdict"]})
    return _doc("OPD+ forward KL on arithmetic, at notebook 04's warm-up student: the relative variance of one step's "
                "gradient per variant (2 decimals; the jackknife SE of its log as a factor).", frame,
                "Pooled over the settings, the geometric-mean ratio of step variances with its 95% t-interval, and "
                "the ratio this design detects with 80% power:",
                pooled, "Students trained with and without the clip, paired over seeds × items (difference in "
                "points):", acc)


def _students(root: Path) -> str:
    return _doc(f"Each arm's held-out greedy accuracy at its last step ({_design(root)}), the fraction of the "
                "warm-up → teacher gap it closes and its difference from the warm-up:", arms(root),
                "The family of paired comparisons (difference of A − B in points of accuracy, its 95% interval per "
                "comparison, Holm p over the family, the difference detectable with 80% power at this design, the "
                "verdict):",
                comparisons(root), *_power(root), *_steps(root))


def _steps(root: Path) -> tuple:
    steps = _data(root, "04_steps.csv")
    frame = pd.DataFrame({"task": steps["task"].str.replace("_", " "), "arm": steps["arm"],
                          "relative step variance (×/÷ jackknife SE)": [
                              "–" if pd.isna(v) else f"{v:.2f} (×/÷ {np.exp(se):.2f})"
                              for v, se in zip(steps["relative_variance"], steps["log_relative_variance_se"])],
                          "seconds per step": steps["seconds_per_step"].map(lambda x: _f(x, 2)),
                          "sampled tokens per step": steps["tokens_per_step"].map(lambda x: f"{x:,.0f}")})
    return ("The noise of one step at the warm-up student (`noise.step_noise`; supervised KD samples from the "
            "teacher and is not measured) and the cost of one training step (median over each arm's runs, one "
            "worker at one thread):", frame)


def _power(root: Path) -> tuple:
    power = _data(root, "04_power.csv")
    if power.empty:
        return ()
    seeds, target = int(power["seeds"].iloc[0]), float(power["target"].iloc[0])
    frame = pd.DataFrame({"": power["question"].map(lambda q: f"({q})"),
                          "A − B": [f"{a} − {b}" for a, b in zip(power["a"], power["b"])],
                          f"detectable at {seeds} seeds, points": power["mde_at_seeds"].map(lambda m: f"{100 * m:.1f}"),
                          f"seeds to detect {100 * target:g} points": power["seeds_for_target"].map(
                              lambda x: "more than 64" if pd.isna(x) else f"{int(x)}")})
    return (f"What more seeds would buy, from the measured variance components of each difference at "
            f"{int(power['items'].iloc[0]):,} items per run (`stats.plan`; the `study` preset runs {seeds}):", frame)


SECTIONS: list[tuple[str, Callable[[Path], str]]] = [
    ("Notebook 04: real students", _students),
    ("Notebook 01: the bias, derived", _derivation),
    ("Notebook 02: the bias on categorical toys", _toy_cosines),
    ("Notebook 03: γ on sequences", _gamma),
    ("Notebook 06: a real pretrained checkpoint", _checkpoints),
    ("Notebook 07: what a framework's loss follows", _audit),
    ("Notebook 08: the noise of a sampled step", _noise),
    ("Notebook 09: γ, baseline and clip on real students", _tradeoff),
]


def results(root: Path) -> str:
    """The whole of ``docs/results.md``: one section per notebook (``SECTIONS``)."""
    intro = _prose("Rendered by `opdlab report` from the committed tables in `figures/data/`; do not edit by hand: "
                   "`opdlab report --check` (run by the tests) fails when this file differs from what the data "
                   "gives. What each experiment asks is in its notebook; [the README](../README.md) holds the "
                   "headline.")
    body = "\n\n".join(f"## {title}\n\n{build(root)}" for title, build in SECTIONS)
    return f"# Results\n\n{intro}\n\n{body}\n"


# -- benchmarks ------------------------------------------------------------------------------------------------

BENCHMARKS = {  # table name -> the command that measures it
    "bench_estimators": "python benchmarks/bench_estimators.py",
    "bench_train": "python benchmarks/bench_train.py",
    "bench_memory": "python benchmarks/bench_memory.py",
    "bench_peers": "python benchmarks/bench_peers.py --samples 1 4 --steps 8",
    "bench_levers": "python benchmarks/bench_levers.py",
    "cohort": "python benchmarks/bench_cohort.py --case nb04/arithmetic --case nb04/tool_use --R 1 2 4 8 16 --steps 2",
}


def _benchmark(name: str) -> Callable[[Path], str]:
    """The renderer of one benchmark's region: each committed ``benchmarks/results/NAME*.csv`` (one per device,
    e.g. ``bench_train-cpu.csv``) as a table, floats to 4 significant digits; or, where none is committed, the
    command that measures it."""
    def render_benchmark(root: Path) -> str:
        paths = sorted((root / "benchmarks" / "results").glob(f"{name}*.csv"))
        if not paths:
            return (f"No result is committed. `{BENCHMARKS[name]}` measures it; this table is rendered from "
                    f"`benchmarks/results/{name}-<device>.csv` once such a file is committed.")
        parts = []
        for path in paths:
            frame = pd.read_csv(path).map(lambda x: f"{x:.4g}" if isinstance(x, float) else str(x))
            parts.append(f"From `benchmarks/results/{path.name}` (4 significant digits), measured by "
                         f"`{BENCHMARKS[name]}`:\n\n" + _table(frame))
        return "\n\n".join(parts)
    return render_benchmark


MAIN_JOB = "python benchmarks/bench_main_job.py"
"""The command that measures the main job's FLOP account (``benchmarks/results/main_job.csv``)."""


def main_job(root: Path) -> str:
    """The main job's FLOP account: measured and bound minutes per phase (1 decimal), GFLOP/s (1 decimal) and
    the fraction of the matmul peak (whole percent), the total and its gap to the bound; or, where no
    ``benchmarks/results/main_job.csv`` is committed, the command that measures it."""
    path = root / "benchmarks" / "results" / "main_job.csv"
    if not path.exists():
        return (f"No result is committed. `{MAIN_JOB}` measures it (on a quiet machine: the job's counts times "
                "each phase's measured cost); this region is rendered from `benchmarks/results/main_job.csv` once "
                "such a file is committed.")
    job = pd.read_csv(path)
    phases = job.groupby("phase")[["seconds_total", "bound_seconds", "gflop_total"]].sum().sort_values(
        "seconds_total", ascending=False)
    rate = phases["gflop_total"] / phases["seconds_total"]
    peak, threads = job["peak_gflops"].iloc[0], int(job["threads"].iloc[0])
    measured, bound = phases["seconds_total"].sum() / 60, phases["bound_seconds"].sum() / 60
    frame = pd.DataFrame({"phase": phases.index, "measured min": (phases["seconds_total"] / 60).map(lambda x: _f(x, 1)),
                          "share": (phases["seconds_total"] / phases["seconds_total"].sum()).map(_pct),
                          "bound at peak, min": (phases["bound_seconds"] / 60).map(lambda x: _f(x, 1)),
                          "GFLOP/s": [_f(r, 1) if g > 0 else "–" for r, g in zip(rate, phases["gflop_total"])],
                          "of peak": [_pct(r / peak) if g > 0 else "–" for r, g in zip(rate, phases["gflop_total"])]})
    return _doc(f"From `benchmarks/results/main_job.csv`, measured by `{MAIN_JOB}`: minutes of one process at "
                f"{threads} thread(s), each phase's measured cost times its count in the job, beside its model FLOPs "
                f"at the fp32 matrix-multiply peak measured in the same process ({peak:.0f} GFLOP/s).", frame,
                f"In all {measured:.1f} minutes measured against a bound of {bound:.1f} at peak: the job takes "
                f"{measured / bound:.1f}× its bound. By notebook, measured (bound): " + ", ".join(
                    f"{name} {row.seconds_total / 60:.1f} ({row.bound_seconds / 60:.1f})" for name, row in
                    job.groupby("notebook")[["seconds_total", "bound_seconds"]].sum().iterrows()) +
                ". The sweep spreads the runs over its worker processes, so their wall time is about these minutes "
                "over the workers, and so is the bound.")


def make_figures(root: Path) -> str:
    """``make figures`` end to end (``benchmarks/results/make_figures.csv``): minutes per notebook (1 decimal) and
    the total against the 20-minute target; or the command that measures it."""
    path = root / "benchmarks" / "results" / "make_figures.csv"
    if not path.exists():
        return "No result is committed. `python benchmarks/bench_make_figures.py` measures it."
    job = pd.read_csv(path)
    total = float(job.loc[job["part"] == "total", "seconds"].iloc[0]) / 60
    frame = pd.DataFrame({"part": job["part"], "minutes": (job["seconds"] / 60).map(lambda x: _f(x, 1))})
    verdict = (f"{total - 20:.1f} minutes over" if total > 20 else f"{20 - total:.1f} minutes under")
    return _doc(f"From `benchmarks/results/make_figures.csv`, measured by `python benchmarks/bench_make_figures.py` "
                f"on commit {job['commit'].iloc[0]}: a fresh clone, an empty model cache, setup included.", frame,
                f"In all {total:.1f} minutes: {verdict} the 20-minute target.")


REGIONS: dict[str, Callable[[Path], str]] = {"headline": headline, "main_job": main_job, "make_figures": make_figures,
                                             **{name: _benchmark(name) for name in BENCHMARKS}}


# -- render, check, write --------------------------------------------------------------------------------------

def _fill(text: str, where: str, root: Path) -> str:
    """``text`` with each marked region's body replaced by what ``REGIONS`` renders."""
    out, last, open_ = [], 0, None
    for m in _MARKER.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in REGIONS:
            raise UserError(f"{where}: unknown report region {name!r}; known: {', '.join(REGIONS)}")
        if closing:
            if open_ != name:
                raise UserError(f"{where}: <!-- /report:{name} --> closes no open region {name!r}")
            open_, last = None, m.start()  # the old body is dropped
            continue
        if open_ is not None:
            raise UserError(f"{where}: region {name!r} opens inside region {open_!r}; close that first")
        out.append(text[last:m.end()] + "\n" + REGIONS[name](root).rstrip("\n") + "\n")
        open_, last = name, m.end()
    if open_ is not None:
        raise UserError(f"{where}: region {open_!r} is never closed; add <!-- /report:{open_} -->")
    return "".join(out) + text[last:]


def _marked(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
            if p.exists() and p.relative_to(root).as_posix() != RESULTS and _MARKER.search(p.read_text())]


def render(root: str | Path = ROOT) -> dict[str, str]:
    """Every rendered document's text as the data gives it, keyed by its path relative to ``root``."""
    root = Path(root)
    docs = {RESULTS: results(root)}
    for path in _marked(root):
        where = path.relative_to(root).as_posix()
        docs[where] = _fill(path.read_text(), where, root)
    return docs


def _regions(text: str) -> dict[str, str]:
    """Each marked region's body by name."""
    return dict(re.findall(r"^<!-- report:([\w.-]+) -->\n(.*?)^<!-- /report:\1 -->$", text, re.M | re.S))


def check(root: str | Path = ROOT) -> list[str]:
    """One line per document or region that differs from what the data gives (empty when all agree)."""
    root, problems = Path(root), []
    for where, expected in render(root).items():
        path = root / where
        actual = path.read_text() if path.exists() else None
        if actual == expected:
            continue
        if actual is None:
            problems.append(f"{where} is missing")
            continue
        want, have = _regions(expected), _regions(actual)
        regions = [name for name in want if want[name] != have.get(name)]
        lines = [line for line in difflib.unified_diff(actual.splitlines(), expected.splitlines(), n=0,
                                                       lineterm="") if not line.startswith(("+++", "---", "@@"))]
        committed = next((line[1:].strip() for line in lines if line.startswith("-")), "")
        rendered = next((line[1:].strip() for line in lines if line.startswith("+")), "")
        where_ = f"{where} region {', '.join(regions)}" if regions else where
        problems.append(f"{where_} differs from what the data gives: committed {committed[:100]!r}, "
                        f"rendered {rendered[:100]!r}")
    return problems


def write(root: str | Path = ROOT) -> list[str]:
    """Write every rendered document that differs; returns the paths written."""
    root, written = Path(root), []
    for where, text in render(root).items():
        path = root / where
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(where)
    return written
