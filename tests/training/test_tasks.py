"""The loop on the real Celery worker and the real Redis broker (no eager mode)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import redis
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient
from sqlalchemy import select

from agent.base_model import load_base_model
from agent.drafting import Drafter
from api.app import create_app
from api.deps import drafter
from core.db import session_scope
from core.errors import Conflict
from tests.training.helpers import FAST, add_corrections, tenant_with_history
from training import registry, scheduling
from training.celery_app import app as celery_app
from training.models import RunStatus, TrainingRun
from training.runs import create_run
from training.tasks import enqueue, waiting_in_broker


def wait_for(run_id: int, done, timeout=180) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            status = session.get(TrainingRun, run_id).status
        if not seen or seen[-1] != status:
            seen.append(status)
        if done(status):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} stuck; statuses seen: {seen}")


def test_a_triggered_run_is_trained_by_the_worker_and_the_next_draft_uses_it(worker_settings):
    tenant, admin_key = tenant_with_history()
    app = create_app()
    app.dependency_overrides[drafter] = lambda: Drafter.local(load_base_model(worker_settings), worker_settings)
    with start_worker(celery_app, pool="solo", perform_ping_check=False), TestClient(app) as client:
        response = client.post("/v1/runs", json={"overrides": FAST}, headers={"X-API-Key": admin_key})
        assert response.status_code == 202 and response.json()["status"] == "queued"
        run_id = response.json()["id"]
        seen = wait_for(run_id, lambda s: s in (RunStatus.promoted, RunStatus.rejected, RunStatus.failed))
        run = client.get(f"/v1/runs/{run_id}", headers={"X-API-Key": admin_key}).json()
        assert seen[-1] == RunStatus.promoted, run
        assert seen[0] in (RunStatus.queued, RunStatus.running) and run["step"] == run["total_steps"] > 0
        assert run["report"]["decision"]["promote"] and run["decision_reason"]
        champion = client.get("/v1/adapters", headers={"X-API-Key": admin_key}).json()[0]
        assert champion["status"] == "champion" and champion["training_run_id"] == run_id
        email = {"sender": "Dana <d@example.com>", "subject": "Order", "body": "Where is it?", "max_new_tokens": 4}
        draft = client.post("/v1/drafts", json=email, headers={"X-API-Key": admin_key}).json()
        assert draft["adapter_id"] == champion["id"]
        exported = client.get(f"/v1/runs/{run_id}/dataset", headers={"X-API-Key": admin_key})
        assert exported.status_code == 200 and len(exported.text.splitlines()) == run["report"]["training"]["rows"]


def test_beat_creates_runs_only_when_due(worker_settings):
    tenant, _ = tenant_with_history(count=10)
    with session_scope() as session:
        assert scheduling.schedule_due_runs(session, worker_settings) == []
    with session_scope() as session:
        add_corrections(session, session.merge(tenant), 30)
    with session_scope() as session:
        created = scheduling.schedule_due_runs(session, worker_settings)
        assert len(created) == 1 and session.get(TrainingRun, created[0]).tenant_id == tenant.id
    with session_scope() as session:  # it has an active run now
        assert tenant.id not in {
            session.get(TrainingRun, i).tenant_id for i in scheduling.schedule_due_runs(session, worker_settings)
        }


def test_concurrent_triggers_create_one_active_run(worker_settings):
    tenant, _ = tenant_with_history(count=4)
    barrier, outcomes = threading.Barrier(4), []

    def trigger():
        barrier.wait()
        try:
            with session_scope() as session:
                outcomes.append(create_run(session, tenant.id, trigger="api", requested_by="t").id)
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=trigger) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=str).count("conflict") == 3
    with session_scope() as session:
        active = session.scalars(select(TrainingRun).where(TrainingRun.tenant_id == tenant.id)).all()
        assert len(active) == 1 and active[0].status == RunStatus.queued


def test_a_worker_killed_mid_training_leaves_the_champion_and_the_run_is_retried(worker_settings):
    tenant, _ = tenant_with_history()
    with session_scope() as session:
        run_id = create_run(session, tenant.id, trigger="api", requested_by="t", overrides=FAST | {"epochs": 40}).id
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "training.celery_app",
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "WARNING",
        ],
        env=os.environ.copy(),
    )
    try:
        enqueue([run_id])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with session_scope() as session:
                if session.get(TrainingRun, run_id).step >= 2:
                    break
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.kill()
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        assert run.status == RunStatus.running and 2 <= run.step < run.total_steps
        assert registry.champion(session, tenant.id) is None

    stale = worker_settings.model_copy(update={"stale_after_s": 0})
    with session_scope() as session:
        assert run_id in scheduling.recover_stalled_runs(session, stale)
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        assert run.status == RunStatus.queued and "stopped reporting" in run.error
        assert registry.champion(session, tenant.id) is None  # nothing promoted unevaluated
        assert run_id in scheduling.runs_to_enqueue(session, worker_settings, waiting=waiting_in_broker())

    out_of_attempts = stale.model_copy(update={"max_attempts": 1})
    with session_scope() as session:  # the same silence with no attempts left fails it visibly
        run = session.get(TrainingRun, run_id)
        run.status = RunStatus.running
    with session_scope() as session:
        assert run_id not in scheduling.recover_stalled_runs(session, out_of_attempts)
        run = session.get(TrainingRun, run_id)
        assert run.status == RunStatus.failed and "no attempts left" in run.error


def _reconnect() -> None:
    """Make the app open new broker connections, to whatever its broker_url says now."""
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_with_redis_down_work_is_stored_and_the_run_is_sent_when_redis_is_back(worker_settings, monkeypatch):
    port = _free_port()
    monkeypatch.setitem(celery_app.conf, "broker_url", f"redis://127.0.0.1:{port}/0")
    _reconnect()
    tenant, admin_key = tenant_with_history(count=4)
    app = create_app()
    app.dependency_overrides[drafter] = lambda: Drafter.local(load_base_model(worker_settings), worker_settings)
    email = {"sender": "Dana <d@example.com>", "subject": "Order", "body": "Where is it?", "max_new_tokens": 4}
    with TestClient(app) as client:
        headers = {"X-API-Key": admin_key}
        draft = client.post("/v1/drafts", json=email, headers=headers)
        assert draft.status_code == 201
        correction = client.post(
            f"/v1/drafts/{draft.json()['id']}/correction", json={"verdict": "accepted"}, headers=headers
        )
        assert correction.status_code == 201
        run = client.post("/v1/runs", json={}, headers=headers)
        assert run.status_code == 202 and run.json()["status"] == "queued"
    with session_scope() as session:
        assert session.get(TrainingRun, run.json()["id"]).enqueued_at is None

    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"])
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        _reconnect()
        from training.tasks import sweep_runs

        sent = sweep_runs()
        assert run.json()["id"] in sent and client.llen("celery") == len(sent)
    finally:
        server.terminate()
        server.wait(10)
        monkeypatch.undo()
        _reconnect()
