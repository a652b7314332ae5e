"""The fault suite's short version (bench/faults.py has the long one: `make faults`): one fault of
each kind on PostgreSQL while reviewers keep correcting, then its invariants."""

import json

from bench.faults import KINDS, run


def test_corrections_answered_2xx_survive_killed_processes_redis_restarts_and_dropped_connections(
    tiny_base_dir, tmp_path
):
    figures = run("postgres", len(KINDS), tmp_path, tiny_base_dir, reviewers=2, settle_s=1.0)
    print(json.dumps(figures, indent=2))
    summary = {name: figures[name] for name in ("seconds", "faults_injected", "faults_missed", "status_counts")}
    assert figures["faults_injected"] == dict.fromkeys(KINDS, 1), summary
    assert figures["corrections_answered_2xx"] > 0, summary
    assert figures["lost_corrections"] == [] and figures["lost_drafts"] == [], figures
    assert figures["server_errors"] == [], figures | {"logged_errors": figures["logged_errors"]}
    assert figures["tenants_with_more_than_one_champion"] == [], figures
    assert figures["promoted_without_report"] == [], figures
    assert figures["runs_unrecovered"] == [], figures
