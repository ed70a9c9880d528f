"""Numbers rendered from committed data: how a committed table is read and its cells formatted
(``format``), what is rendered where (``render``, with ``--check`` for CI), and docs/audit.md's table
(``audit_table``).

Imports ``experiments`` and every folder below it; this file imports nothing.
"""
