"""The training runs and the gate's decisions as Prometheus metrics, read from the database at
scrape time: runs are trained in Celery workers, on other processes and machines, so only the
database knows them all. Three cheap queries: a GROUP BY over the runs, one over the shadows'
decisions in the audit log, and the runs in progress."""

import logging

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from core.db import Sessions
from feedback.models import Tenant
from training.attempts import IN_PROGRESS
from training.models import AdapterEvent, RunStatus, TrainingRun

log = logging.getLogger(__name__)


def collect(sessions: Sessions) -> list[Metric]:
    """The families, or only `draftloop_training_metrics_up` 0 when the database cannot answer
    (the scrape still shows the process's own metrics)."""
    up = GaugeMetricFamily("draftloop_training_metrics_up", "1 if the training metrics were read from the database")
    try:
        with sessions(read_only=True) as session:
            by_status = dict(
                session.execute(select(TrainingRun.status, func.count()).group_by(TrainingRun.status)).all()
            )
            shadow_decisions = dict(
                session.execute(
                    select(AdapterEvent.action, func.count())
                    .where(AdapterEvent.scores.is_not(None))
                    .group_by(AdapterEvent.action)
                ).all()
            )
            in_progress = session.execute(
                select(Tenant.slug, TrainingRun.id, TrainingRun.step, TrainingRun.total_steps)
                .join(Tenant, Tenant.id == TrainingRun.tenant_id)
                .where(TrainingRun.status.in_(IN_PROGRESS))
            ).all()
    except SQLAlchemyError as error:
        log.warning("training metrics not read: %s", error)
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)

    runs = GaugeMetricFamily("draftloop_training_runs", "Training runs in the database, by status", labels=["status"])
    for status in RunStatus:
        runs.add_metric([status.value], by_status.get(status, 0))
    decisions = CounterMetricFamily(
        "draftloop_gate_decisions",
        "The gate's decisions on training runs: promoted, shadowed (passed, in shadow) or rejected",
        labels=["decision"],
    )
    for status in (RunStatus.promoted, RunStatus.shadowed, RunStatus.rejected):
        decisions.add_metric([status.value], by_status.get(status, 0))
    shadows = CounterMetricFamily(
        "draftloop_shadow_decisions",
        "Shadows decided on their live scores: promoted or rejected",
        labels=["decision"],
    )
    for action, decision in (("promote", "promoted"), ("reject", "rejected")):
        shadows.add_metric([decision], shadow_decisions.get(action, 0))
    step = GaugeMetricFamily(
        "draftloop_training_run_step", "The training step of each run in progress", labels=["tenant", "run"]
    )
    total = GaugeMetricFamily(
        "draftloop_training_run_total_steps", "The training steps of each run in progress", labels=["tenant", "run"]
    )
    for slug, run_id, run_step, total_steps in in_progress:
        step.add_metric([slug, str(run_id)], run_step)
        total.add_metric([slug, str(run_id)], total_steps)
    return [up, runs, decisions, shadows, step, total]
