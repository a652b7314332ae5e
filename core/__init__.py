"""Cross-cutting pieces at the bottom of the dependency graph: settings, database, errors, and the
process's Prometheus metrics (metrics.py)."""
