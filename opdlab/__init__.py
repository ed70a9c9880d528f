"""opdlab: on-policy distillation with any f-divergence, the stop-gradient bias, and OPD+.

One folder per layer, bottom to top: ``config`` (what a run is, no torch), ``tasks``, ``core`` (divergences,
advantages, the top-k estimator, the method table), ``lm`` (models), ``exact`` (toys and the sympy derivation),
``audit`` (what a peer's loss follows), ``rundir`` (a run directory written and read), ``training``,
``experiments`` (statistics, sweeps, comparisons), ``report``, ``app`` (the CLI, notebooks, widgets, plots) and
``integrations``; ``opdlab.testing.assert_unbiased`` checks a user's own loss. docs/architecture.md is the map; the
math is in docs/math.md.
"""
__version__ = "0.1.0"
