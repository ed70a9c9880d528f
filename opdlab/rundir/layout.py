"""The one place a run directory's files, and a sweep's folder of reference evaluations, are named.

Layout of a run directory ``runs/<name>/``::

    config.json       the RunSpec, flat (plus the models' origin and the Runtime in run.json)
    run.json          the models' origin, the training prompts, the world size and the Runtime of the last start
    fingerprint.json  what determines the run: the config and sha256 digests of the teacher's and the initial
                      student's weights
    versions.json     python, torch, transformers, opdlab, platform, device
    metrics.jsonl     one JSON object per line: {"step": s, "kind": "train" | "eval", ...}
    items/step_N.csv  one record per held-out item of the evaluation at step N (``training.evaluate.ITEM_COLUMNS``)
    checkpoint/       model (save_pretrained), state.pt: optimizer, RNG states, step, fingerprint; digest.json:
                      the sha256 of each of its files and of the weights (``opdlab.files``)
    lock              the pid of the process writing the run, for messages; flocked too, as older versions did, to
                      keep their writers out (the lock no deletion can break is on the directory itself)
    error.json        why a run of a cohort failed (``training.cohort_loop``); removed when the run is taken up again
    tensorboard/      the TensorBoard events of a run that reports to it (``rundir.tracking``)

A sweep's ``runs_dir/references/`` holds ``start-<key>.json`` (a kept evaluation of an initial student,
``training.references``) and ``<task>-<role>-<key>.csv`` (the teacher's and the warm-up student's per-item
records, ``experiments.sweep``). Every key is ``key(named, length)``: the first ``length`` hex digits of the sha256
of ``named`` as sorted JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["CONFIG", "RUN", "FINGERPRINT", "VERSIONS", "METRICS", "ITEMS", "CHECKPOINT", "STATE", "LOCK", "ERROR",
           "TENSORBOARD", "REFERENCES", "TEMPORARY", "items_file", "item_files", "checkpoint_dir", "references",
           "start_reference", "reference_items", "key", "is_run_dir", "model_dir"]

CONFIG = "config.json"
RUN = "run.json"
FINGERPRINT = "fingerprint.json"
VERSIONS = "versions.json"
METRICS = "metrics.jsonl"
ITEMS = "items"
CHECKPOINT = "checkpoint"
STATE = "state.pt"
"""The checkpoint's file of optimizer state, RNG states, step and fingerprint (beside the model's files)."""
LOCK = "lock"
ERROR = "error.json"
TENSORBOARD = "tensorboard"
REFERENCES = "references"

TEMPORARY = (f"{CHECKPOINT}.tmp*", ".*.tmp*")
"""Names of the temporary copies an interrupted write leaves; removed when the next process takes the lock."""


def items_file(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/items/step_<step>.csv``: the per-item records of the evaluation at ``step``."""
    return Path(run_dir, ITEMS, f"step_{step}.csv")


def item_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every per-item record file of ``run_dir``, by step."""
    found = [(int(p.stem.split("_")[1]), p) for p in Path(run_dir, ITEMS).glob("step_*.csv")]
    return sorted(found, key=lambda pair: pair[0])


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps its latest checkpoint: ``run_dir/checkpoint``."""
    return Path(run_dir, CHECKPOINT)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a run (its fingerprint or its metrics), as ``opdlab train`` writes one."""
    return any(Path(path, name).exists() for name in (FINGERPRINT, METRICS))


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory that ``path`` names: its ``checkpoint/`` when it has one (a run directory's model, as
    save_pretrained writes it), else ``path`` itself. A run directory without a checkpoint yet is a
    ``FileNotFoundError`` that says so and how to get one."""
    path = Path(path)
    if (checkpoint_dir(path) / CONFIG).exists():
        return checkpoint_dir(path)
    if is_run_dir(path):
        raise FileNotFoundError(f"{path} is a run directory without a checkpoint yet (a run saves one every "
                                f"checkpoint_every steps, into {CHECKPOINT}/): resume it with `opdlab train "
                                f"{path}` and load it once it has one")
    return path


def references(runs_dir: str | os.PathLike) -> Path:
    """A sweep's folder of reference evaluations and shared start evaluations: ``runs_dir/references``."""
    return Path(runs_dir, REFERENCES)


def start_reference(folder: str | os.PathLike, key: str) -> Path:
    """``folder/start-<key>.json``: a kept evaluation of an initial student (``training.references``)."""
    return Path(folder, f"start-{key}.json")


def reference_items(runs_dir: str | os.PathLike, task: str, role: str, key: str) -> Path:
    """``runs_dir/references/<task>-<role>-<key>.csv``: a sweep's teacher or warm-up student per-item records."""
    return references(runs_dir) / f"{task}-{role}-{key}.csv"


def key(named, length: int) -> str:
    """The first ``length`` hex digits of sha256(``json.dumps(named, sort_keys=True, default=str)``): the part of
    a file name that stands for the inputs ``named``."""
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:length]
