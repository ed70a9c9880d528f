"""opdlab's estimators inside other training frameworks, each behind its own optional extra.

- ``trl``: OPD, OPD+ and the full-vocabulary reference for every registered divergence, as a subclass of TRL's
  ``DistillationTrainer`` (``pip install opdlab[trl]``).

This package file imports nothing, so ``import opdlab.integrations`` works without any framework installed.
"""
