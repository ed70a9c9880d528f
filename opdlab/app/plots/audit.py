"""Figure of notebook 07: the estimator audit's cosines as a heatmap. Takes the tidy frame of
``opdlab.audit.expected.audit`` or its ``cosine_summary`` (the CSV in ``figures/data/07_cosines.csv``) and returns a
Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from opdlab.errors import UserError

__all__ = ["cosine_heatmap_figure"]


def cosine_heatmap_figure(frame: pd.DataFrame, kind: str | None = None, target: str = "token_local") -> plt.Figure:
    """Mean cos(E[g], grad D) over toys: one row per estimator, one column per divergence, for one toy ``kind``
    (default: the first in the frame) and ``target`` ("token_local" or "sequence"). Blank where E[g] = 0."""
    kind = kind or frame["kind"].iloc[0]
    d = frame[(frame["kind"] == kind) & (frame["target"] == target)]
    if d.empty:
        raise UserError(f"no rows for kind={kind!r}, target={target!r}; the frame has kinds "
                        f"{sorted(frame['kind'].unique())} and targets {sorted(frame['target'].unique())}")
    rows = list(dict.fromkeys(d["estimator"]))
    cols = list(dict.fromkeys(d["divergence"]))
    table = d.groupby(["estimator", "divergence"], sort=False)["cosine"].mean().unstack().reindex(index=rows,
                                                                                                 columns=cols)
    fig, ax = plt.subplots(figsize=(0.75 * len(cols) + 3.2, 0.28 * len(rows) + 1.4))
    image = ax.imshow(table.to_numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    for i, j in np.ndindex(table.shape):
        value = table.iat[i, j]
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(f"cos(E[g], ∇D), {kind} toys, {target.replace('_', '-')} gradient", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return fig
