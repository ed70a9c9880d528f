"""Reading a run directory back: its recorded config and runtime, its metrics as tidy DataFrames, and its
per-item evaluation records. The files are named in ``opdlab.rundir.layout``; the writer of the same directory is
``opdlab.rundir.writer.RunLog``, whose module doc says what is verified.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from opdlab.errors import UserError
from opdlab.rundir import layout

__all__ = ["read_json", "read_records", "read_metrics", "last_step", "results", "read_items", "stored_config",
           "stored_runtime", "CONFIG_COLUMNS", "VOLATILE"]

VOLATILE = ("time_",)  # metric names starting with these differ between runs (wall-clock)
CONFIG_COLUMNS = ("task", "divergence", "method", "seed", "gamma", "baseline", "log_u_clip", "reduction",
                  "teacher_topk", "steps")
"""The config fields copied onto every metrics row: what tells runs apart in a table or a figure (not ``lr``: a
training row's ``lr`` is the scheduled rate of its step; ``stored_config`` has the run's peak rate)."""


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, None when the file is absent; a ``UserError`` naming the file and what to do
    about it when it is damaged or holds no object."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is damaged ({err}); {_REWRITTEN.get(path.name, 'restore it from a copy')}") \
            from None
    if not isinstance(value, dict):
        raise UserError(f"{path} should hold a JSON object, holds {type(value).__name__}; "
                        f"{_REWRITTEN.get(path.name, 'restore it from a copy')}")
    return value


_REWRITTEN = {layout.CONFIG: f"delete it: it is written again from {layout.FINGERPRINT}",
              layout.FINGERPRINT: "delete it: it is written again on the next start, which checks the run against "
                                  f"{layout.CONFIG} and the checkpoint's copy of the fingerprint",
              layout.VERSIONS: "delete it: it is written again on the next start",
              layout.RUN: "delete it: it is written again on the next start"}
"""What to do about a damaged JSON file of a run directory: every one of them is written again by a start."""


def stored_config(run_dir: str | os.PathLike) -> dict | None:
    """The config a run directory recorded: config.json, else the one in fingerprint.json; None for a new one."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / layout.CONFIG)
    if config is None:
        config = (read_json(run_dir / layout.FINGERPRINT) or {}).get("config")
    return config


def stored_runtime(run_dir: str | os.PathLike) -> dict | None:
    """The runtime a run directory last ran with (run.json's ``runtime``), None when it recorded none."""
    return (read_json(Path(run_dir) / layout.RUN) or {}).get("runtime")


def _record(line: str) -> dict:
    """One line of a metrics.jsonl as its record; a ``ValueError`` when it is not a JSON object with ``step`` and
    ``kind``."""
    record = json.loads(line)
    if not (isinstance(record, dict) and "step" in record and "kind" in record):
        raise ValueError("not a record with step and kind")
    return record


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl. A last line that is not a whole JSON record (torn by a crash or a full
    disk) is dropped with a message on stderr; a bad line elsewhere, or two records of one step and kind
    (two writers), is a ``UserError`` naming the file and the line."""
    path = Path(path)
    lines = path.read_text().split("\n")
    records, seen = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _record(line)
        except ValueError as err:
            if number == len(lines):  # no newline after it: the append was cut short
                print(f"opdlab: {path}: dropped a torn last line ({len(line)} characters); the rest is intact",
                      file=sys.stderr)
                break
            raise UserError(f"{path}, line {number}: not a metrics record ({err}); restore that line from a copy, "
                            "or delete it if its step is after the last checkpoint's (a resume computes those "
                            "again; without a record of an earlier step the run must start over in a new run "
                            "directory)") from None
        key = (record["step"], record["kind"])
        if key in seen:
            raise UserError(f"{path}, lines {seen[key]} and {number}: two {key[1]} records of step {key[0]} "
                            "(written by two processes at once); rerun the run in a new directory")
        seen[key] = number
        records.append(record)
    return records


def last_step(run_dir: str | os.PathLike) -> int:
    """The ``step`` of the last whole JSON line in ``run_dir``'s metrics.jsonl, 0 before the first: a line being
    written, or a file not there yet, counts as the step before. Never raises on the file's content (it is read
    while another process writes it, for progress lines only; ``read_records`` checks what it reads)."""
    try:
        lines = (Path(run_dir) / layout.METRICS).read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def read_metrics(run_dir: str | os.PathLike, volatile: bool = True) -> pd.DataFrame:
    """One run's metrics as a DataFrame (one row per logged record), with its config as extra columns.

    ``volatile=False`` drops wall-clock columns (``time_*``), which differ between otherwise equal runs.
    """
    run_dir = Path(run_dir)
    df = pd.DataFrame(read_records(run_dir / layout.METRICS))
    if "nonfinite" in df:  # the names of a record's non-finite (null) values, as one string
        df["nonfinite"] = [",".join(v) if isinstance(v, list) else "" for v in df["nonfinite"]]
    if not volatile:
        df = df[[c for c in df.columns if not c.startswith(VOLATILE)]]
    config = stored_config(run_dir) or {}
    for key in CONFIG_COLUMNS:
        df[key] = config.get(key)
    df["run"] = run_dir.name
    return df


def results(run_dirs, kind: str | None = "eval", long: bool = False) -> pd.DataFrame:
    """Metrics of many runs in one tidy DataFrame: rows of ``kind`` ("eval", "train" or None for both).

    ``long=True`` melts the metric columns into ``metric, value`` pairs (one observation per row).
    """
    frames = [read_metrics(d) for d in run_dirs if (Path(d) / layout.METRICS).exists()]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if kind is not None:
        df = df[df["kind"] == kind].reset_index(drop=True)
        empty = [c for c in df.columns if c not in CONFIG_COLUMNS and df[c].isna().all()]  # the other kind's metrics
        df = df.drop(columns=empty)
    if long:
        ids = ["run", *CONFIG_COLUMNS, "step", "kind", "nonfinite"]
        df = df.melt(id_vars=[c for c in ids if c in df], var_name="metric", value_name="value")
    return df


def read_items(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every per-item evaluation record of a run directory, with a ``step`` column, sorted by step and item;
    an empty frame when it has none (a run from before per-item records, or not yet evaluated)."""
    frames = [pd.read_csv(path).assign(step=step) for step, path in layout.item_files(run_dir)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
