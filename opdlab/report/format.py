"""How ``opdlab.report.render`` reads committed tables and writes their cells: one place for the number formats every
rendered document shares (3 decimals, whole percents, signed points, p-values, wrapped prose, markdown tables)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd

from opdlab.errors import UserError

__all__ = ["data", "table", "prose", "doc", "f", "pct", "points", "interval", "p"]


def data(root: Path, name: str) -> pd.DataFrame:
    path = root / "figures" / "data" / name
    if not path.exists():
        raise UserError(f"{path} is missing: the report renders from figures/data/ (run `make figures`, or pass "
                        f"the repository root as --root)")
    return pd.read_csv(path)


def table(frame: pd.DataFrame) -> str:
    """A markdown table of already-formatted cells (strings kept as written)."""
    return frame.to_markdown(index=False, disable_numparse=True)


def prose(text: str) -> str:
    """A paragraph of generated prose, wrapped as the hand-written docs are."""
    return textwrap.fill(text, width=115, break_on_hyphens=False)


def f(x: float, digits: int = 3) -> str:
    return "–" if pd.isna(x) else f"{x:.{digits}f}"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def points(x: float, digits: int = 1) -> str:
    """A difference in accuracy, in points with its sign."""
    return "–" if pd.isna(x) else f"{100 * x:+.{digits}f}"


def interval(lo: float, hi: float, fmt=points) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


def p(p: float) -> str:
    return "–" if pd.isna(p) else (f"{p:.2g}" if p >= 1e-4 else "< 1e-4")


def doc(*parts: str | pd.DataFrame) -> str:
    """Paragraphs (wrapped) and tables (a DataFrame of formatted cells), a blank line apart."""
    return "\n\n".join(table(p) if isinstance(p, pd.DataFrame) else prose(p) for p in parts)
