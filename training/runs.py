"""Training runs as rows: create one, find the active one, look runs up, export a run's dataset
snapshot, and the folder of its reports. Light on purpose: the routes, the dashboard and the
scheduler import this, never the trainer or the evaluation (training/pipeline.py runs a run)."""

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound
from core.settings import Settings
from feedback.models import Split
from training.config import TrainConfig
from training.models import ACTIVE_RUN_STATUSES, DatasetSnapshot, RunStatus, SnapshotKind, TrainingRun


def create_run(
    session: Session,
    tenant_id: int,
    *,
    trigger: str,
    requested_by: str,
    overrides: dict | None = None,
    composition: dict | None = None,
) -> TrainingRun:
    """A queued run; the database refuses a second active run for the same tenant. With a
    composition (training/compose.plan) the run combines adapters instead of training one."""
    config = TrainConfig.with_overrides(overrides)
    run = TrainingRun(
        composition=composition,
        tenant_id=tenant_id,
        status=RunStatus.queued,
        trigger=trigger,
        requested_by=requested_by,
        config=config.as_dict(),
        loss_history=[],
    )
    try:
        with session.begin_nested():
            session.add(run)
    except IntegrityError:
        active = active_run(session, tenant_id)
        raise Conflict(
            f"run {active.id if active else '?'} is already {active.status if active else 'active'} "
            "for this tenant; wait for it to finish"
        ) from None
    return run


def active_run(session: Session, tenant_id: int) -> TrainingRun | None:
    return session.scalar(
        select(TrainingRun).where(TrainingRun.tenant_id == tenant_id, TrainingRun.status.in_(ACTIVE_RUN_STATUSES))
    )


def get_run(session: Session, tenant_id: int, run_id: int) -> TrainingRun:
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.tenant_id == tenant_id))
    if run is None:
        raise NotFound(f"no training run {run_id}")
    return run


def list_runs(session: Session, tenant_id: int, *, limit: int) -> list[TrainingRun]:
    query = select(TrainingRun).where(TrainingRun.tenant_id == tenant_id).order_by(TrainingRun.id.desc())
    return list(session.scalars(query.limit(limit)))


def export_snapshot(session: Session, snapshot_id: int, settings: Settings) -> str:
    """A stored dataset snapshot as JSONL, rebuilt from its corrections and checked against its hash."""
    from agent.base_model import load_tokenizer  # torch and transformers: not for the scheduler's worker
    from training.dataset import build_dataset

    snapshot = session.get(DatasetSnapshot, snapshot_id)
    dataset = build_dataset(
        session,
        tenant_id=snapshot.tenant_id,
        instructions=snapshot.instructions,
        split=Split(snapshot.split),
        tokenizer=load_tokenizer(settings),
        settings=settings,
        max_length=snapshot.max_length,
        kind=SnapshotKind(snapshot.kind),
        up_to_correction_id=snapshot.max_correction_id,
    )
    if dataset.content_hash != snapshot.content_hash:
        raise Conflict(f"snapshot {snapshot_id} can no longer be rebuilt exactly (its hash differs)")
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dataset.rows)


def run_dir(settings: Settings, run_id: int) -> Path:
    folder = settings.reports_dir / f"run-{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
