"""The Celery application: Redis broker and result backend, settings for long training tasks,
and the beat schedule. Start a worker with `draftloop worker` and the scheduler with `draftloop beat`."""

from celery import Celery

from core.settings import get_settings

settings = get_settings()

app = Celery("draftloop", broker=settings.redis_url, backend=settings.redis_url, include=["training.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_expires=7 * 24 * 3600,
    # A training task is long and must not be lost: acknowledge it only when it is done, give it
    # back to the queue if the worker dies, and let each worker take one task at a time.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=settings.run_time_limit_s,
    task_time_limit=settings.run_time_limit_s + 120,
    # Redis redelivers an unacknowledged task after this long: longer than the longest run.
    broker_transport_options={"visibility_timeout": settings.run_time_limit_s + 600},
    result_backend_transport_options={"visibility_timeout": settings.run_time_limit_s + 600},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "schedule-due-runs": {"task": "training.tasks.schedule_due_runs", "schedule": settings.schedule_every_s},
        "sweep-runs": {"task": "training.tasks.sweep_runs", "schedule": settings.sweep_every_s},
    },
)
