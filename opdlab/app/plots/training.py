"""Figures of notebook 04: students trained by OPD and OPD+ on the embedded tasks.

Each function takes the tidy DataFrame of evaluation records (``opdlab.rundir.reader.results``: one row per run and
evaluation step, with ``task, divergence, method, seed, step`` and the metrics) and returns a Figure.
Across seeds a curve is the mean with its 95% t-interval, mean +- t_{0.975, n-1} * sd / sqrt(n) (seaborn).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from scipy import stats

from opdlab.app.plots import divergence_title, method_style

__all__ = ["t_half_width", "t_interval", "mean_band", "curves_figure", "final_table"]

REFERENCE_STYLE = {
    "teacher": dict(color="black", linestyle=":", linewidth=1.2, label="teacher"),
    "student": dict(color="#7f7f7f", linestyle="-.", linewidth=1.2, label="warm-up student"),
}


def t_half_width(sd, n, level: float = 0.95):
    """Half-width of the t-interval of a mean, ``t_{(1+level)/2, n-1} * sd / sqrt(n)``; NaN where n < 2."""
    n = np.asarray(n, dtype=float)
    tq = np.where(n > 1, stats.t.ppf((1 + level) / 2, np.maximum(n - 1, 1)), np.nan)
    return tq * np.asarray(sd, dtype=float) / np.sqrt(n)


def t_interval(values, level: float = 0.95, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """``(low, high)``, the t-interval of the mean of ``values`` (seaborn's ``errorbar`` callable), clipped to
    ``bounds``; a single value has no interval (NaN)."""
    v = np.asarray(values, dtype=float)
    half = float(t_half_width(v.std(ddof=1) if len(v) > 1 else np.nan, len(v), level))
    low, high = v.mean() - half, v.mean() + half
    return (low, high) if bounds is None else (max(low, bounds[0]), min(high, bounds[1]))


def mean_band(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Mean of ``metric`` over seeds per group, with n, sd and the 95% t-interval half-width ``ci`` (NaN for a
    single seed, where no interval exists; the figures then draw no band)."""
    out = df.groupby(by)[metric].agg(mean="mean", sd="std", n="count").reset_index()
    out["ci"] = t_half_width(out["sd"], out["n"])
    return out


def curves_figure(evals: pd.DataFrame, metric: str = "greedy_accuracy", references: pd.DataFrame | None = None,
                  ylabel: str | None = None, note: str | None = None) -> plt.Figure:
    """``metric`` against step, one panel per (task, divergence), one line per method: the mean over seeds with
    its 95% t-interval (``seaborn.relplot``, ``errorbar=t_interval``; an accuracy band stays inside [0, 1]).

    ``references``: rows ``task, role, value`` (role ``"teacher"`` or ``"student"``) drawn as horizontal lines.
    ``note``: a line under the legend naming the estimator settings every arm shares (baseline, clip, batch).
    """
    data = evals.assign(panel=[f"{t} · {divergence_title(d)}" for t, d in zip(evals["task"], evals["divergence"])])
    if "teacher_topk" in data:  # a run that sees only the teacher's top-k is an arm of its own
        data["method"] = data["method"].where(data["teacher_topk"].isna(), "opd_plus_topk")
    methods = list(dict.fromkeys(data["method"]))
    styles = {m: method_style(m) for m in methods}
    bounds = (0.0, 1.0) if metric.endswith("accuracy") else None
    n_cols = len(dict.fromkeys(data["divergence"]))
    grid_ = sns.relplot(data=data, x="step", y=metric, hue="method", style="method", col="panel", col_wrap=n_cols,
                        kind="line", errorbar=lambda v: t_interval(v, bounds=bounds), hue_order=methods,
                        palette={m: st["color"] for m, st in styles.items()},
                        dashes={m: _dashes(st["linestyle"]) for m, st in styles.items()},
                        height=2.7, aspect=1.25, facet_kws=dict(sharey=True), legend=False)
    tasks = dict(zip(data["panel"], data["task"]))
    for panel, ax in grid_.axes_dict.items():
        if references is not None:
            for _, ref in references[references["task"] == tasks[panel]].iterrows():
                ax.axhline(ref["value"], **REFERENCE_STYLE.get(ref["role"], {}))
        if bounds:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
    grid_.set_axis_labels("step", ylabel or metric.replace("_", " "))
    first = next(iter(grid_.axes_dict.values()))
    handles = [plt.Line2D([], [], color=styles[m]["color"], linestyle=styles[m]["linestyle"], label=styles[m]["label"])
               for m in methods]
    handles += [h for h in first.get_lines() if h.get_label() in ("teacher", "warm-up student")]
    n_rows = -(-len(handles) // 3)
    grid_.figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), frameon=False,
                        bbox_to_anchor=(0.5, -0.02), title=note, title_fontsize=8, fontsize=8)
    legend_inches = 0.15 + 0.22 * n_rows + (0.2 if note else 0.0)
    grid_.figure.tight_layout(rect=(0, legend_inches / grid_.figure.get_figheight(), 1, 1))
    return grid_.figure


def _dashes(linestyle: str):
    """seaborn's dash spec of a matplotlib line style."""
    if isinstance(linestyle, tuple):  # matplotlib's (offset, on-off sequence)
        return linestyle[1]
    return {"-": "", "--": (4, 2), ":": (1, 2), "-.": (4, 1.5, 1, 1.5)}.get(linestyle, "")


def final_table(evals: pd.DataFrame, metric: str = "greedy_accuracy") -> pd.DataFrame:
    """The last evaluation of every run, averaged over seeds: ``task, divergence, method, mean, ci, n`` and a
    ``seeds`` column listing the per-seed values."""
    last = evals[evals["step"] == evals.groupby("run")["step"].transform("max")]
    table = mean_band(last, ["task", "divergence", "method"], metric)
    per_seed = last.sort_values("seed").groupby(["task", "divergence", "method"])[metric].agg(
        lambda s: " ".join(f"{v:.2f}" for v in s)).rename("seeds").reset_index()
    return table.merge(per_seed, on=["task", "divergence", "method"])[
        ["task", "divergence", "method", "mean", "ci", "n", "seeds"]]


def comparisons_figure(table: pd.DataFrame, note: str | None = None) -> plt.Figure:
    """Each paired comparison of ``experiments.comparisons.ask`` as a point (the difference in accuracy, in
    points) with its 95% interval, one row per question; filled where Holm rejects, hollow where it does not,
    and gray ticks at ± the smallest difference the design detects. Two panels with their own scales: against
    the warm-up (a, b) and between trained arms (c-f), whose differences are an order of magnitude smaller."""
    rows = table.reset_index(drop=True)
    parts = [(title, rows[rows["question"].isin(qs)]) for title, qs in
             (("against the warm-up student", ("a", "b")), ("between trained arms", ("c", "d", "e", "f")))]
    parts = [(t, p) for t, p in parts if len(p)]
    fig, axes = plt.subplots(len(parts), 1, figsize=(7.5, 0.3 * len(rows) + 1.0 + 0.5 * len(parts)), squeeze=False,
                             gridspec_kw=dict(height_ratios=[len(p) + 1 for _, p in parts]))
    several = rows["task"].nunique() > 1
    for ax, (title, part) in zip(axes[:, 0], parts):
        y = np.arange(len(part))[::-1]
        for yi, r in zip(y, part.to_dict("records")):
            color = "#1f77b4" if r["estimate"] >= 0 else "#d62728"
            ax.plot([100 * r["lo"], 100 * r["hi"]], [yi, yi], color=color, lw=1.5)
            ax.plot(100 * r["estimate"], yi, "o", color=color, mfc=color if r["p_holm"] < 0.05 else "white", ms=5)
            for side in (-1, 1):
                ax.plot(side * 100 * r["mde"], yi, "|", color="gray", ms=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [f"({r['question']}) {r['a']} − {r['b']}" + (f" [{r['task']}]" if several else "")
                          for r in part.to_dict("records")], fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("difference in held-out greedy accuracy, points (95% interval)")
    fig.suptitle(note or "paired over seeds x items; filled: significant after Holm over the family; gray ticks: "
                 "± the difference this design detects", fontsize=8)
    fig.tight_layout()
    return fig
