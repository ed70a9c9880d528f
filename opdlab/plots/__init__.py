"""Plotting: tidy DataFrame in, matplotlib Figure out. ``save_figure`` writes PNG and SVG.

Submodules hold the figures of one part of the project (``plots.toy``, ``plots.training``); every function
takes a tidy DataFrame (the same one written to ``figures/data/*.csv``) and returns a Figure.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

__all__ = ["save_figure", "save_data", "METHOD_STYLE", "method_style", "figures_dir"]

METHOD_STYLE = {
    "opd": dict(color="#d62728", linestyle="--", label="OPD (stop-gradient)"),
    "opd_plus": dict(color="#1f77b4", linestyle="-", label="OPD+"),
}


def method_style(method: str) -> dict:
    """Colour, line style and legend label of a method, the same in every figure."""
    return METHOD_STYLE.get(method, dict(color="gray", linestyle=":", label=method))


def figures_dir(path: str | os.PathLike | None = None) -> Path:
    """The figures folder: ``path`` if given, else $OPDLAB_FIGURES, else ``figures/`` at the repository root."""
    if path is None:
        path = os.environ.get("OPDLAB_FIGURES") or Path(__file__).resolve().parents[2] / "figures"
    out = Path(path)
    (out / "data").mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig: plt.Figure, name: str, directory: str | os.PathLike | None = None,
                formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``<directory>/<name>.<fmt>`` for each format; return the paths.

    ``name`` is the file stem, by convention prefixed with the notebook number (``"02_bias_vs_samples"``).
    """
    out = figures_dir(directory)
    paths = []
    for fmt in formats:
        p = out / f"{name}.{fmt}"
        with plt.rc_context({"svg.hashsalt": name}):  # stable element ids: a rerun rewrites the same SVG
            fig.savefig(p, dpi=130, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        paths.append(p)
    return paths


def save_data(df, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Write the tidy DataFrame behind a figure to ``<directory>/data/<name>.csv``; return the path."""
    p = figures_dir(directory) / "data" / f"{name}.csv"
    df.to_csv(p, index=False)
    return p
