"""The fault suite's short version (bench/faults.py has the long one: `make faults`): one fault of
each kind on each database while reviewers keep correcting, then its invariants; on SQLite also
that no process ever failed on the write lock (the demo's first training attempt once did)."""

import json

import pytest

from bench.faults import KINDS, run, violations


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_corrections_answered_2xx_survive_killed_processes_redis_restarts_and_dropped_connections(
    database, tiny_base_dir, tmp_path
):
    kinds = [kind for kind in KINDS if database == "postgres" or kind != "db_drop"]
    figures = run(database, len(kinds), tmp_path, tiny_base_dir, reviewers=2, settle_s=1.0)
    print(json.dumps(figures, indent=2))
    summary = {name: figures[name] for name in ("seconds", "faults_injected", "faults_missed", "status_counts")}
    assert figures["faults_injected"] == dict.fromkeys(kinds, 1), summary
    assert violations(figures) == [], {
        "logged_errors": figures["logged_errors"],
        "status_counts": figures["status_counts"],
    }
    assert not [error for error in figures["logged_errors"] if "database is locked" in error]
