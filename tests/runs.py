"""Tests build runs from flat fields, as the CLI and notebooks do: ``make(**flat)`` is ``(RunSpec, Runtime)``
through ``presets.resolve``, with progress bars off."""
from opdlab.config.presets import resolve


def make(**flat):
    return resolve({"progress": False, **flat})


def resign(directory):
    """Record a checkpoint's digest again after a test changed a file in it on purpose (to stage a situation
    such as another device), so that the change is not refused as damage."""
    import json
    from pathlib import Path

    from opdlab.files import DIGEST_FILE, write_digest

    record = json.loads((Path(directory) / DIGEST_FILE).read_text())
    write_digest(directory, **{k: v for k, v in record.items() if k != "files"})
