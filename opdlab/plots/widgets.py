"""The data and figures behind the teaching widgets, as plain functions (papermill keeps no widget state).

Each widget in ``opdlab.widgets`` is a view over one ``*_frame`` function (returns a tidy DataFrame) and one
``plot_*`` function (DataFrame in, Figure out). The figures are built on ``matplotlib.figure.Figure``, not
pyplot, so a widget callback that makes one leaves nothing behind for the inline backend to show twice.

    >>> from opdlab.plots.widgets import advantage_curves_frame, plot_advantage_curves
    >>> fig = plot_advantage_curves(advantage_curves_frame("forward_kl"))
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from opdlab.divergences import Divergence, get
from opdlab.plots import method_style

__all__ = ["ADVANTAGE_QUANTITIES", "advantage_curves_frame", "plot_advantage_curves", "figure_png"]

#: quantity -> (legend label, colour, line style) of the explorer's curves; the methods share METHOD_STYLE.
ADVANTAGE_QUANTITIES = {
    "f": ("f(u), the objective's integrand", "black", "-"),
    "opd": ("-f(u), stop-gradient OPD advantage", method_style("opd")["color"], method_style("opd")["linestyle"]),
    "opd_plus": ("w_f(u) = -f(u) + u f'(u), OPD+ advantage", method_style("opd_plus")["color"],
                 method_style("opd_plus")["linestyle"]),
    "stop_gradient_error": ("u f'(u), what the stop-gradient drops", "#2ca02c", ":"),
}


def advantage_curves_frame(divergence: str | Divergence, log_u_min: float = -3.0, log_u_max: float = 3.0,
                           n_points: int = 241) -> pd.DataFrame:
    """f(u), -f(u), w_f(u) and u f'(u) on a grid of log u, as a tidy DataFrame.

    Columns: ``divergence`` (registry name), ``label`` (its readable name), ``log_u``, ``u``, ``quantity``
    (a key of ADVANTAGE_QUANTITIES), ``value``. Raises ValueError for an unknown divergence or an empty/invalid range.
    """
    div = get(divergence)
    if not (np.isfinite(log_u_min) and np.isfinite(log_u_max)) or not log_u_min < log_u_max:
        raise ValueError(f"the log u range must be finite with min < max, got [{log_u_min}, {log_u_max}]")
    if int(n_points) < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    log_u = torch.linspace(float(log_u_min), float(log_u_max), int(n_points), dtype=torch.float64)
    values = {
        "f": div.f(log_u),
        "opd": div.opd_advantage(log_u),
        "opd_plus": div.opd_plus_advantage(log_u),
        "stop_gradient_error": div.stop_gradient_error(log_u),
    }
    return pd.concat(
        [pd.DataFrame({"divergence": div.name, "label": div.label, "log_u": log_u.numpy(),
                       "u": log_u.exp().numpy(), "quantity": q, "value": v.numpy()}) for q, v in values.items()],
        ignore_index=True,
    )


def plot_advantage_curves(df: pd.DataFrame, clip_abs: float | None = 10.0) -> Figure:
    """The explorer's figure: every quantity of ``advantage_curves_frame`` against log u.

    ``clip_abs`` limits the y axis (forward KL and Pearson grow like u and u², which would flatten the rest);
    None shows everything.
    """
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for quantity, part in df.groupby("quantity", sort=False):
        label, color, linestyle = ADVANTAGE_QUANTITIES.get(quantity, (quantity, "gray", "-"))
        ax.plot(part["log_u"], part["value"], color=color, linestyle=linestyle, label=label, lw=2)
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
    if clip_abs is not None:
        lo, hi = float(df["value"].min()), float(df["value"].max())
        pad = 0.05 * max(min(hi, clip_abs) - max(lo, -clip_abs), 1e-9)
        ax.set_ylim(max(lo, -clip_abs) - pad, min(hi, clip_abs) + pad)
    ax.set_xlabel("log u = log π_T(y) - log π_θ(y)   (u > 1: teacher likes the token more than the student)")
    ax.set_ylabel("value")
    ax.set_title(f"{df['label'].iloc[0]}: stop-gradient OPD vs OPD+ advantage")
    ax.legend(loc="best", fontsize=8, frameon=False)
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure rendered as PNG bytes (what an ``ipywidgets.Image`` shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
