"""Training real students: the one step in four phases, sample, score, loss, update (``step``), the models
of a run (``models``), evaluation with per-item records (``evaluate``), the disk cache of start evaluations
(``references``), a run's lifecycle and loop with checkpoints and resume (``loop``), R runs in lockstep (``cohort``)
and their loop (``cohort_loop``), and data-parallel runs under torchrun (``distributed``).

Imports ``rundir``, ``lm``, ``core``, ``tasks``, ``config`` and the leaves; this file imports nothing.
"""
