"""What enumeration proves: categorical and tabular autoregressive toys with exact objectives and gradients
(``toy``), the top-k estimator's exact moments on them (``topk_toy``), and the bias derived with sympy for any f
(``symbolic``).

Imports ``core``, ``config`` and the leaves; this file imports nothing.
"""
