"""opdlab: on-policy distillation with any f-divergence, the stop-gradient bias, and OPD+.

Modules: ``divergences`` (the registry), ``estimators`` (advantages, baselines, surrogates), ``toy`` (exact
toy problems), ``symbolic`` (the derivation), ``tasks``, ``models``, ``train``, ``runlog``, ``plots``,
``widgets``, ``cli``.
"""
__version__ = "0.1.0"
