"""Pool selection on reduced statistics (Frank-Wolfe, FW-Merging).

- :mod:`~distmerge.select.frank_wolfe`: the iteration, pure functions over fp64 scores;
- :mod:`~distmerge.select.objectives`: the data-free (Gram) and data objectives' scores;
- :mod:`~distmerge.select.gram`: exact inner products of row blocks (the workers' statistics);
- :mod:`~distmerge.select.gradient`: the data objective's gradient stage (plain torch);
- :mod:`~distmerge.select.pool`: the driver's side: checks at validation, the trace, metrics.

Importing this package imports none of them (the method imports only the pure modules, so
``distmerge.methods`` stays free of file systems).
"""
