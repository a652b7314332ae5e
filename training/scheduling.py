"""Which runs should exist and be on the queue: tenants due a retraining, runs whose message
never reached the broker, and runs whose worker died; and shadows due a decision that none was
made for. Plain functions; the caller commits and enqueues after the commit."""

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import Conflict
from core.settings import Settings
from feedback.models import Correction, Split, Tenant
from training.models import (
    ACTIVE_RUN_STATUSES,
    Adapter,
    AdapterStatus,
    DatasetSnapshot,
    RunStatus,
    ShadowDraft,
    TrainingRun,
    utcnow,
)
from training.runs import create_run


def new_train_corrections(session: Session, tenant_id: int) -> int:
    """Train-split corrections newer than the train snapshot of the tenant's latest run."""
    seen = session.scalar(
        select(DatasetSnapshot.max_correction_id)
        .join(TrainingRun, TrainingRun.train_snapshot_id == DatasetSnapshot.id)
        .where(TrainingRun.tenant_id == tenant_id)
        .order_by(TrainingRun.id.desc())
        .limit(1)
    )
    return session.scalar(
        select(func.count())
        .select_from(Correction)
        .where(Correction.tenant_id == tenant_id, Correction.split == Split.train, Correction.id > (seen or 0))
    )


def schedule_due_runs(session: Session, settings: Settings) -> list[int]:
    """Queue a run for every tenant with enough new train corrections and no active run."""
    active = select(TrainingRun.tenant_id).where(TrainingRun.status.in_(ACTIVE_RUN_STATUSES))
    created = []
    for tenant_id in session.scalars(select(Tenant.id).where(Tenant.id.not_in(active)).order_by(Tenant.id)):
        if new_train_corrections(session, tenant_id) < settings.min_new_corrections:
            continue
        try:
            run = create_run(session, tenant_id, trigger="schedule", requested_by="beat")
        except Conflict:  # a manual trigger won the race: one active run is enough
            continue
        created.append(run.id)
    return created


def runs_to_enqueue(session: Session, settings: Settings, *, waiting: set[int]) -> list[int]:
    """Queued runs that never reached the broker, or were sent long ago and are no longer waiting
    in its queue (`waiting`: a run behind a long one is not lost). A run taken from the queue by
    a worker that died before starting it is sent again; a duplicate delivery does no harm (a run
    is claimed once, training/attempts.py)."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after_s)
    queued = session.scalars(
        select(TrainingRun.id)
        .where(
            TrainingRun.status == RunStatus.queued,
            TrainingRun.enqueued_at.is_(None) | (TrainingRun.enqueued_at < cutoff),
        )
        .order_by(TrainingRun.id)
    )
    return [run_id for run_id in queued if run_id not in waiting]


def recover_stalled_runs(session: Session, settings: Settings) -> list[int]:
    """Runs whose worker stopped reporting: queued again for another attempt, or failed once
    they are out of attempts. Returns the ids queued again."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    stalled = session.scalars(
        select(TrainingRun).where(
            TrainingRun.status.in_((RunStatus.running, RunStatus.evaluating)), TrainingRun.heartbeat_at < cutoff
        )
    )
    retried = []
    for run in stalled:
        silence = f"its worker stopped reporting at {run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC (attempt {run.attempts})"
        if run.attempts >= settings.max_attempts:
            run.status, run.finished_at = RunStatus.failed, utcnow()
            run.error = f"{silence}; no attempts left of {settings.max_attempts}"
        else:
            run.status, run.enqueued_at = RunStatus.queued, None
            run.error = f"{silence}; queued again"
            retried.append(run.id)
    session.flush()
    return retried


def due_shadows(session: Session) -> list[int]:
    """Tenants whose shadow has its corrections scored and is still undecided: the decision after
    a correction failed or never ran (training/shadow.decide_after_correction), or the last scores
    came with a shadow draft stored after its correction."""
    scored = (
        select(ShadowDraft.adapter_id, func.count().label("scored"))
        .where(ShadowDraft.scored_at.is_not(None))
        .group_by(ShadowDraft.adapter_id)
        .subquery()
    )
    return list(
        session.scalars(
            select(Adapter.tenant_id)
            .join(scored, scored.c.adapter_id == Adapter.id)
            .join(Tenant, Tenant.id == Adapter.tenant_id)
            .where(Adapter.status == AdapterStatus.shadow, scored.c.scored >= Tenant.shadow_corrections)
            .order_by(Adapter.tenant_id)
        )
    )
