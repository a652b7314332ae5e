"""The loop on the real Celery workers and the real Redis broker (no eager mode)."""

import json
import pkgutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import redis
from celery.beat import Scheduler
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient
from sqlalchemy import select

import api.routes
from agent.base_model import load_base_model
from agent.drafting import Drafter
from api.app import create_app
from api.deps import drafter
from core.db import session_scope
from core.errors import Conflict
from tests.live import kill9, spawn, wait_until
from tests.training.helpers import FAST, add_corrections, tenant_with_history
from training import registry, scheduling
from training.celery_app import SCHEDULING_QUEUE, TRAINING_QUEUE
from training.celery_app import app as celery_app
from training.models import RunStatus, TrainingRun
from training.runs import active_run, create_run
from training.tasks import enqueue, schedule_due_runs, sweep_runs, train_run, waiting_in_broker


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


def start_worker_process(queue: str, logs: Path) -> subprocess.Popen:
    """`draftloop worker --queue <queue>`, as production runs it, in its own process group."""
    return spawn([sys.executable, "-m", "api.cli", "worker", "--queue", queue], logs / f"worker-{queue}.log")


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


def test_a_worker_killed_mid_training_leaves_the_champion_and_the_run_is_retried(worker_settings, tmp_path):
    tenant, _ = tenant_with_history()
    with session_scope() as session:
        run_id = create_run(session, tenant.id, trigger="api", requested_by="t", overrides=FAST | {"epochs": 40}).id
    worker = start_worker_process(TRAINING_QUEUE, tmp_path)
    try:
        enqueue([run_id])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with session_scope() as session:
                if session.get(TrainingRun, run_id).step >= 2:
                    break
            time.sleep(0.2)
    finally:
        kill9(worker)  # the worker and its pool child, which trains the run
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
        assert run.json()["id"] in sent and client.llen(TRAINING_QUEUE) == len(sent)
    finally:
        server.terminate()
        server.wait(10)
        monkeypatch.undo()
        _reconnect()


def _headers(message: bytes) -> dict:
    return json.loads(message)["headers"]


def test_runs_go_to_the_training_queue_and_beats_tasks_to_the_scheduling_queue_expiring_at_their_interval(
    worker_settings,
):
    tenant, _ = tenant_with_history(count=4)
    with session_scope() as session:
        run_id = create_run(session, tenant.id, trigger="api", requested_by="t").id
    assert enqueue([run_id]) == [run_id]
    beat = Scheduler(celery_app)  # beat's own scheduler, on the app's schedule; no worker is running
    sent_at = time.time()
    for entry in beat.schedule.values():
        beat.apply_async(entry, advance=False)

    broker = redis.Redis.from_url(worker_settings.redis_url)
    assert [_headers(m)["task"] for m in broker.lrange(TRAINING_QUEUE, 0, -1)] == ["training.tasks.train_run"]
    assert waiting_in_broker() == {run_id}
    intervals = {
        "training.tasks.schedule_due_runs": worker_settings.schedule_every_s,
        "training.tasks.sweep_runs": worker_settings.sweep_every_s,
    }
    periodic = {h["task"]: h for h in map(_headers, broker.lrange(SCHEDULING_QUEUE, 0, -1))}
    assert periodic.keys() == intervals.keys()
    for task, headers in periodic.items():  # each expires one interval after beat sent it
        expires_in = datetime.fromisoformat(headers["expires"]).timestamp() - sent_at
        assert intervals[task] - 5 < expires_in <= intervals[task] + 1, (task, expires_in)
    assert broker.keys("celery") == []  # nothing in Celery's default queue, which no worker reads


def test_scheduling_goes_on_while_a_run_holds_the_training_worker(worker_settings, tmp_path, monkeypatch):
    # For the scheduling worker: the sweep would send again, at once, a queued run that it did
    # not see waiting in the training queue.
    monkeypatch.setenv("DRAFTLOOP_REQUEUE_AFTER_S", "0.01")
    held, _ = tenant_with_history()
    with session_scope() as session:
        held_run = create_run(session, held.id, trigger="api", requested_by="t", overrides=FAST | {"epochs": 50}).id
    due, _ = tenant_with_history()  # more new corrections than DRAFTLOOP_MIN_NEW_CORRECTIONS, no run
    workers = [start_worker_process(queue, tmp_path) for queue in (TRAINING_QUEUE, SCHEDULING_QUEUE)]
    try:
        enqueue([held_run])
        wait_for(held_run, lambda status: status == RunStatus.running, timeout=120)

        created = schedule_due_runs.delay().get(timeout=60)  # done by the scheduling worker
        with session_scope() as session:
            due_run = active_run(session, due.id)
            assert due_run is not None and due_run.id in created and due_run.enqueued_at is not None
        assert due_run.id in waiting_in_broker()  # behind the held run: the training worker took one
        assert due_run.id not in sweep_runs.delay().get(timeout=60)  # waiting, not lost: not sent again
        with session_scope() as session:  # all the while, the run held the training worker
            run = session.get(TrainingRun, held_run)
            assert run.status == RunStatus.running and run.finished_at is None
    finally:
        for worker in workers:
            kill9(worker)


def _pool(worker: subprocess.Popen) -> set[int]:
    """The worker's pool processes (its children)."""
    return {int(pid) for pid in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()}


def test_the_training_worker_runs_each_task_in_a_fresh_process(worker_settings, tmp_path):
    tenant, _ = tenant_with_history(count=4)
    run_ids = []
    for _ in range(2):  # finished runs: the task only reads them, so the test is quick
        with session_scope() as session:
            run = create_run(session, tenant.id, trigger="api", requested_by="t")
            run.status = RunStatus.failed
            session.flush()
            run_ids.append(run.id)
    worker = start_worker_process(TRAINING_QUEUE, tmp_path)
    try:
        wait_until(lambda: len(_pool(worker)) == 1, 60, "the training worker's pool process")
        pools = [_pool(worker)]
        for run_id in run_ids:
            assert train_run.apply_async(args=[run_id]).get(timeout=60) == RunStatus.failed
            wait_until(lambda: len(now := _pool(worker)) == 1 and now != pools[-1], 30, "a new pool process")
            pools.append(_pool(worker))
        assert len(set.union(*pools)) == 3, pools  # each task ran in a process of its own, then a third waits
    finally:
        kill9(worker)


def loaded_after(imports: str, modules: tuple[str, ...]) -> str:
    """Which of `modules` a fresh interpreter holds after `imports` (an import statement)."""
    script = f"import sys; {imports}; print([m for m in {modules!r} if m in sys.modules])"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def test_the_scheduling_worker_loads_no_torch():
    """The worker for beat's tasks imports what the tasks module imports: torch only on a training worker."""
    assert loaded_after("import training.tasks", ("torch", "transformers", "peft", "trl")) == "[]"


def test_the_api_and_the_run_lookups_load_no_trainer():
    """The API, its routes and pages, and the modules that create, list and schedule runs import
    nothing of training or evaluation (torch and transformers they do: the API drafts), nor the
    `gguf` package (an export in that format imports it when it writes one)."""
    routes = ", ".join(f"api.routes.{module.name}" for module in pkgutil.iter_modules(api.routes.__path__))
    imports = f"import api.app, api.web.dashboard, {routes}, training.runs, training.scheduling"
    trainer = ("trl", "sacrebleu", "matplotlib", "datasets", "bitsandbytes", "gguf", "training.gguf")
    assert loaded_after(imports, (*trainer, "training.pipeline", "training.train", "training.evaluate")) == "[]"
