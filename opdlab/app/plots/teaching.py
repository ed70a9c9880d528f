"""The data and figures behind the teaching widgets, as plain functions (papermill keeps no widget state).

Each widget in ``opdlab.app.widgets`` is a view over one ``*_frame`` function (returns a tidy DataFrame) and one
``plot_*`` function (DataFrame in, Figure out). The figures are built on ``matplotlib.figure.Figure``, not
pyplot, so a widget callback that makes one leaves nothing behind for the inline backend to show twice.

    >>> from opdlab.app.plots.teaching import advantage_curves_frame, plot_advantage_curves
    >>> fig = plot_advantage_curves(advantage_curves_frame("forward_kl"))
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from opdlab.app.plots import method_style
from opdlab.config.choices import METHODS
from opdlab.core.divergences import Divergence, get
from opdlab.errors import UserError
from opdlab.exact import symbolic, toy as toys
from opdlab.experiments.montecarlo import cosine

__all__ = ["ADVANTAGE_QUANTITIES", "advantage_curves_frame", "plot_advantage_curves", "categorical_frame",
           "plot_categorical", "training_race_frame", "plot_training_race", "figure_png"]

#: quantity -> (legend label, colour, line style) of the explorer's curves; the methods share METHOD_STYLE.
ADVANTAGE_QUANTITIES = {
    "f": ("f(u), the objective's integrand", "black", "-"),
    "opd": ("-f(u), stop-gradient OPD advantage", method_style("opd")["color"], method_style("opd")["linestyle"]),
    "opd_plus": ("w_f(u) = -f(u) + u f'(u), OPD+ advantage", method_style("opd_plus")["color"],
                 method_style("opd_plus")["linestyle"]),
    "error": ("u f'(u), what the stop-gradient drops", "#2ca02c", ":"),
}


def advantage_curves_frame(divergence: str | Divergence, log_u_min: float = -3.0, log_u_max: float = 3.0,
                           n_points: int = 241) -> pd.DataFrame:
    """f(u), -f(u), w_f(u) and u f'(u) on a grid of log u, as a tidy (long) DataFrame.

    The curves are ``opdlab.exact.symbolic.advantage_curves`` (sympy's derivation, checked against the registry)
    with f = -(-f) added. Columns: ``divergence``, ``label``, ``log_u``, ``u``, ``quantity`` (a key of
    ADVANTAGE_QUANTITIES), ``value``. Raises UserError for an unknown divergence or an invalid range.
    """
    if not (np.isfinite(log_u_min) and np.isfinite(log_u_max)) or not log_u_min < log_u_max:
        raise UserError(f"the log u range must be finite with min < max, got [{log_u_min}, {log_u_max}]")
    wide = symbolic.advantage_curves([get(divergence)], float(log_u_min), float(log_u_max), int(n_points))
    wide["f"] = -wide["opd"]
    return wide.melt(id_vars=["divergence", "label", "log_u", "u"], value_vars=list(ADVANTAGE_QUANTITIES),
                     var_name="quantity", value_name="value")


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


# ---------------------------------------------------------------------------------------------------------
# Categorical playground: one context, K tokens, exact and sampled gradients (opdlab.exact.toy).


def categorical_frame(divergence: str | Divergence, toy: toys.CategoricalToy, n_samples: int | None = None,
                      seed: int = 0) -> pd.DataFrame:
    """The playground's numbers for one toy, as a tidy DataFrame with one row per (token, quantity).

    Quantities: ``p_student``, ``p_teacher``; ``exact`` (grad_theta D_f by autograd); ``expected_<method>``
    (the exact expectation of the REINFORCE estimator of each method); and, when ``n_samples`` is given,
    ``sampled_<method>`` (the mean of ``n_samples`` per-sample gradients drawn with ``seed``) with its
    standard error in ``stderr``. Gradients are with respect to the student's logits theta. Other columns:
    ``divergence``, ``label``, ``n_samples`` (0 when not sampled).
    """
    div = get(divergence)
    tokens = np.arange(toy.n_tokens)
    parts = {"p_student": (toy.logp_student_K.exp(), None), "p_teacher": (toy.logp_teacher_K.exp(), None),
             "exact": (toys.exact_gradient(div, toy), None)}
    for method in METHODS:
        parts[f"expected_{method}"] = (toys.expected_estimator_gradient(div, toy, method), None)
    if n_samples is not None:
        generator = toys.as_generator(seed)  # one stream, so the two methods see different samples
        for method in METHODS:
            g_NK = toys.sample_gradients(div, toy, method, n_samples, generator)
            stderr = g_NK.std(0) / np.sqrt(n_samples) if n_samples > 1 else torch.full_like(g_NK[0], np.nan)
            parts[f"sampled_{method}"] = (g_NK.mean(0), stderr)
    return pd.concat(
        [pd.DataFrame({"divergence": div.name, "label": div.label, "token": tokens, "quantity": q,
                       "value": v.detach().numpy(), "stderr": np.nan if e is None else e.detach().numpy(),
                       "n_samples": n_samples or 0}) for q, (v, e) in parts.items()],
        ignore_index=True,
    )


def plot_categorical(df: pd.DataFrame) -> Figure:
    """The playground's figure from ``categorical_frame``.

    Left: both distributions as bars. Right: the logit update each gradient asks for, -grad_theta D_f (a bar
    above zero means the token gains probability), for the exact gradient and the expected stop-gradient and
    OPD+ estimators, with the cosine of each to the exact one; sampled means, if present, as dots with ±2
    standard errors.
    """
    value = {q: part.sort_values("token") for q, part in df.groupby("quantity")}
    tokens = value["exact"]["token"].to_numpy()
    exact = value["exact"]["value"].to_numpy()
    fig = Figure(figsize=(10.5, 3.9), layout="constrained")
    ax_p, ax_g = fig.subplots(1, 2, width_ratios=(1, 1.5))
    width = 0.4
    ax_p.bar(tokens - width / 2, value["p_student"]["value"], width, color="#9467bd", label="student π_θ")
    ax_p.bar(tokens + width / 2, value["p_teacher"]["value"], width, color="#7f7f7f", label="teacher π_T")
    ax_p.set(xlabel="token a", ylabel="probability", title="the two distributions", xticks=tokens)
    ax_p.legend(frameon=False, fontsize=8)

    def cos_to_exact(x: np.ndarray) -> float:
        return float(cosine(torch.from_numpy(x), torch.from_numpy(exact)))

    width = 0.27
    ax_g.bar(tokens - width, -exact, width, color="black", label="exact, -∇D_f")
    for shift, method in zip((0.0, width), METHODS):
        style = method_style(method)
        expected = value[f"expected_{method}"]["value"].to_numpy()
        ax_g.bar(tokens + shift, -expected, width, color=style["color"], alpha=0.85,
                 label=f"{style['label']}, expected (cos to exact {cos_to_exact(expected):+.2f})")
        sampled = value.get(f"sampled_{method}")
        if sampled is not None:
            n = int(sampled["n_samples"].iloc[0])
            ax_g.errorbar(tokens + shift, -sampled["value"], yerr=2 * sampled["stderr"], fmt="o", ms=4,
                          color="#ff7f0e" if method == "opd" else "#17becf", capsize=2, elinewidth=1,
                          label=f"{style['label']}, mean of N={n} samples ± 2 s.e. "
                                f"(cos {cos_to_exact(sampled['value'].to_numpy()):+.2f})")
    ax_g.axhline(0.0, color="0.6", lw=0.8)
    ax_g.set(xlabel="token a", ylabel="logit update  -∇θ D_f", xticks=tokens,
             title=f"{df['label'].iloc[0]}: where each estimator moves the student")
    ax_g.legend(frameon=False, fontsize=7, loc="best")
    return fig


# ---------------------------------------------------------------------------------------------------------
# Training race: OPD and OPD+ from the same start (opdlab.exact.toy.train_categorical).


def training_race_frame(divergence: str | Divergence, toy: toys.CategoricalToy, steps: int = 200,
                        n_samples: int | None = 16, lr: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """``train_categorical`` for every method from the same toy and seed, stacked (tidy: one row per step
    and method; columns as ``opdlab.exact.toy.train_categorical``)."""
    div = get(divergence)
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise UserError(f"the learning rate must be a positive number, got {lr!r}")
    return pd.concat([toys.train_categorical(div, method, toy, steps=steps, n_samples=n_samples, lr=lr,
                                             seed=seed) for method in METHODS], ignore_index=True)


def plot_training_race(df: pd.DataFrame, yardstick: str = "tv") -> Figure:
    """The race's figure from ``training_race_frame``: the trained D_f (log scale) and, beside it,
    ``yardstick`` (a column of the frame: ``tv``, ``reverse_kl`` or ``forward_kl``) over steps, per method."""
    fig = Figure(figsize=(10.5, 3.6), layout="constrained")
    ax_d, ax_y = fig.subplots(1, 2)
    for method, part in df.groupby("method", sort=False):
        style = method_style(method)
        kwargs = dict(color=style["color"], linestyle=style["linestyle"], lw=2)
        ax_d.plot(part["step"], part["D_f"].clip(lower=1e-12), label=f"{style['label']}: "
                  f"{part['D_f'].iloc[0]:.3g} → {part['D_f'].iloc[-1]:.3g}", **kwargs)
        ax_y.plot(part["step"], part[yardstick], label=style["label"], **kwargs)
    names = {"tv": "total variation", "reverse_kl": "KL(student ‖ teacher)",
             "forward_kl": "KL(teacher ‖ student)"}
    ax_d.set(yscale="log", xlabel="step", ylabel="D_f (the trained divergence)",
             title=f"training on {get(df['divergence'].iloc[0]).label}")
    ax_y.set(xlabel="step", ylabel=names.get(yardstick, yardstick), title="a common yardstick", ylim=(0, None))
    ax_d.legend(frameon=False, fontsize=8)
    ax_y.legend(frameon=False, fontsize=8)
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure rendered as PNG bytes (what an ``ipywidgets.Image`` shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
