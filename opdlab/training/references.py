"""The disk cache of start evaluations: ``evaluate(tr, 0, n, sampled_n)`` of a run's initial student, kept in a
folder (a sweep's ``runs_dir/references``) for every run that would compute the same numbers, as
``layout.start_reference(folder, start_key(...))``.

A kept file is ``{"key", "metrics", "items", "dtypes"}``: the key it was written under, the evaluation's metrics,
its item records column by column and their columns' dtypes (so that float32 columns read back as float32).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from opdlab.files import write_atomic
from opdlab.lm.modeling import weights_digest
from opdlab.rundir import layout
from opdlab.training.evaluate import ITEM_COLUMNS, evaluate
from opdlab.training.step import Trainer

__all__ = ["evaluate_start", "start_key"]


def start_key(tr: Trainer, n: int | None = None, sampled_n: int | None = None) -> str:
    """16 hex digits standing for what ``evaluate(tr, 0, n, sampled_n)`` computes from: the teacher's and the
    initial student's weights, the tokenizer (class, size, chat template), the task spec, the evaluation spec,
    the item counts, the token budget, the seed, the divergence, the sampler, the compiled decoding, the device
    type and the thread count. The key covers inputs, not code."""
    s, tok = tr.spec, tr.tokenizer
    named = dict(teacher=weights_digest(tr.teacher), student=weights_digest(tr.student), task=asdict(s.task),
                 tokenizer=[type(tok).__name__, len(tok), getattr(tok, "chat_template", None)],
                 eval=asdict(s.eval), n=n or s.eval.eval_n, sampled_n=sampled_n, max_new_tokens=tr.max_new_tokens,
                 seed=s.optim.seed, divergence=s.objective.divergence, sampler=tr.runtime.sampler,
                 compile_decode=tr.runtime.compile_decode, device=tr.device.type, threads=torch.get_num_threads())
    return layout.key(named, 16)


def evaluate_start(tr: Trainer, n: int | None = None, sampled_n: int | None = None,
                   shared: str | Path | None = None) -> tuple[dict, pd.DataFrame]:
    """``evaluate(tr, 0, n, sampled_n)`` of a run's initial student, kept in the folder ``shared`` for every run
    that would compute the same numbers (``start_key``: the arms of one seed in a sweep). The first such run
    computes it and writes it atomically; the others read it back, checked against its key and with its columns'
    types, and a file that does not check out is computed again (said on stderr). After a change to the evaluation
    itself, delete the folder. ``shared=None``: computed here, kept nowhere. The metrics' ``time_eval`` is this
    call's own time."""
    if shared is None:
        return evaluate(tr, 0, n, sampled_n)
    t0 = time.perf_counter()
    key = start_key(tr, n, sampled_n)
    path = layout.start_reference(shared, key)
    if path.exists():
        try:
            metrics, items = _read(path, key, n or tr.spec.eval.eval_n)
            return {**metrics, "time_eval": time.perf_counter() - t0}, items
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"{path} could not be used ({err}); evaluating again", file=sys.stderr)
    metrics, items = evaluate(tr, 0, n, sampled_n)
    try:
        _write(path, key, metrics, items)
    except OSError as err:  # the run has its evaluation: only the sharing is lost
        print(f"the start evaluation could not be kept at {path} ({err}); the runs after this one evaluate "
              "their own", file=sys.stderr)
    return metrics, items


def _read(path: Path, key: str, n: int) -> tuple[dict, pd.DataFrame]:
    """``(metrics, items)`` kept at ``path``; a ``ValueError`` when its key, columns or item count differ."""
    kept = json.loads(path.read_text())
    items = pd.DataFrame(kept["items"]).astype(kept["dtypes"])
    if kept["key"] != key or list(items.columns) != list(ITEM_COLUMNS) or len(items) != n:
        raise ValueError("its key, columns or item count differ")
    return kept["metrics"], items


def _write(path: Path, key: str, metrics: dict, items: pd.DataFrame) -> None:
    """Keep ``(metrics, items)`` at ``path`` under ``key``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(dict(key=key, metrics=metrics, items=items.to_dict(orient="list"),
                                       dtypes={c: str(t) for c, t in items.dtypes.items()})))
