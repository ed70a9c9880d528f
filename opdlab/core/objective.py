"""The one table of what each method is: what it samples from, its loss, what it logs, and its label.

Adding a method touches ``config.choices.METHODS`` (its name), this table, and the arm comparisons only if the
method joins a family there.
"""
from __future__ import annotations

__all__ = ["LABELS", "label"]

LABELS = {
    "opd": "OPD (stop-gradient)",
    "opd_plus": "OPD+",
    "full_vocabulary": "full-vocabulary loss (reference)",
    "supervised_kd": "supervised KD on teacher samples (reference)",
    "opd_plus_topk": "OPD+ from the teacher's top-k",
}
"""A method's legend label, the same in every figure and table."""


def label(method: str) -> str:
    """The label of ``method`` (the name itself if it has none)."""
    return LABELS.get(method, method)
