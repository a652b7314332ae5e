"""Celery tasks: thin wrappers that take ids, open sessions and call the plain functions."""

import json
import logging
import uuid

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update

from core.db import session_scope
from core.settings import get_settings
from training import scheduling
from training.celery_app import TRAINING_QUEUE, app
from training.models import TrainingRun, utcnow

log = logging.getLogger(__name__)


def enqueue(run_ids: list[int]) -> list[int]:
    """Send runs to the broker (after their rows are committed); returns those sent. A run the
    broker did not take stays queued and is sent again by the sweep."""
    sent = []
    for run_id in run_ids:
        try:
            train_run.apply_async(
                args=[run_id], task_id=f"{TASK_ID_PREFIX}{run_id}-{uuid.uuid4().hex[:12]}", retry=False
            )
        except Exception as error:  # the broker is down: the sweep sends it later
            log.warning("run %s stays queued: the broker refused it (%s)", run_id, error)
            continue
        with session_scope() as session:
            session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(enqueued_at=utcnow()))
        sent.append(run_id)
    return sent


TASK_ID_PREFIX = "train-run-"


def waiting_in_broker() -> set[int]:
    """Runs with a message waiting in the training queue: not lost, only behind other runs."""
    with app.connection_for_read() as connection:
        messages = connection.default_channel.client.lrange(TRAINING_QUEUE, 0, -1)
    task_ids = (json.loads(message)["headers"]["id"] for message in messages)
    return {int(t[len(TASK_ID_PREFIX) :].split("-")[0]) for t in task_ids if t.startswith(TASK_ID_PREFIX)}


@app.task(name="training.tasks.train_run")
def train_run(run_id: int) -> str:
    from training.pipeline import execute_run  # the trainer and the evaluation: heavy, and only the worker runs them

    try:
        return execute_run(run_id, get_settings(), echo=log.info)
    except SoftTimeLimitExceeded:
        log.error("run %s hit the time limit", run_id)
        raise


# The periodic tasks are short and idempotent, and the next tick does their work again: each is
# acknowledged when a worker takes it, never given back hours later (the visibility timeout).
@app.task(name="training.tasks.schedule_due_runs", acks_late=False)
def schedule_due_runs() -> list[int]:
    with session_scope() as session:
        created = scheduling.schedule_due_runs(session, get_settings())
    return enqueue(created)


@app.task(name="training.tasks.sweep_runs", acks_late=False)
def sweep_runs() -> list[int]:
    settings = get_settings()
    with session_scope() as session:
        scheduling.recover_stalled_runs(session, settings)
    with session_scope() as session:
        pending = scheduling.runs_to_enqueue(session, settings, waiting=waiting_in_broker())
        due = scheduling.due_shadows(session)
    for tenant_id in due:  # decided where the registry and the base model are: a training worker
        try:
            decide_shadow.apply_async(args=[tenant_id], expires=settings.sweep_every_s, retry=False)
        except Exception as error:  # the broker is down: the next sweep sends it
            log.warning("the shadow of tenant %s waits: the broker refused it (%s)", tenant_id, error)
    return enqueue(pending)


@app.task(name="training.tasks.decide_shadow", acks_late=False)
def decide_shadow(tenant_id: int) -> str | None:
    """Decide a tenant's shadow that is due (idempotent: one decided already is left alone)."""
    from training import shadow  # the registry's checks: torch, and only the training worker has it

    with session_scope() as session:
        return shadow.decide(session, get_settings(), tenant_id)
