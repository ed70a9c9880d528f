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
import textwrap
from pathlib import Path
from typing import Callable

import pandas as pd

from opdlab.errors import UserError
from opdlab.plots import divergence_title, method_style

__all__ = ["REGIONS", "SECTIONS", "RESULTS", "ROOT", "render", "check", "write", "final_accuracy", "headline"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "docs/results.md"
_MARKER = re.compile(r"^<!-- (/?)report:([\w.-]+) -->$", re.M)


def _data(root: Path, name: str) -> pd.DataFrame:
    path = root / "figures" / "data" / name
    if not path.exists():
        raise UserError(f"{path} is missing: the report renders from figures/data/ (run `make figures`, or pass "
                        f"the repository root as --root)")
    return pd.read_csv(path)


def _table(frame: pd.DataFrame) -> str:
    """A markdown table of already-formatted cells (strings kept as written)."""
    return frame.to_markdown(index=False, disable_numparse=True)


def _prose(text: str) -> str:
    """A paragraph of generated prose, wrapped as the hand-written docs are."""
    return textwrap.fill(text, width=115, break_on_hyphens=False)


def _f(x: float, digits: int = 3) -> str:
    return "–" if pd.isna(x) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _arm(method: str, divergence: str) -> str:
    """An arm's name as the figures' legends give it; the reference arms say which divergence they follow."""
    label = method_style(method)["label"]
    if method == "supervised_kd":
        return label.replace(" (reference)", "")
    return f"{label.replace(' (reference)', '')}, {divergence_title(divergence)}"


def _order(column: pd.Series) -> pd.Series:
    """Sort key: OPD+ first, then stop-gradient OPD and the references; reverse KL, JSD, forward KL first."""
    first = {"method": ["opd_plus", "opd", "full_vocabulary", "supervised_kd"],
             "divergence": ["reverse_kl", "jsd", "forward_kl"]}[column.name]
    return column.map(lambda v: first.index(v) if v in first else len(first))


# -- notebook 04: the headline ---------------------------------------------------------------------------------

def final_accuracy(root: Path) -> pd.DataFrame:
    """Notebook 04's final held-out greedy accuracy per task and arm, with its 95% t-interval over seeds, the
    seeds, the fraction of the warm-up → teacher gap closed, and the lowest accuracy any seed had on the way
    (from ``04_curves.csv``), as formatted strings."""
    final, curves = _data(root, "04_final.csv"), _data(root, "04_curves.csv")
    keys = ["task", "divergence", "method"]
    lowest = curves.loc[curves.groupby(keys)["greedy_accuracy"].idxmin(), keys + ["greedy_accuracy", "step"]]
    rows = final.merge(lowest, on=keys, how="left").sort_values(["task", "method", "divergence"], kind="stable",
                                                                 key=lambda c: c if c.name == "task" else _order(c))
    return pd.DataFrame({
        "task": rows["task"], "arm": [_arm(m, d) for m, d in zip(rows["method"], rows["divergence"])],
        "accuracy": [f"{_f(m)} ± {_f(c)}" for m, c in zip(rows["mean"], rows["ci"])],
        "seeds": rows["seeds"], "n": rows["n"].astype(str), "gap closed": rows["gap_closed"].map(_pct),
        "lowest seed at an evaluation (step)": [f"{_f(a)} ({int(s)})"
                                                for a, s in zip(rows["greedy_accuracy"], rows["step"])],
    })


def _references(root: Path) -> pd.DataFrame:
    """The teacher's and the warm-up student's accuracy per task (``04_references.csv``) and the upper end of the
    warm-up's 95% interval (``04_final.csv``)."""
    refs = _data(root, "04_references.csv").pivot(index="task", columns="role", values="value")
    high = _data(root, "04_final.csv").groupby("task")["warm_up_high"].first()
    return pd.DataFrame({"task": refs.index, "teacher": refs["teacher"].map(_f),
                         "warm-up student": refs["student"].map(_f),
                         "warm-up's 95% upper bound": high[refs.index].map(_f)})


def headline(root: Path) -> str:
    """README's table: each arm's final accuracy per task (mean ± 95% t half-width over seeds, gap closed)."""
    final = _data(root, "04_final.csv")
    cells = final.assign(arm=[_arm(m, d) for m, d in zip(final["method"], final["divergence"])],
                         cell=[f"{_f(m)} ± {_f(c)} ({_pct(g)})"
                               for m, c, g in zip(final["mean"], final["ci"], final["gap_closed"])])
    cells = cells.sort_values(["method", "divergence"], key=_order, kind="stable")
    table = cells.pivot_table(index="arm", columns="task", values="cell", aggfunc="first", sort=False)
    refs = final.groupby("task").first()
    for role, column in (("teacher", "teacher"), ("warm-up student", "warm_up")):
        table.loc[role] = [_f(refs.loc[task, column]) for task in table.columns]
    table.columns = [task.replace("_", " ") for task in table.columns]
    n = ", ".join(f"{t.replace('_', ' ')} {k}" for t, k in final.groupby("task")["n"].max().items())
    return _table(table.reset_index()) + "\n\n" + _prose(
        f"Held-out greedy accuracy at the last step, mean ± 95% t-interval half-width over seeds (seeds per arm: "
        f"{n}), rounded to 3 decimals; in brackets the fraction of the warm-up → teacher gap closed, to whole "
        f"percent.")


# -- the other notebooks ---------------------------------------------------------------------------------------

def _doc(*parts: str | pd.DataFrame) -> str:
    """Paragraphs (wrapped) and tables (a DataFrame of formatted cells), a blank line apart."""
    return "\n\n".join(_table(p) if isinstance(p, pd.DataFrame) else _prose(p) for p in parts)


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
                             "method": ends["method"].map(lambda m: method_style(m)["label"]),
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
    frame = pd.DataFrame({"method": fin["method"].map(lambda m: method_style(m)["label"]),
                          "divergence": fin["divergence"].map(divergence_title), "task": fin["task"],
                          "reverse KL before": fin["exact_reverse_kl_before"].map(lambda x: _f(x, 2)),
                          "reverse KL after": fin["exact_reverse_kl_after"].map(lambda x: _f(x, 2)),
                          "accuracy before": fin["greedy_accuracy_before"].map(_f),
                          "accuracy after": fin["greedy_accuracy_after"].map(_f),
                          "teacher accuracy": fin["teacher_accuracy"].map(_f)})
    return _doc("A layer-dropped SmolLM2 student: the exact per-token reverse KL to the teacher (nats, 2 "
                "decimals) and held-out greedy accuracy, before and after distillation.", frame)


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
    runs = _data(root, "09_tradeoff.csv")
    means = runs.groupby(["clip", "gamma", "baseline"], sort=False).agg(
        accuracy=("greedy_accuracy", "mean"), seeds=("seed", "nunique"),
        variance=("relative_variance", "mean")).reset_index()
    rho = means["accuracy"].corr(means["variance"], method="spearman")
    frame = pd.DataFrame({"clip": means["clip"], "γ": means["gamma"].map(str), "baseline": means["baseline"],
                          "final accuracy": means["accuracy"].map(_f), "seeds": means["seeds"].astype(str),
                          "relative step variance": means["variance"].map(lambda x: _f(x, 2))})
    return _doc("OPD+ forward KL on arithmetic: the final held-out greedy accuracy (mean over seeds, 3 decimals) "
                "and the relative variance of one step's gradient (2 decimals) per variant.", frame,
                f"Spearman correlation of the variants' variance and accuracy: {_f(rho, 2)}.")


def _students(root: Path) -> str:
    return _doc("The final held-out greedy accuracy per arm: mean ± 95% t-interval half-width over seeds "
                "(3 decimals), each seed's value (2 decimals), the fraction of the warm-up → teacher gap closed "
                "(whole percent) and the lowest accuracy any seed had at an evaluation on the way.",
                final_accuracy(root), "References (held-out greedy accuracy, 3 decimals):", _references(root))


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
                f"{measured / bound:.1f}× its bound. The sweep spreads the runs over its worker processes, so their "
                f"wall time is about these minutes over the workers, and so is the bound.")


REGIONS: dict[str, Callable[[Path], str]] = {"headline": headline, "main_job": main_job,
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
