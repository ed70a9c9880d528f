"""Tensors in, tensors out: the f-divergence registry (``divergences``), per-token advantages, baselines and
surrogate losses (``estimators``), OPD+ from a top-k teacher (``sparse``), and the one table of what each
method samples, differentiates, logs and is called (``objective``).

Imports ``config`` and the leaves; this file imports nothing.
"""
