"""A run directory: the name of every file in it (``layout``), its one writer with the lock, config,
fingerprint, whole-line metrics and verified checkpoints (``writer``), its reader returning tidy DataFrames
(``reader``), and the trackers that mirror its metrics (``tracking``).

Imports ``lm``, ``config`` and the leaves; this file imports nothing.
"""
