"""What a person runs: the ``opdlab`` command (``cli``), papermill execution with checked parameters
(``notebooks``), the ipywidgets front ends (``widgets``) and the figures (``plots``).

Imports every folder below it; this file imports nothing.
"""
