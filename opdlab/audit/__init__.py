"""What a peer's per-token loss really follows: what an audited estimator is (``types``), each peer's source
pinned to its lines (``sources``), the field's estimators as their sources write them (``catalogue``), the exact
expected gradient of any loss against every divergence (``expected``), and ``assert_unbiased`` for a user's own
loss (``testing``, public as ``opdlab.testing``).

Imports ``exact``, ``core``, ``config`` and the leaves; this file imports nothing.
"""
