"""Checks on plain values that every spec, recipe and task uses (no torch, no pandas)."""
from __future__ import annotations

__all__ = ["is_int"]


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
