"""opdlab: on-policy distillation with any f-divergence, the stop-gradient bias, and OPD+.

Modules: ``choices`` (the names of methods, baselines, reductions), ``divergences`` (the registry),
``estimators`` (advantages, baselines, surrogates), ``sparse`` (OPD+ from a top-k teacher), ``toy`` (exact
toy problems), ``sparse_toy`` (the top-k estimator on them), ``symbolic`` (the derivation), ``montecarlo``,
``tasks``, ``lm`` (tokenizer, models, SFT, sampling, cache), ``config``, ``train``, ``runlog``, ``sweep``,
``plots``, ``widgets``, ``cli``. The README's map gives the layers; the math is in docs/math.md.
"""
__version__ = "0.1.0"
