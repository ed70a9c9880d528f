"""A run directory: its config, metrics as JSON lines, the versions it ran with, and a resumable checkpoint.

Layout of ``runs/<name>/``::

    config.json       the TrainConfig (plus teacher/student facts in run.json)
    versions.json     python, torch, transformers, opdlab, platform, device
    metrics.jsonl     one JSON object per line: {"step": s, "kind": "train" | "eval", ...}
    checkpoint/       model (save_pretrained), state.pt: optimizer, RNG states, step

A checkpoint is written to a temporary directory and renamed into place, so an interruption leaves either the
old checkpoint or the new one. On resume, metric lines logged after the checkpoint's step are dropped (they
are recomputed), so a resumed run's metrics.jsonl equals an uninterrupted one's.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

import pandas as pd
import torch

from opdlab.lm.modeling import save_model

__all__ = ["RunLog", "read_metrics", "results", "versions"]

VOLATILE = ("time_",)  # metric names starting with these differ between runs (wall-clock)
CONFIG_COLUMNS = ("task", "divergence", "method", "seed", "gamma", "baseline", "log_u_clip", "reduction")
"""The config fields copied onto every metrics row: what tells runs apart in a table or a figure."""


def versions(device: str | None = None) -> dict:
    """Versions of what a run depends on, and where it ran."""
    import transformers

    import opdlab
    return dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                opdlab=getattr(opdlab, "__version__", "unknown"), platform=platform.platform(),
                device=device, threads=torch.get_num_threads())


class RunLog:
    """Writes one run's directory; see the module doc for the layout."""

    def __init__(self, run_dir: str | os.PathLike, config, device: str | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        config_json = config.to_json()
        old = self.dir / "config.json"
        if old.exists() and json.loads(old.read_text()) != json.loads(config_json):
            raise ValueError(f"{self.dir} holds a run with a different config; use a new run directory")
        old.write_text(config_json)
        (self.dir / "versions.json").write_text(json.dumps(versions(device), indent=2))
        self.metrics_path = self.dir / "metrics.jsonl"
        self.checkpoint_dir = self.dir / "checkpoint"

    def write_json(self, name: str, obj: dict) -> None:
        (self.dir / name).write_text(json.dumps(obj, indent=2, default=str))

    def log(self, record: dict) -> None:
        """Append one metrics record (a flat dict with ``step`` and ``kind``)."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (logged before an interruption, not checkpointed)."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def save_checkpoint(self, model, tokenizer, optimizer, step: int, rng: dict) -> None:
        """Model, tokenizer, optimizer state, RNG states and the number of completed steps, atomically."""
        tmp = self.dir / f"checkpoint.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng}, tmp / "state.pt")
        old = self.dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_state(self) -> dict | None:
        """The checkpoint's ``{"step", "optimizer", "rng"}``, or None when there is none yet."""
        if not self.checkpoint_dir.exists() and (self.dir / "checkpoint.old").exists():
            os.replace(self.dir / "checkpoint.old", self.checkpoint_dir)  # interrupted between the renames
        path = self.checkpoint_dir / "state.pt"
        return torch.load(path, weights_only=False, map_location="cpu") if path.exists() else None


def read_metrics(run_dir: str | os.PathLike, volatile: bool = True) -> pd.DataFrame:
    """One run's metrics as a DataFrame (one row per logged record), with its config as extra columns.

    ``volatile=False`` drops wall-clock columns (``time_*``), which differ between otherwise equal runs.
    """
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    if not volatile:
        df = df[[c for c in df.columns if not c.startswith(VOLATILE)]]
    config = json.loads((run_dir / "config.json").read_text())
    for key in CONFIG_COLUMNS:
        df[key] = config[key]
    df["run"] = run_dir.name
    return df


def results(run_dirs, kind: str | None = "eval", long: bool = False) -> pd.DataFrame:
    """Metrics of many runs in one tidy DataFrame: rows of ``kind`` ("eval", "train" or None for both).

    ``long=True`` melts the metric columns into ``metric, value`` pairs (one observation per row).
    """
    frames = [read_metrics(d) for d in run_dirs if (Path(d) / "metrics.jsonl").exists()]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    if kind is not None:
        df = df[df["kind"] == kind].dropna(axis=1, how="all").reset_index(drop=True)
    if long:
        ids = ["run", *CONFIG_COLUMNS, "step", "kind"]
        df = df.melt(id_vars=[c for c in ids if c in df], var_name="metric", value_name="value")
    return df
