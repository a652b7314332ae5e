"""Cross-cutting pieces at the bottom of the dependency graph: settings, database, errors."""
