"""The Celery application: Redis broker and result backend, the two queues and their workers,
settings for long training tasks, and the beat schedule. Start the workers with
`draftloop worker --queue training` and `draftloop worker --queue scheduling`, the scheduler
with `draftloop beat`."""

from celery import Celery
from kombu import Queue

from core.settings import get_settings

settings = get_settings()

# Training runs have a queue of their own, and beat's periodic tasks another, each with its own
# worker: a run of hours never delays the schedule or the sweep.
TRAINING_QUEUE, SCHEDULING_QUEUE = "training", "scheduling"
# Each queue's worker takes one task at a time (prefetch 1, below); a training worker runs each
# run in a fresh process, so that nothing of one run (GPU memory above all) outlives it.
WORKER_OPTIONS = {
    TRAINING_QUEUE: ["--concurrency", "1", "--pool", "prefork", "--max-tasks-per-child", "1"],
    SCHEDULING_QUEUE: ["--concurrency", "1", "--pool", "prefork"],
}

app = Celery("draftloop", broker=settings.redis_url, backend=settings.redis_url, include=["training.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_expires=7 * 24 * 3600,
    # Declared, so that a purge empties both; each worker consumes the one it is started for.
    task_queues=[Queue(name, routing_key=name) for name in (TRAINING_QUEUE, SCHEDULING_QUEUE)],
    task_routes={
        "training.tasks.train_run": {"queue": TRAINING_QUEUE},
        "training.tasks.decide_shadow": {"queue": TRAINING_QUEUE},
        "training.tasks.schedule_due_runs": {"queue": SCHEDULING_QUEUE},
        "training.tasks.sweep_runs": {"queue": SCHEDULING_QUEUE},
    },
    # A training task is long and must not be lost: acknowledge it only when it is done, give it
    # back to the queue if the worker dies, and let each worker take one task at a time (so the
    # runs behind it wait in the queue, where the sweep sees them). The periodic tasks opt out of
    # acks_late (training/tasks.py).
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
    # A periodic task still waiting after its interval is dropped: the next one does its work.
    beat_schedule={
        "schedule-due-runs": {
            "task": "training.tasks.schedule_due_runs",
            "schedule": settings.schedule_every_s,
            "options": {"expires": settings.schedule_every_s},
        },
        "sweep-runs": {
            "task": "training.tasks.sweep_runs",
            "schedule": settings.sweep_every_s,
            "options": {"expires": settings.sweep_every_s},
        },
    },
)
