"""A run is carried by one attempt at a time: claimed atomically, kept alive by its heartbeat
through every phase, and an attempt taken for dead writes nothing more, least of all a champion."""

import threading
import time
from datetime import timedelta

import pytest
from redis import Redis
from sqlalchemy import update
from sqlalchemy.orm import Session

from tests.factories import make_tenant
from tests.training.helpers import FAST, start
from training import attempts, registry, scheduling
from training.models import Adapter, AdapterStatus, RunStatus, TrainingRun, utcnow
from training.pipeline import execute_run
from training.runs import create_run
from training.tasks import enqueue, waiting_in_broker


def test_two_deliveries_racing_for_one_run_claim_it_once(postgres_engine, run_settings):
    """Both read `queued`; the claim is one UPDATE, so the second waits for the first's row lock
    and then finds the run running."""
    with Session(postgres_engine) as setup, setup.begin():
        run_id = create_run(setup, make_tenant(setup).id, trigger="api", requested_by="test").id
    results = {}

    def second_delivery() -> None:
        with Session(postgres_engine) as session, session.begin():
            results["second"] = attempts.claim(session, run_id, run_settings)

    with Session(postgres_engine) as first:
        results["first"] = attempts.claim(first, run_id, run_settings)  # holds the row until it commits
        second = threading.Thread(target=second_delivery)
        second.start()
        time.sleep(0.5)
        assert second.is_alive(), "the second claim must wait for the first"
        first.commit()
    second.join(10)
    assert results == {"first": 1, "second": None}


def test_a_redelivered_run_is_not_trained_again(sessions, run_settings, tenant_with_corrections):
    run_id = start(sessions, tenant_with_corrections)
    with sessions() as session:
        assert attempts.claim(session, run_id, run_settings) == 1
    lines = []
    assert execute_run(run_id, run_settings, sessions=sessions, echo=lines.append) == RunStatus.running
    assert lines == [f"run {run_id} is running; not started again"]
    with sessions() as session:
        assert session.get(TrainingRun, run_id).attempts == 1


def test_an_attempt_taken_for_dead_during_evaluation_promotes_nothing(sessions, run_settings, tenant_with_corrections):
    """While the first attempt evaluates, the sweep takes it for dead and a second delivery
    claims the run: the first attempt must stop, not promote its candidate."""
    run_id = start(sessions, tenant_with_corrections, FAST | {"epochs": 1})
    stale = run_settings.model_copy(update={"stale_after_s": 600})

    def second_delivery_during_evaluation(line: str) -> None:
        if "evaluating on held-out" in line:
            with sessions() as session:
                session.execute(
                    update(TrainingRun)
                    .where(TrainingRun.id == run_id)
                    .values(heartbeat_at=utcnow() - timedelta(seconds=601))
                )
            with sessions() as session:
                assert attempts.claim(session, run_id, stale) == 2

    status = execute_run(run_id, stale, sessions=sessions, echo=second_delivery_during_evaluation)
    assert status == RunStatus.running  # the run belongs to attempt 2 now
    with sessions() as session:
        run = session.get(TrainingRun, run_id)
        assert (run.status, run.attempts, run.report) == (RunStatus.running, 2, None)
        assert registry.champion(session, tenant_with_corrections.id) is None
        candidate = session.query(Adapter).filter_by(training_run_id=run_id).one()
        assert candidate.status == AdapterStatus.candidate  # attempt 2 rejects it when it starts


def test_the_heartbeat_goes_on_while_a_long_phase_runs(sessions, run_settings, tenant_with_corrections):
    run_id = start(sessions, tenant_with_corrections, FAST | {"epochs": 1})
    quick = run_settings.model_copy(update={"stale_after_s": 0.6})  # a beat every 0.1 s
    heard = []

    def slow_evaluation(line: str) -> None:
        if "evaluating on held-out" in line:
            time.sleep(1.5)  # a phase longer than stale_after_s, with no progress of its own
            with sessions() as session:
                heard.append((utcnow() - session.get(TrainingRun, run_id).heartbeat_at).total_seconds())

    assert execute_run(run_id, quick, sessions=sessions, echo=slow_evaluation) in (
        RunStatus.promoted,
        RunStatus.rejected,
    )
    assert heard and heard[0] < 0.5, f"last heartbeat {heard[0]:.2f}s before the end of a 1.5 s phase"


@pytest.mark.usefixtures("worker_settings")
def test_a_run_waiting_behind_a_long_one_is_not_sent_again(sessions, worker_settings, tenant_with_corrections):
    run_id = start(sessions, tenant_with_corrections)
    assert enqueue([run_id]) == [run_id]  # no worker: the message waits in the queue
    long_ago = worker_settings.model_copy(update={"requeue_after_s": 0.01})
    time.sleep(0.05)
    assert run_id in waiting_in_broker()
    with sessions() as session:
        assert scheduling.runs_to_enqueue(session, long_ago, waiting=waiting_in_broker()) == []
    Redis.from_url(worker_settings.redis_url).flushdb()  # the message is lost
    with sessions() as session:
        assert scheduling.runs_to_enqueue(session, long_ago, waiting=waiting_in_broker()) == [run_id]
