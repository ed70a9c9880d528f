"""What a run is, torch-free: the names of methods, baselines and reductions (``choices``), value checks
(``checks``), ``ModelRecipe`` and its hash (``recipe``), ``RunSpec``, hashed into a run's name (``spec``),
``Runtime``, never hashed (``runtime``), and the named presets (``presets``).

Imports only the leaves (``opdlab.errors``); this file imports nothing, so building a spec loads no torch.
"""
