"""Figures of notebook 04: students trained by OPD and OPD+ on the embedded tasks.

Each function takes the tidy DataFrame of evaluation records (``opdlab.runlog.results``: one row per run and
evaluation step, with ``task, divergence, method, seed, step`` and the metrics) and returns a Figure.
Across seeds a curve is the mean with a 95% band, mean +- t_{0.975, n-1} * sd / sqrt(n).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from scipy import stats

from opdlab.plots import divergence_title, grid, method_style

__all__ = ["mean_band", "curves_figure", "final_table"]

REFERENCE_STYLE = {
    "teacher": dict(color="black", linestyle=":", linewidth=1.2, label="teacher"),
    "student": dict(color="#7f7f7f", linestyle="-.", linewidth=1.2, label="warm-up student"),
}


def mean_band(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Mean of ``metric`` over seeds per group, with n, sd and the 95% t-interval half-width ``ci`` (NaN for a
    single seed, where no interval exists; the figures then draw no band)."""
    g = df.groupby(by)[metric]
    out = g.agg(mean="mean", sd="std", n="count").reset_index()
    tq = out["n"].map(lambda n: stats.t.ppf(0.975, n - 1) if n > 1 else float("nan"))
    out["ci"] = tq * out["sd"] / out["n"] ** 0.5
    return out


def curves_figure(evals: pd.DataFrame, metric: str = "greedy_accuracy", references: pd.DataFrame | None = None,
                  ylabel: str | None = None) -> plt.Figure:
    """``metric`` against step, one panel per (task, divergence), OPD and OPD+ with 95% bands over seeds.

    ``references``: rows ``task, role, value`` (role ``"teacher"`` or ``"student"``) drawn as horizontal lines.
    """
    panels = list(dict.fromkeys(zip(evals["task"], evals["divergence"])))
    n_cols = len(dict.fromkeys(evals["divergence"]))
    fig, axes = grid(len(panels), n_cols=n_cols, size=(3.4, 2.7), sharey=True)
    curves = mean_band(evals, ["task", "divergence", "method", "step"], metric)
    for ax, (task, div) in zip(axes, panels):
        for method, c in curves[(curves["task"] == task) & (curves["divergence"] == div)].groupby("method"):
            style = method_style(method)
            ax.plot(c["step"], c["mean"], color=style["color"], linestyle=style["linestyle"], label=style["label"])
            low, high = c["mean"] - c["ci"], c["mean"] + c["ci"]
            if metric.endswith("accuracy"):  # a band never leaves [0, 1]; with 2 seeds t_0.975 = 12.7 is wide
                low, high = low.clip(0, 1), high.clip(0, 1)
            ax.fill_between(c["step"], low, high, color=style["color"], alpha=0.18)
        if references is not None:
            for _, ref in references[references["task"] == task].iterrows():
                ax.axhline(ref["value"], **REFERENCE_STYLE.get(ref["role"], {}))
        if metric.endswith("accuracy"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task} · {divergence_title(div)}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel or metric.replace("_", " "))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def final_table(evals: pd.DataFrame, metric: str = "greedy_accuracy") -> pd.DataFrame:
    """The last evaluation of every run, averaged over seeds: ``task, divergence, method, mean, ci, n`` and a
    ``seeds`` column listing the per-seed values."""
    last = evals[evals["step"] == evals.groupby("run")["step"].transform("max")]
    table = mean_band(last, ["task", "divergence", "method"], metric)
    per_seed = last.sort_values("seed").groupby(["task", "divergence", "method"])[metric].agg(
        lambda s: " ".join(f"{v:.2f}" for v in s)).rename("seeds").reset_index()
    return table.merge(per_seed, on=["task", "divergence", "method"])[
        ["task", "divergence", "method", "mean", "ci", "n", "seeds"]]
