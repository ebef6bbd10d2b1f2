"""Importers: turn other tools' merge configs into distmerge pipelines.

:mod:`distmerge.importers.mergekit` translates a mergekit YAML (``distmerge import-mergekit``).
An importer is a pure function from the foreign mapping to a pipeline mapping plus warnings;
whatever it cannot carry exactly is named in a warning, and whatever would give a different
merge is refused with :class:`distmerge.errors.ConfigError`.
"""

from distmerge.importers.mergekit import from_mergekit, import_mergekit

__all__ = ["from_mergekit", "import_mergekit"]
