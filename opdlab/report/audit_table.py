"""The audit table of ``docs/audit.md``, rendered from the catalogue and notebook 07's verdicts (never typed).

``render(verdicts)`` returns the Markdown between the two ``MARKERS`` of docs/audit.md: one row per peer entry
of ``opdlab.audit.catalogue`` (its source pin, the defaults it models, and the verdict on categorical and
sequence toys from ``figures/data/07_verdicts.csv``), then the peers' losses that are out of scope and why.
``python -m opdlab.report.audit_table`` rewrites that section in place; a test checks it is what ``render`` gives.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from opdlab.audit.catalogue import CATALOGUE, OUT_OF_SCOPE
from opdlab.errors import UserError

__all__ = ["MARKERS", "render", "section", "update"]

MARKERS = ("<!-- audit table: rendered by opdlab.report.audit_table, do not edit -->", "<!-- end of audit table -->")
ROOT = Path(__file__).resolve().parents[2]


def _pin(source) -> str:
    where = f"`{source.repo}`" + (f" `{source.path}`" if source.path else "")
    at = f" @ {source.version.split(' ')[0][:10]}" + (f" L{source.lines}" if source.lines else "")
    return where + (at if source.read else f" (the paper; {source.note})")


def _verdict(row) -> str:
    if row is None:
        return "-"
    if row.closest.startswith("nothing"):
        return "nothing (E[g] = 0)"
    return f"{row.closest} (cos {row.closest_cosine:.3f}, scale {row.closest_scale:.3g})"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render(verdicts: pd.DataFrame) -> str:
    """The Markdown table of the catalogue's peer entries with their verdicts (``opdlab.audit.expected.verdicts``)."""
    table = verdicts.set_index(["kind", "estimator"])
    missing = [n for n, e in CATALOGUE.items() if e.source.repo != "opdlab" and not
               any((k, n) in table.index for k in ("categorical", "sequence"))]
    if missing:
        raise UserError(f"the verdicts lack catalogue entries {missing}; rerun notebook 07")
    lines = ["| estimator | mode | claims | categorical toys: closest target | sequence toys: closest target | "
             "source | defaults modelled |", "|---|---|---|---|---|---|---|"]
    for name, e in CATALOGUE.items():
        if e.source.repo == "opdlab":
            continue
        rows = [table.loc[(k, name)] if (k, name) in table.index else None for k in ("categorical", "sequence")]
        defaults = e.source.defaults + (f"; holds for {e.source.holds_for}" if e.source.holds_for else "")
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"`{name}`", e.mode, e.claims or "-", _verdict(rows[0]), _verdict(rows[1]), _pin(e.source),
            defaults)) + " |")
    lines += ["", "Out of scope for this catalogue version:", ""]
    lines += [f"- `{name}`: {_cell(reason)}" for name, reason in OUT_OF_SCOPE.items()]
    return "\n".join(lines)


def section(text: str) -> str:
    """The part of a document between the ``MARKERS`` (exclusive, stripped)."""
    begin, end = MARKERS
    if begin not in text or end not in text:
        raise UserError(f"the document has no audit table markers {begin!r} ... {end!r}")
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def update(doc: Path = ROOT / "docs" / "audit.md",
           verdicts_csv: Path = ROOT / "figures" / "data" / "07_verdicts.csv") -> None:
    """Rewrite the table of ``doc`` from ``verdicts_csv``."""
    text = Path(doc).read_text()
    section(text)  # the markers are there
    begin, end = MARKERS
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    Path(doc).write_text(f"{head}{begin}\n{render(pd.read_csv(verdicts_csv))}\n{end}{tail}")


if __name__ == "__main__":
    update(*sys.argv[1:3])
