"""One attempt at a training run: claimed atomically, alive while its heartbeat beats, and the
only writer of its run while it owns it.

A run can be delivered twice (the sweep re-sends a run it takes for lost; Redis redelivers an
unacknowledged task), so a worker starts a run only by claiming it in one UPDATE that succeeds
for one attempt: a queued run, or a running one whose heartbeat went silent. Every write of an
attempt first checks, under the run's row lock, that the run is still its own (same attempt
number, still running or evaluating); an attempt that lost its run stops with `RunTaken` and
writes nothing more. A heartbeat thread keeps the run's heartbeat fresh through every phase
(building datasets, training, evaluating), so only a dead worker is taken for dead."""

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db import Sessions
from core.settings import Settings
from training.models import RunStatus, TrainingRun, utcnow

IN_PROGRESS = (RunStatus.running, RunStatus.evaluating)

log = logging.getLogger(__name__)


class RunTaken(Exception):
    """Another attempt owns the run now (this one was taken for dead), or it was decided."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def claim(session: Session, run_id: int, settings: Settings) -> int | None:
    """Take the run for a new attempt and return the attempt's number, or None when the run is
    not to be started: finished, or running in a worker that is still heard from."""
    now = utcnow()
    silent = TrainingRun.heartbeat_at < now - timedelta(seconds=settings.stale_after_s)
    claimable = (TrainingRun.status == RunStatus.queued) | (TrainingRun.status.in_(IN_PROGRESS) & silent)
    claimed = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, claimable)
        .values(status=RunStatus.running, started_at=now, heartbeat_at=now, attempts=TrainingRun.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:
        return None
    return session.scalar(select(TrainingRun.attempts).where(TrainingRun.id == run_id))


@dataclass(frozen=True)
class Attempt:
    run_id: int
    number: int
    sessions: Sessions

    def owned(self, session: Session) -> TrainingRun:
        """The run, locked until the session commits, if this attempt still owns it."""
        run = session.get(TrainingRun, self.run_id, with_for_update=True, populate_existing=True)
        if run.attempts != self.number or run.status not in IN_PROGRESS:
            message = f"run {self.run_id} is {run.status} in attempt {run.attempts}, not in this one ({self.number})"
            raise RunTaken(run.status, message)
        return run

    def beat(self) -> None:
        with self.sessions() as session:
            self.owned(session).heartbeat_at = utcnow()

    @contextmanager
    def heartbeat(self, every_s: float) -> Iterator[None]:
        """Beat every `every_s` seconds in a thread while the block runs. A lost run stops the
        beating; the block notices at its next owned() write."""
        stop = threading.Event()

        def beat_until_stopped() -> None:
            while not stop.wait(every_s):
                try:
                    self.beat()
                except RunTaken:
                    return
                except Exception as error:  # the database is away for a moment: beat again later
                    log.warning("run %s: heartbeat failed (%s)", self.run_id, error)

        thread = threading.Thread(target=beat_until_stopped, name=f"heartbeat-run-{self.run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
