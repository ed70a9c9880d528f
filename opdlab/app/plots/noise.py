"""Figures of notebooks 08 and 09: the noise of the sampled OPD estimator on a real student.

``cosine_figure`` takes the frames of ``opdlab.experiments.noise.cosine_curves`` and
``opdlab.experiments.noise.noise_table``; ``log_u_figure`` the frame of ``opdlab.experiments.noise.sampled_tokens``;
``tradeoff_figure`` a frame of final accuracies beside ``opdlab.experiments.noise.step_noise`` measurements. All return
a Figure.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["cosine_figure", "log_u_figure", "tradeoff_figure"]


def cosine_figure(curves: pd.DataFrame, table: pd.DataFrame,
                  tokens_per_step: dict[str, float] | None = None) -> plt.Figure:
    """Expected cosine of one step's sampled gradient to the exact token-local gradient against the tokens in
    the step, ``1 / sqrt(1 + B_noise / n)`` (``curves``), one curve per variant; the measured one-draw cosines
    at the rollout's own size as points (``table``); ``tokens_per_step`` marks batch shapes (label -> tokens)
    as vertical lines."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sns.lineplot(data=curves, x="tokens", y="cosine", hue="variant", ax=ax)
    palette = dict(zip(table["variant"], sns.color_palette(n_colors=len(table))))
    for row in table.itertuples():
        ax.errorbar(row.tokens, row.cos_mean, yerr=[[row.cos_mean - row.cos_min], [row.cos_max - row.cos_mean]],
                    fmt="o", color=palette[row.variant], capsize=3, markersize=4)
    for label, tokens in (tokens_per_step or {}).items():
        ax.axvline(tokens, color="gray", linestyle=":", linewidth=1)
        ax.annotate(label, (tokens, 0.02), rotation=90, fontsize=7, color="gray", ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("sampled tokens per step")
    ax.set_ylabel("cosine to the exact gradient")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=None)
    fig.tight_layout()
    return fig


def log_u_figure(tokens: pd.DataFrame) -> plt.Figure:
    """Left: the distribution of log u at the sampled tokens (log count). Right: each token's squared advantage
    against its log u, the heavy left tail where the teacher rules out what the student sampled."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.6, 3.2))
    sns.histplot(data=tokens, x="log_u", bins=60, ax=left, color="#1f77b4")
    left.set_yscale("log")
    left.set_xlabel("log u = log π_T − log π_θ at the sampled token")
    sns.scatterplot(x=tokens["log_u"], y=tokens["advantage"] ** 2, s=6, alpha=0.4, ax=right, color="#d62728",
                    edgecolor=None)
    right.set_yscale("log")
    right.set_xlabel("log u")
    right.set_ylabel("squared advantage A²")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def tradeoff_figure(points: pd.DataFrame, references: dict[str, float] | None = None) -> plt.Figure:
    """Final held-out accuracy against the relative variance of one step's gradient, one point per run (seed):
    colour = γ, marker = baseline, one panel per clip setting (``points``: columns ``gamma, baseline, clip,
    seed, relative_variance, greedy_accuracy``). ``references`` (label -> accuracy) are drawn as horizontal lines
    (the teacher, the warm-up student)."""
    data = points.assign(gamma=points["gamma"].map(lambda g: f"γ = {g:g}"))
    grid_ = sns.relplot(data=data, x="relative_variance", y="greedy_accuracy", hue="gamma", style="baseline",
                        col="clip", kind="scatter", s=55, alpha=0.85, height=3.3, aspect=1.1,
                        facet_kws=dict(sharey=True, sharex=True))
    for ax in grid_.axes.flat:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        for (label, value), style in zip((references or {}).items(), (":", "-.")):
            ax.axhline(value, color="gray", linestyle=style, linewidth=1)
            ax.text(0.99, value, label, transform=ax.get_yaxis_transform(), fontsize=7, color="gray", ha="right",
                    va="bottom")
    grid_.set_axis_labels("step variance tr Cov[ĝ] / |E ĝ|²", "held-out greedy accuracy")
    grid_.set_titles("{col_name}")
    return grid_.figure


def variance_figure(variance: pd.DataFrame) -> plt.Figure:
    """The relative variance of one step's gradient per variant (``variance``: columns ``gamma, baseline, clip,
    relative_variance, log_relative_variance_se``), with ± 2 jackknife standard errors on the log scale: x = γ,
    colour = baseline, one panel per clip setting."""
    clips = list(dict.fromkeys(variance["clip"]))
    fig, axes = plt.subplots(1, len(clips), figsize=(3.6 * len(clips), 3.0), sharey=True, squeeze=False)
    baselines = list(dict.fromkeys(variance["baseline"]))
    for ax, clip in zip(axes[0], clips):
        part = variance[variance["clip"] == clip]
        for i, b in enumerate(baselines):
            rows = part[part["baseline"] == b].sort_values("gamma")
            x = rows["gamma"].to_numpy() + (i - (len(baselines) - 1) / 2) * 0.04
            rv, se = rows["relative_variance"].to_numpy(), rows["log_relative_variance_se"].to_numpy()
            ax.errorbar(x, rv, yerr=[rv - rv * np.exp(-2 * se), rv * np.exp(2 * se) - rv], fmt="o-", ms=4,
                        capsize=2, label=f"baseline {b}")
        ax.set_yscale("log")
        ax.set_xlabel("γ")
        ax.set_title(clip, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("step variance tr Cov[ĝ] / |E ĝ|²")
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
