"""Plotting: tidy DataFrame in, matplotlib Figure out. ``save_figure`` writes PNG and SVG.

Submodules hold the figures of one part of the project (``plots.toy``: notebooks 01-03, ``plots.training``:
notebook 04, ``plots.teaching``: notebook 05 and its widgets, ``plots.audit``: notebook 07, ``plots.noise``:
notebooks 08 and 09); every function takes a tidy DataFrame (the same one written to ``figures/data/*.csv``) and
returns a Figure. A method's colour and line style are ``METHOD_STYLE``'s, its legend label
``core.objective.label``'s.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.pyplot as plt

from opdlab.core.objective import divergence_title, label
from opdlab.files import disk_errors, temporary_name

__all__ = ["save_figure", "save_data", "METHOD_STYLE", "method_style", "figures_dir", "grid", "divergence_title"]

METHOD_STYLE = {  # one per key of core.objective.LABELS (tests/core/test_objective.py)
    "opd": dict(color="#d62728", linestyle="--"),
    "opd_plus": dict(color="#1f77b4", linestyle="-"),
    "full_vocabulary": dict(color="#2ca02c", linestyle="-."),
    "supervised_kd": dict(color="#9467bd", linestyle=":"),
    "opd_plus_topk": dict(color="#ff7f0e", linestyle=(0, (6, 1, 1, 1, 1, 1))),
}


def method_style(method: str) -> dict:
    """Colour, line style and legend label (``core.objective.label``) of a method, the same in every figure."""
    return {**METHOD_STYLE.get(method, dict(color="gray", linestyle=":")), "label": label(method)}


def grid(n_panels: int, n_cols: int = 3, size: tuple[float, float] = (3.6, 2.8), **kwargs):
    """A figure with ``n_panels`` axes in rows of ``n_cols`` (unused cells hidden); returns (fig, axes list)."""
    n_cols = min(n_cols, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size[0] * n_cols, size[1] * n_rows), squeeze=False,
                             **kwargs)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n_panels])


def figures_dir(path: str | os.PathLike | None = None) -> Path:
    """The figures folder: ``path`` if given, else $OPDLAB_FIGURES, else ``figures/`` at the repository root."""
    if path is None:
        path = os.environ.get("OPDLAB_FIGURES") or Path(__file__).resolve().parents[3] / "figures"
    out = Path(path)
    (out / "data").mkdir(parents=True, exist_ok=True)
    return out


def save_figure(fig: plt.Figure, name: str, directory: str | os.PathLike | None = None,
                formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` as ``<directory>/<name>.<fmt>`` for each format; return the paths.

    ``name`` is the file stem, by convention prefixed with the notebook number (``"02_bias_vs_samples"``).
    Each file is written whole or not at all (``_replace``): a full disk is an OSError naming the file, and
    leaves the file as it was.
    """
    out = figures_dir(directory)
    paths = []
    for fmt in formats:
        p = out / f"{name}.{fmt}"
        with plt.rc_context({"svg.hashsalt": name}):  # stable element ids: a rerun rewrites the same SVG
            _replace(p, lambda tmp: fig.savefig(tmp, format=fmt, dpi=130, bbox_inches="tight",
                                                metadata={"Date": None} if fmt == "svg" else None))
        paths.append(p)
    return paths


def save_data(df, name: str, directory: str | os.PathLike | None = None) -> Path:
    """Write the tidy DataFrame behind a figure to ``<directory>/data/<name>.csv``, whole or not at all (a full
    disk is an OSError naming the file, and leaves it as it was); return the path."""
    p = figures_dir(directory) / "data" / f"{name}.csv"
    _replace(p, lambda tmp: df.to_csv(tmp, index=False))
    return p


def _replace(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place; the temporary file is
    removed however the write ends, and an OS error (a full disk) names ``path``."""
    tmp = temporary_name(path)
    try:
        with disk_errors(path, rename=True):
            write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
