"""The fault suite's short version (bench/faults.py has the long one: `make faults`): one fault of
each kind on PostgreSQL while reviewers keep correcting, then its invariants."""

import json

from bench.faults import KINDS, run, violations


def test_corrections_answered_2xx_survive_killed_processes_redis_restarts_and_dropped_connections(
    tiny_base_dir, tmp_path
):
    figures = run("postgres", len(KINDS), tmp_path, tiny_base_dir, reviewers=2, settle_s=1.0)
    print(json.dumps(figures, indent=2))
    summary = {name: figures[name] for name in ("seconds", "faults_injected", "faults_missed", "status_counts")}
    assert figures["faults_injected"] == dict.fromkeys(KINDS, 1), summary
    assert violations(figures) == [], {
        "logged_errors": figures["logged_errors"],
        "status_counts": figures["status_counts"],
    }
