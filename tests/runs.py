"""Tests build runs from flat fields, as the CLI and notebooks do: ``make(**flat)`` is ``(RunSpec, Runtime)``
through ``presets.resolve``, with progress bars off."""
from opdlab.presets import resolve


def make(**flat):
    return resolve({"progress": False, **flat})
