"""Files that opdlab reads back: written whole or not at all, verified when read, and a full disk said in one line.

- ``write_atomic(path, data)``: a temporary file beside ``path``, flushed to disk and renamed into place, so an
  interruption leaves the old version or the new one; the temporary file never outlives the call.
- ``replace_dir(tmp, path)``: a freshly written directory swapped into place (``path`` -> ``path.old``,
  ``tmp`` -> ``path``, ``path.old`` removed); ``restore_dir(path)`` finishes a swap cut between its renames.
- Digests. ``write_digest(directory, **facts)`` records the sha256 of every other file of a directory in its
  ``digest.json`` (``DIGEST_FILE``), with facts of the writer's (the weights' digest, the recipe);
  ``check_digest(directory)`` hashes the files again and raises ``DigestMismatch`` (a ``UserError``) naming
  the files that changed or are missing, or returns None for a directory written without one.
- ``disk_errors(path)``: a write that fails for lack of space (or any operating-system reason) becomes an
  ``OSError`` with its errno and ``path``, whichever library raised it (safetensors says ``os error 28`` in a
  message; pandas and matplotlib raise an OSError without the file name). The command line prints such an
  error as one line (``cli._os_message``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from opdlab.errors import UserError

__all__ = ["write_atomic", "replace_dir", "restore_dir", "remove_tree", "DIGEST_FILE", "write_digest",
           "check_digest", "file_digests", "DigestMismatch", "disk_errors", "temporary_name"]

DIGEST_FILE = "digest.json"
"""The file in a checkpoint or cache directory that holds the sha256 of every other file in it."""
_CHUNK = 1 << 20


def temporary_name(path: Path) -> Path:
    """The temporary sibling a write of ``path`` goes through: ``.<name>.tmp<pid>``."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, rename: bool = False):
    """Turn a failed write under ``path`` into an ``OSError(errno, strerror, path)``: an OSError that names no
    file (or any, with ``rename``: a write through a temporary copy names what it stands for) gets ``path``,
    and a library error whose message carries an operating-system error number (``os error 28``) becomes that
    OSError. Other exceptions pass unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno is not None and (err.filename is None or rename):
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise
    except Exception as err:  # safetensors (Rust) and others wrap the errno in their own exception
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk and rename it into place; on any
    failure ``path`` is as it was and the temporary file is gone."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with disk_errors(path), open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the complete directory ``tmp`` in the place of ``path`` (which may not exist) by renames only:
    ``path`` -> ``path.old``, ``tmp`` -> ``path``, then remove ``path.old``. A crash between the renames leaves
    ``path.old``, which ``restore_dir`` moves back."""
    old = path.with_name(path.name + ".old")
    remove_tree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    remove_tree(old)


def restore_dir(path: Path) -> None:
    """Finish a ``replace_dir`` that was cut between its renames: ``path.old`` back to ``path``."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under ``directory`` but ``DIGEST_FILE``, by path relative to it."""
    return {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != DIGEST_FILE}


def write_digest(directory: str | os.PathLike, **facts) -> dict:
    """Record the sha256 of every file of ``directory`` (``file_digests``) and ``facts`` in its ``DIGEST_FILE``,
    atomically; return the record."""
    directory = Path(directory)
    record = {**facts, "files": file_digests(directory)}
    with disk_errors(directory / DIGEST_FILE):
        write_atomic(directory / DIGEST_FILE, json.dumps(record, indent=2, sort_keys=True))
    return record


class DigestMismatch(UserError):
    """A directory's files differ from the digests recorded when it was written (``.path``, ``.changed``)."""

    def __init__(self, path: Path, changed: list[str], what: str = "", remedy: str = ""):
        self.path, self.changed = Path(path), changed
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        super().__init__(f"{what or path} does not match the digest recorded when it was written ({shown} "
                         f"changed or missing since; {path / DIGEST_FILE} holds the digests)"
                         + (f": {remedy}" if remedy else ""))


def check_digest(directory: str | os.PathLike, what: str = "", remedy: str = "") -> dict | None:
    """The record of ``directory``'s ``DIGEST_FILE`` once every file it lists hashes to its recorded sha256;
    None when there is no such file (a directory written before digests, or by another program). A file that
    differs or is missing raises ``DigestMismatch`` naming it (``what`` names the directory in the message,
    ``remedy`` says what to do); a ``DIGEST_FILE`` that cannot be read counts as changed."""
    directory = Path(directory)
    remedy = remedy or "restore its files from a copy, or write it again"
    try:
        text = (directory / DIGEST_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        files = record["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise DigestMismatch(directory, [DIGEST_FILE], what, remedy) from None
    changed = []
    for name, digest in files.items():
        path = directory / name
        try:
            same = _sha256(path) == digest
        except (FileNotFoundError, IsADirectoryError):
            same = False
        if not same:
            changed.append(name)
    if changed:
        raise DigestMismatch(directory, changed, what, remedy)
    return record

