"""A run directory written: its config, metrics as JSON lines, the versions it ran with, and a resumable
checkpoint (``opdlab.rundir.reader`` reads it back).

The files are named, and the layout described, in ``opdlab.rundir.layout``.

Nothing is lost or mixed:

- one process at a time: the writer holds an flock on the run directory itself (not on a file in it) from
  start to end, so deleting any file in it lets no second writer in; the kernel releases it when the process
  ends, however it ends;
- a checkpoint is verified on every load (resume, ``opdlab eval``): its files against its digest.json, its
  weights against the recorded weights' digest; one that differs is refused, naming the files. It also holds
  the sha256 of the metric records up to its step, which a resume checks before it keeps them. A checkpoint
  written before digests existed is loaded as it is and its digest recorded then, with a message;
- an append writes a whole line or nothing (a failed write is cut back); a torn last line, from a crash or a
  full disk, is dropped with a message when the file is read;
- every rewrite (config, metrics on resume) goes to a temporary file renamed into place, and a checkpoint to a
  temporary directory renamed into place, so an interruption leaves the old version or the new one; temporary
  copies left by an interruption are removed on the next start;
- a run records its fingerprint and refuses, naming what differs, to continue under another one (the fields of
  ``config.spec.LEGACY_RUNTIME_FIELDS`` that older directories recorded, which said how a run was computed and
  not what, never count; the ``Runtime`` is not part of the fingerprint at all).

On resume, metric lines logged after the checkpoint's step are dropped (they are recomputed), so a resumed
run's metrics.jsonl equals an uninterrupted one's. Non-finite metric values are written as ``null`` and named
under the record's ``"nonfinite"`` key (JSON has no NaN).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

from opdlab.config.spec import LEGACY_RUNTIME_FIELDS, RunSpec
from opdlab.errors import UserError
from opdlab.files import DIGEST_FILE, DigestMismatch, disk_errors, remove_tree, replace_dir, restore_dir, write_atomic
from opdlab.lm.modeling import load_verified, record_digest, save_model, torch_bytes, weights_digest
from opdlab.rundir import layout
from opdlab.rundir.reader import read_json, read_records, stored_config

__all__ = ["RunLog", "versions", "weights_digest", "fingerprint"]


def versions(device: str | None = None) -> dict:
    """Versions of what a run depends on, and where it ran."""
    import transformers

    import opdlab
    return dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                opdlab=getattr(opdlab, "__version__", "unknown"), opdlab_commit=_commit(Path(opdlab.__file__).parent),
                platform=platform.platform(), device=device, threads=torch.get_num_threads())


def _commit(where: Path) -> str | None:
    """The git commit the package was imported from (``+dirty`` with uncommitted changes), None outside a
    checkout or without git."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def fingerprint(config, teacher, student) -> dict:
    """Everything that determines a run: its config and the digests of the teacher's and the initial student's
    weights (a teacher is known by its weights, not only by the recipe that made it). The models are the ones
    loaded: a cached or saved model was checked against its recorded digest on load (``lm.modeling``), so the
    digests recorded here are verified ones."""
    return {"config": config.to_dict(), "teacher": weights_digest(teacher), "student": weights_digest(student)}


def _differences(recorded: dict, current: dict) -> list[str]:
    """``field (recorded -> current)`` for each entry of two fingerprints (or configs) that differs; the fields of
    ``config.spec.LEGACY_RUNTIME_FIELDS`` (how a run was computed, which directories written before the
    spec/runtime split recorded in their config) never count."""
    if "config" in recorded or "config" in current:
        out = _differences(recorded.get("config", {}), current.get("config", {}))
        return out + [f"{role} weights (sha256 {str(recorded.get(role))[:12]} -> {str(current.get(role))[:12]})"
                      for role in ("teacher", "student") if recorded.get(role) != current.get(role)]
    keys = sorted((set(recorded) | set(current)) - set(LEGACY_RUNTIME_FIELDS))
    return [f"{key} ({recorded.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r})"
            for key in keys if recorded.get(key) != current.get(key)]


def _check_same(run_dir: Path, recorded: dict | None, current: dict, source: str, defaults: dict) -> None:
    """Refuse a run directory whose recorded config or fingerprint differs from the current one. A config field
    the record lacks (added to the config class after the run started) counts as its default, which a new field
    keeps equal to the behaviour before it (``lr_schedule = "constant"``)."""
    if recorded is None:
        return
    if "config" in recorded:
        recorded = {**recorded, "config": {**defaults, **recorded["config"]}}
    elif "config" not in current:
        recorded = {**defaults, **recorded}
    diff = _differences(recorded, current)
    if diff:
        raise UserError(f"{run_dir} holds a run with a different config or models ({source} differs in "
                        f"{', '.join(diff)}); resume it with what it started with (`opdlab train {run_dir}` "
                        "without -p reads its recorded config) or use a new run directory")


def _check_config_file(run_dir: Path, defaults: dict) -> None:
    """Refuse a config.json edited after the run started: it must equal the config in fingerprint.json."""
    config = read_json(run_dir / layout.CONFIG)
    started = (read_json(run_dir / layout.FINGERPRINT) or {}).get("config")
    if config is None or started is None:
        return
    diff = _differences({**defaults, **started}, {**defaults, **config})
    if diff:
        raise UserError(f"{run_dir / layout.CONFIG} was changed after the run started: it differs from the config "
                        f"the run started with (in {run_dir / layout.FINGERPRINT}) in {', '.join(diff)}; a run "
                        f"continues only with the config it started with: undo the change, or delete {layout.CONFIG} "
                        f"(it is written again from {layout.FINGERPRINT}), or start a new run directory")


def _json_line(record: dict) -> tuple[str, list[str]]:
    """A record as one line of strict JSON: non-finite floats become null and are named under "nonfinite"."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False), bad


def _records_text(records) -> str:
    """metrics.jsonl's text of ``records`` as a resume writes it back (one ``json.dumps`` line each)."""
    return "".join(json.dumps(r) + "\n" for r in records)


def _run_dir(run_dir) -> Path:
    if not isinstance(run_dir, (str, os.PathLike)) or str(run_dir).strip() == "":
        raise UserError(f"run directory {run_dir!r} is invalid: expected a non-empty path "
                        "(a new directory, or one that holds a run to resume)")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} is a file: expected a directory (new, or holding a run to resume)")
    return path


def _lock(run_dir: Path) -> tuple[int, ...]:
    """Take an exclusive flock on the directory ``run_dir`` itself, which no ``rm`` of a file in it can undo
    (the kernel releases it when the process ends), then on ``run_dir/lock``, the file an older opdlab locked,
    so that a writer of an older version is kept out too; write this process's pid into that file for the
    message a second writer gets. Return the descriptors to hold."""
    import fcntl

    held = []
    try:
        for path in (run_dir, run_dir / layout.LOCK):
            fd = os.open(path, os.O_RDONLY) if path == run_dir else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(held[1], 0)
        os.write(held[1], str(os.getpid()).encode())
    except BlockingIOError:
        for fd in held:
            os.close(fd)
        try:
            holder = (run_dir / layout.LOCK).read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise UserError(f"{run_dir} is being written by another process (pid {holder}); a run directory has "
                        "one writer at a time: wait for it to finish, or use another run directory") from None
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return tuple(held)


class RunLog:
    """Writes one run's directory, holding its lock from creation to ``close`` (or the end of a ``with``
    block); see the module doc for the layout and the guarantees.

    Creating one refuses a path that is empty or a file, a directory another process is writing, and a config
    that differs from the one the directory recorded (naming the fields); it then removes temporary copies an
    interruption left behind. ``start`` checks the full fingerprint (with the models), reads the checkpoint
    into ``checkpoint`` (``(state, model)`` or None) and records the run.
    """

    def __init__(self, run_dir: str | os.PathLike, config):
        self.dir = _run_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.dir)
        try:
            for pattern in layout.TEMPORARY:
                for orphan in self.dir.glob(pattern):
                    remove_tree(orphan)
            self._defaults = RunSpec.defaults()
            _check_config_file(self.dir, self._defaults)
            _check_same(self.dir, stored_config(self.dir), config.to_dict(), "its config", self._defaults)
        except BaseException:
            self.close()
            raise
        self.metrics_path = self.dir / layout.METRICS
        self.checkpoint_dir = layout.checkpoint_dir(self.dir)
        self.config, self.fingerprint, self.checkpoint = config, None, None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory's lock."""
        for fd in self._lock_fd or ():
            os.close(fd)
        self._lock_fd = None

    def start(self, fingerprint: dict, device: str | None = None, run: dict | None = None) -> None:
        """Check ``fingerprint`` against the recorded one and the checkpoint's (refusing a different one), read
        the checkpoint into ``self.checkpoint``; then record the fingerprint, the config, the versions and ``run``
        (run.json). Nothing is recorded before the models are known and agree."""
        _check_same(self.dir, read_json(self.dir / layout.FINGERPRINT), fingerprint, layout.FINGERPRINT,
                    self._defaults)
        self.checkpoint = self._load_checkpoint()
        if self.checkpoint is not None:
            _check_same(self.dir, self.checkpoint[0].get("fingerprint"), fingerprint, "its checkpoint",
                        self._defaults)
        self.fingerprint = fingerprint
        write_atomic(self.dir / layout.CONFIG, self.config.to_json())
        self.write_json(layout.FINGERPRINT, fingerprint)
        self.write_json(layout.VERSIONS, versions(device))
        if run is not None:
            self.write_json(layout.RUN, run)

    def write_json(self, name: str, obj: dict) -> None:
        write_atomic(self.dir / name, json.dumps(obj, indent=2, default=str))

    def write_items(self, step: int, items: pd.DataFrame) -> None:
        """The per-item records of the evaluation at ``step``, written atomically to ``items/step_<step>.csv``
        (a resumed run writes the same file again with the same content)."""
        path = layout.items_file(self.dir, step)
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, items.to_csv(index=False))

    def log(self, record: dict) -> list[str]:
        """Append one metrics record (a flat dict with ``step`` and ``kind``) as a whole line, or nothing if the
        write fails; return the names of its non-finite values (written as null, and said on stderr)."""
        line, bad = _json_line(record)
        data = (line + "\n").encode()
        with disk_errors(self.metrics_path):
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size, written = os.fstat(fd).st_size, 0
                try:
                    written = os.write(fd, data)
                    if written != len(data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
                finally:
                    if written != len(data):
                        os.ftruncate(fd, size)  # a whole line or nothing
            finally:
                os.close(fd)
        if bad:
            print(f"opdlab: {self.dir}: step {record.get('step')} ({record.get('kind')}): non-finite "
                  f"{', '.join(bad)} (logged as null)", file=sys.stderr)
        return bad

    def truncate_after(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (logged before an interruption, not checkpointed), by an
        atomic rewrite; refuse when the lines up to ``step`` are not all there."""
        if not self.metrics_path.exists() and step < 0:
            return
        keep = [r for r in read_records(self.metrics_path) if r["step"] <= step]
        trained = [r["step"] for r in keep if r["kind"] == "train"]
        if step >= 0 and trained != list(range(1, step + 1)):
            raise UserError(f"{self.metrics_path} does not hold the train records of steps 1..{step} that its "
                            f"checkpoint has done (it holds {len(trained)}): the run's early metrics are lost; "
                            "start it over in a new run directory")
        text = _records_text(keep)
        recorded = (self.checkpoint or ({},))[0].get("metrics_sha256") if step >= 0 else None
        if recorded is not None and hashlib.sha256(text.encode()).hexdigest() != recorded:
            raise UserError(f"{self.metrics_path}: its records of steps 0..{step} are not the ones the checkpoint "
                            "recorded (they were edited or damaged since; the checkpoint holds their sha256): "
                            f"restore the file from a copy, or delete the checkpoint (`rm -r {self.checkpoint_dir}`) "
                            "to start the run over from step 0")
        write_atomic(self.metrics_path, text)
        recorded = (self.checkpoint or ({},))[0].get("items_sha256") if step >= 0 else None
        if recorded is not None and self._items_digest(step) != recorded:
            raise UserError(f"{self.dir / layout.ITEMS}: the per-item records of the evaluations up to step {step} "
                            "are not the ones the checkpoint recorded (a file was edited, damaged or removed since; "
                            "the checkpoint holds their sha256): restore them from a copy, or delete the checkpoint "
                            f"(`rm -r {self.checkpoint_dir}`) to start the run over from step 0")

    def _items_digest(self, step: int) -> str:
        """sha256 over the per-item record files of the evaluations at steps up to ``step`` (names and bytes)."""
        digest = hashlib.sha256()
        for at, path in layout.item_files(self.dir):
            if at <= step:
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()

    def _metrics_digest(self, step: int) -> str | None:
        """sha256 of the metric records of steps up to ``step``, as ``truncate_after`` writes them back."""
        if not self.metrics_path.exists():
            return None
        text = _records_text(r for r in read_records(self.metrics_path) if r["step"] <= step)
        return hashlib.sha256(text.encode()).hexdigest()

    def save_checkpoint(self, model, tokenizer, optimizer, step: int, rng: dict) -> None:
        """Model, tokenizer, optimizer state, RNG states, the number of completed steps and the run's fingerprint,
        with the digest of them all (``digest.json``), written to a temporary directory and renamed into place.
        A failed write (a full disk: an OSError naming the path) leaves the previous checkpoint as it was and no
        temporary directory."""
        tmp = self.dir / f"{layout.CHECKPOINT}.tmp{os.getpid()}"
        remove_tree(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng, "fingerprint": self.fingerprint,
                 "digested": True, "metrics_sha256": self._metrics_digest(step),
                 "items_sha256": self._items_digest(step)}
        try:
            with disk_errors(self.checkpoint_dir, rename=True):
                save_model(model, tokenizer, tmp, files={layout.STATE: torch_bytes(state)},
                           facts={"step": step})
            replace_dir(tmp, self.checkpoint_dir)
        finally:
            remove_tree(tmp)

    def _load_checkpoint(self):
        """``(state, model)`` of the checkpoint (on the CPU), ``state = {"step", "optimizer", "rng",
        "fingerprint"}``, or None when there is none yet, once its files and weights match its digest.json; a
        UserError naming the checkpoint when they do not, or when it cannot be read. A checkpoint written before
        digests existed gets its digest recorded now (said on stderr)."""
        restore_dir(self.checkpoint_dir)  # interrupted between the renames of save_checkpoint
        path = self.checkpoint_dir / layout.STATE
        if not path.exists():
            return None
        what = f"the checkpoint {self.checkpoint_dir}"
        remedy = f"restore it from a copy, or delete it (`rm -r {self.checkpoint_dir}`) to start the run over"
        try:
            model, _, record = load_verified(self.checkpoint_dir, what=what, remedy=remedy + " from step 0")
            state = torch.load(path, weights_only=False, map_location="cpu")
        except DigestMismatch:
            raise
        except Exception as err:  # torch, safetensors and transformers each raise their own kind
            raise UserError(f"{what} cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
                            f"{remedy} from step 0") from None
        if record is None:
            if state.get("digested"):
                raise UserError(f"{what} has lost its {DIGEST_FILE} (it was written with one), so it cannot be "
                                f"verified; {remedy} from step 0")
            record_digest(model, self.checkpoint_dir, step=state.get("step"), recorded="on first load")
            print(f"opdlab: {what} was written before checkpoints carried a digest; recorded its digest now, "
                  "from the files as they are", file=sys.stderr)
        return state, model


