"""Figures of notebooks 01-03: the derived advantages, estimator error on categorical toys, toy training, and
the gamma trade-off on sequences. Every function takes the tidy DataFrame written to ``figures/data/``
(``opdlab.exact.symbolic.advantage_curves``, ``opdlab.experiments.montecarlo.*``) and returns a Figure.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from opdlab.app.plots import divergence_title, grid, method_style

__all__ = ["advantage_curves_figure", "error_vs_samples_figure", "cosine_figure", "variance_figure",
           "training_figure", "gamma_tradeoff_figure"]

BASELINE_STYLE = {
    "none": dict(color="#7f7f7f", marker="o", label="no baseline"),
    "expected": dict(color="#2ca02c", marker="s", label="b = E_a[A] (exact)"),
    "loo": dict(color="#9467bd", marker="^", label="leave-one-out"),
}


def _style(method: str, **overrides) -> dict:
    style = dict(method_style(method))
    style.update(overrides)
    return style


def advantage_curves_figure(curves: pd.DataFrame) -> plt.Figure:
    """-f(u) (stop-gradient OPD) against w_f(u) = -f + u f' (OPD+) over log u, one panel per divergence.

    The vertical gap between the two curves is the stop-gradient error u f'(u); only where it is a constant
    (reverse KL) do the curves stay parallel.
    """
    names = list(dict.fromkeys(curves["divergence"]))
    fig, axes = grid(len(names))
    for ax, name in zip(axes, names):
        d = curves[curves["divergence"] == name]
        for method in ("opd", "opd_plus"):
            label = "-f(u)  (OPD)" if method == "opd" else "w_f(u) = -f + u f'  (OPD+)"
            ax.plot(d["log_u"], d[method], **_style(method, label=label))
        ax.axhline(0, color="black", linewidth=0.5)
        ax.axvline(0, color="black", linewidth=0.5)
        lo, hi = np.nanpercentile(d[["opd", "opd_plus"]].to_numpy(), [2, 98])
        pad = 0.1 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(divergence_title(name))
        ax.set_xlabel("log u = log π_T − log π_θ")
    axes[0].set_ylabel("advantage")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def error_vs_samples_figure(study: pd.DataFrame, metric: str = "relative_error") -> plt.Figure:
    """Error of the n-sample estimate against n on log-log axes, one panel per divergence, averaged over toys.

    Stop-gradient OPD flattens at its bias; OPD+ keeps falling like 1/sqrt(n) (dotted guide).
    """
    mean = study.groupby(["divergence", "method", "n_samples"], sort=False)[metric].mean().reset_index()
    names = list(dict.fromkeys(mean["divergence"]))
    fig, axes = grid(len(names), sharex=True)
    for ax, name in zip(axes, names):
        d = mean[mean["divergence"] == name]
        for method, dm in d.groupby("method", sort=False):
            ax.plot(dm["n_samples"], dm[metric], marker="o", markersize=3, **_style(method))
        plus = d[d["method"] == "opd_plus"]
        if len(plus):
            n = plus["n_samples"].to_numpy()
            scale = np.exp(np.mean(np.log(plus[metric].to_numpy()) + 0.5 * np.log(n)))  # best c in c/sqrt(N)
            ax.plot(n, scale / np.sqrt(n), color="black", linestyle=":", linewidth=1, label="∝ 1/√N")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(divergence_title(name))
        ax.set_xlabel("samples N")
    axes[0].set_ylabel(metric.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def cosine_figure(cosines: pd.DataFrame) -> plt.Figure:
    """Cosine of the estimator's expectation E[g] to the true gradient, one dot per random toy, per divergence.

    OPD+ sits at 1 everywhere; stop-gradient OPD scatters, and for forward KL points the wrong way.
    """
    names = list(dict.fromkeys(cosines["divergence"]))
    methods = list(dict.fromkeys(cosines["method"]))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    rng = np.random.default_rng(0)  # jitter only
    for j, method in enumerate(methods):
        style = method_style(method)
        for i, name in enumerate(names):
            c = cosines[(cosines["divergence"] == name) & (cosines["method"] == method)]["cosine"].to_numpy()
            y = i + (j - (len(methods) - 1) / 2) * 0.3 + rng.uniform(-0.06, 0.06, len(c))
            ax.scatter(c, y, s=8, alpha=0.4, color=style["color"], label=style["label"] if i == 0 else None)
            ax.plot([c.mean()], [i + (j - (len(methods) - 1) / 2) * 0.3], marker="|", markersize=14,
                    color="black")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("cos(E[estimator], ∇D_f)   (bar: mean over toys)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def variance_figure(study: pd.DataFrame) -> plt.Figure:
    """Per-sample variance tr Cov(g) of each estimator, per divergence (log scale), averaged over toys."""
    mean = study.groupby(["divergence", "method"], sort=False)["variance"].mean().reset_index()
    names = list(dict.fromkeys(mean["divergence"]))
    methods = list(dict.fromkeys(mean["method"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.2))
    width = 0.8 / len(methods)
    x = np.arange(len(names))
    for j, method in enumerate(methods):
        v = mean[mean["method"] == method].set_index("divergence").reindex(names)["variance"]
        style = method_style(method)
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, v, width, color=style["color"], label=style["label"])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("per-sample variance tr Cov(g)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_figure(history: pd.DataFrame, value: str = "D_f") -> plt.Figure:
    """``value`` (the trained D_f by default) over gradient steps, one panel per divergence (log y).

    A run that blew up (a token's probability reached 0) ends with an x.
    """
    names = list(dict.fromkeys(history["divergence"]))
    fig, axes = grid(len(names), sharex=True)
    for ax, name in zip(axes, names):
        d = history[history["divergence"] == name]
        for method, dm in d.groupby("method", sort=False):
            finite = dm[np.isfinite(dm[value])]
            style = _style(method)
            ax.plot(finite["step"], finite[value], **style)
            if len(finite) < len(dm):
                ax.plot(finite["step"].iloc[-1:], finite[value].iloc[-1:], marker="x", markersize=9,
                        color=style["color"], linestyle="none")
        ax.set_yscale("log")
        ax.set_title(divergence_title(name))
        ax.set_xlabel("step")
    axes[0].set_ylabel(value if value != "D_f" else "D_f(π_T ‖ π_θ)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def gamma_tradeoff_figure(study: pd.DataFrame, method: str = "opd_plus") -> plt.Figure:
    """Sequences, one row per divergence: exact bias against the sequence gradient and against the
    token-local gradient as gamma goes 0 -> 1 (both methods), then ``method``'s per-sample variance (exact
    where enumerable, sampled for leave-one-out) and n-sample RMSE for each baseline."""
    names = list(dict.fromkeys(study["divergence"]))
    fig, axes = plt.subplots(len(names), 3, figsize=(11, 2.7 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        d = study[study["divergence"] == name]
        no_baseline = d[d["baseline"] == d["baseline"].iloc[0]]
        for m, dm in no_baseline.groupby("method", sort=False):
            row[0].plot(dm["gamma"], dm["bias_sequence"], marker="o", markersize=3,
                        **_style(m, label=f"{method_style(m)['label']} vs ∇J (sequence)"))
            row[0].plot(dm["gamma"], dm["bias_token_local"], marker="s", markersize=3,
                        **_style(m, linestyle=":", label=f"{method_style(m)['label']} vs token-local"))
        dm = d[d["method"] == method]
        for baseline, db in dm.groupby("baseline", sort=False):
            style = BASELINE_STYLE.get(baseline, dict(label=baseline))
            exact = db["variance_exact"] if "variance_exact" in db else db["variance"]
            row[1].plot(db["gamma"], exact.fillna(db["variance"]), **style)
            row[2].plot(db["gamma"], db["rmse_sequence"], **style)
        row[0].set_ylabel(f"{divergence_title(name)}\n‖E[g] − target‖")
        row[1].set_ylabel("per-sample variance")
        row[2].set_ylabel(f"RMSE vs ∇J, N={int(d['n_samples'].iloc[0])}")
        for ax in row:
            ax.set_xlabel("γ")
    axes[0][0].set_title("exact bias")
    axes[0][1].set_title(f"variance ({method_style(method)['label']})")
    axes[0][2].set_title(f"error ({method_style(method)['label']})")
    for ax in axes[0][:2]:
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, ncol=2, loc="upper left" if ax is axes[0][0] else "upper right",
                   bbox_to_anchor=(0.0, 0.0) if ax is axes[0][0] else (1.0, 0.0))
    fig.tight_layout()
    return fig
