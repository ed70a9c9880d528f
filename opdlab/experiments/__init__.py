"""Questions asked of many runs: paired statistics on per-item records (``stats``), Monte Carlo against the
exact gradients (``montecarlo``), sweeps of runs in worker processes or cohorts (``sweep``), the learning-rate
protocol (``protocol``), notebook 04's arm comparisons (``comparisons``) and the sampled estimator's noise on a
real student (``noise``).

Imports ``training`` and every folder below it; this file imports nothing.
"""
