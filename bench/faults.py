"""The fault suite: reviewers keep submitting corrections (and the email product keeps asking for
drafts) through a live API while faults are injected, one per cycle, in turn:

- worker_kill: kill -9 of the training worker mid-training (its pool child too), then a new
  worker (the sweep, on the scheduling worker, queues the silent run again after
  DRAFTLOOP_STALE_AFTER_S);
- api_kill: kill -9 of the API while requests are in flight, then a new API process;
- redis_restart: the suite's own redis-server killed and started again, empty;
- db_drop: every connection to the PostgreSQL database terminated (pg_terminate_backend).

Then the invariants: every correction and draft answered 2xx is in the database as answered;
no adapter is ever promoted without its run's evaluation report; at most one champion per
tenant; no 500 (a client may see a 4xx or a 503 to retry, or no answer while a process is
down); every interrupted run is recovered (finished) by the end.

    python -m bench.faults                      # make faults: 12 cycles on PostgreSQL and SQLite
    python -m bench.faults --cycles 4 --databases postgres

The short version runs in the test suite (tests/reliability/test_faults.py). Everything runs on
the tests' tiny model, so training and drafting take seconds.
"""

import argparse
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import Correction, Draft
from tests.live import Live, RedisServer, drop_database, fresh_database, kill9, terminate_connections, wait_until
from training.celery_app import SCHEDULING_QUEUE, TRAINING_QUEUE
from training.models import ACTIVE_RUN_STATUSES, Adapter, AdapterEvent, AdapterStatus, TrainingRun

KINDS = ("worker_kill", "api_kill", "redis_restart", "db_drop")
# Plain LoRA on the tiny model, one epoch, no validation slice: a run of about ten steps, long
# enough to be killed in, short enough to be trained again before the suite ends.
TRAINING = {
    "quantization": "none",
    "compute_dtype": "float32",
    "epochs": 1,
    "batch_size": 8,
    "max_length": 256,
    "learning_rate": 1e-2,
    "validation_fraction": 0,
    "try_learning_rates": [],
}
SETTINGS = {
    "model_dtype": "float32",
    "stale_after_s": 4,  # a killed worker's run is queued again 4-5 s after its last step
    "sweep_every_s": 1,
    "requeue_after_s": 3,
    "max_attempts": 20,
    "schedule_every_s": 3600,  # runs come from the suite's triggers, with TRAINING
    "min_new_corrections": 1_000_000,
    "gate_min_heldout": 3,
    "eval_draft_examples": 2,
    "eval_max_new_tokens": 8,
}
SERVED, CLIENT_TIMEOUT_S = 30, 30


@dataclass
class Tally:
    """What the clients sent and were answered, shared by their threads."""

    statuses: Counter = field(default_factory=Counter)  # by status code; "no answer" when none came
    corrections: dict = field(default_factory=dict)  # draft id -> the correction answered 2xx
    drafts: dict = field(default_factory=dict)  # draft id -> the draft answered 201
    server_errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response | None:
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError as error:  # the process is down or was killed mid-request
            with self.lock:
                self.statuses[f"no answer ({type(error).__name__})"] += 1
            return None
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code >= 500 and response.status_code != 503:
                self.server_errors.append(f"{response.status_code} {method} {url}: {response.text[:200]}")
        return response

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


class Clients:
    """The email product drafting (a batch of emails at a time) and reviewers correcting each
    draft, every correction sent until it is answered, with the same Idempotency-Key."""

    def __init__(self, live: Live, keys, tally: Tally, reviewers: int = 3) -> None:
        self.live, self.keys, self.tally = live, keys, tally
        self.pending: queue.Queue[int] = queue.Queue()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._drafting, daemon=True)]
        self.threads += [threading.Thread(target=self._reviewing, daemon=True) for _ in range(reviewers)]

    def __enter__(self) -> "Clients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(120)

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.live.url, timeout=CLIENT_TIMEOUT_S)

    def _drafting(self) -> None:
        with self._client() as client:
            n = 0
            while not self.stopping.is_set():
                if self.pending.qsize() > 12:
                    time.sleep(0.2)
                    continue
                emails = [
                    {"sender": f"C{n + i} <c{n + i}@example.com>", "body": f"Where is order {n + i}?"} for i in range(4)
                ]
                n += 4
                body = {"emails": emails, "max_new_tokens": 4}
                response = self.tally.send(client, "POST", "/v1/drafts/batch", json=body, headers=self.keys.agent)
                if response is not None and response.status_code == 201:
                    for draft in response.json():
                        self.tally.drafts[draft["id"]] = draft
                        self.pending.put(draft["id"])
                else:
                    time.sleep(0.5)

    def _reviewing(self) -> None:
        with self._client() as client:
            while not self.stopping.is_set():
                try:
                    draft_id = self.pending.get(timeout=0.5)
                except queue.Empty:
                    continue
                self._correct(client, draft_id)

    def _correct(self, client: httpx.Client, draft_id: int) -> None:
        body = {"verdict": "edited", "final_text": f"Hi,\n\nOrder {draft_id} ships on Monday.\n\nRide safe,\nMarta"}
        headers = self.keys.reviewer | {"Idempotency-Key": f"correction-{draft_id}"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = self.tally.send(client, "POST", f"/v1/drafts/{draft_id}/correction", json=body, headers=headers)
            if response is not None and response.is_success:
                self.tally.corrections[draft_id] = response.json()
                return
            if response is not None and 400 <= response.status_code < 500 and response.status_code != 429:
                return  # a clear refusal: nothing was stored, nothing to retry
            retry_after = response.headers.get("Retry-After") if response is not None else None
            time.sleep(min(float(retry_after), 2.0) if retry_after else 0.3)


@dataclass
class Suite:
    """One database, its processes and the faults injected into them."""

    live: Live
    redis: RedisServer
    kind: str  # sqlite or postgres
    faults: Counter = field(default_factory=Counter)
    missed: Counter = field(default_factory=Counter)  # faults whose moment did not come (a run ended first)
    worker: object = None  # the training worker
    api: object = None

    def start(self) -> None:
        self.api = self.live.start_api()
        self.worker = self.live.start_worker(TRAINING_QUEUE)
        self.live.start_worker(SCHEDULING_QUEUE)
        self.live.start_beat()

    def stored_corrections(self) -> int:
        with Session(self.live.engine) as session:
            return len(session.scalars(select(Correction.id)).all())

    def active_run(self) -> TrainingRun | None:
        with Session(self.live.engine) as session:
            return session.scalar(select(TrainingRun).where(TrainingRun.status.in_(ACTIVE_RUN_STATUSES)))

    def trigger_run(self, tally: Tally, keys) -> None:
        with httpx.Client(base_url=self.live.url, timeout=CLIENT_TIMEOUT_S) as client:
            for _ in range(20):
                response = tally.send(client, "POST", "/v1/runs", json={"overrides": TRAINING}, headers=keys.admin)
                if response is not None and response.status_code in (202, 409):  # 409: one is active already
                    return
                time.sleep(0.5)

    def inject(self, fault: str, tally: Tally, keys) -> None:
        if fault == "worker_kill":
            self.trigger_run(tally, keys)
            try:
                wait_until(lambda: (run := self.active_run()) is not None and run.step >= 2, 90, "a run in training")
            except TimeoutError:
                self.missed[fault] += 1
                return
            kill9(self.worker)
            self.worker = self.live.start_worker(TRAINING_QUEUE)
        elif fault == "api_kill":
            time.sleep(1.0)  # requests are in flight at any moment: the clients never pause
            kill9(self.api)
            self.api = self.live.start_api()
        elif fault == "redis_restart":
            self.trigger_run(tally, keys)  # a run queued or running while the broker is gone
            self.redis.restart(down_s=1.0)
        elif fault == "db_drop":
            terminate_connections(self.live.database_url)
        self.faults[fault] += 1


def check(live: Live, tally: Tally) -> dict:
    """The invariants, read from the database."""
    with Session(live.engine) as session:
        corrections = {c.draft_id: c for c in session.scalars(select(Correction))}
        draft_ids = set(session.scalars(select(Draft.id)))
        lost_corrections = [
            draft_id
            for draft_id, answered in tally.corrections.items()
            if (stored := corrections.get(draft_id)) is None
            or (stored.id, stored.final_text) != (answered["id"], answered["final_text"])
        ]
        lost_drafts = [draft_id for draft_id in tally.drafts if draft_id not in draft_ids]
        adapters = list(session.scalars(select(Adapter)))
        champions = Counter(a.tenant_id for a in adapters if a.status == AdapterStatus.champion)
        promoted_ids = set(session.scalars(select(AdapterEvent.to_adapter_id).where(AdapterEvent.action == "promote")))
        without_report = []
        for adapter in adapters:
            if adapter.promoted_at is None and adapter.id not in promoted_ids:
                continue
            run = session.get(TrainingRun, adapter.training_run_id) if adapter.training_run_id else None
            if run is None or not (run.report or {}).get("decision", {}).get("promote") or not adapter.metrics:
                without_report.append(adapter.id)
        runs = list(session.scalars(select(TrainingRun)))
    return {
        "rows_checked": len(tally.corrections) + len(tally.drafts),
        "corrections_answered_2xx": len(tally.corrections),
        "drafts_answered_201": len(tally.drafts),
        "lost": len(lost_corrections) + len(lost_drafts),
        "lost_corrections": lost_corrections,
        "lost_drafts": lost_drafts,
        "tenants_with_more_than_one_champion": [t for t, n in champions.items() if n > 1],
        "promoted_without_report": without_report,
        "runs_by_status": dict(Counter(run.status for run in runs)),
        "runs_attempts": [run.attempts for run in runs],
        "runs_unrecovered": [run.id for run in runs if run.status in ACTIVE_RUN_STATUSES],
    }


def run(kind: str, cycles: int, folder: Path, base_model: Path, reviewers: int = 3, settle_s: float = 2.0) -> dict:
    """cycles faults on a fresh database of this kind; returns the figures and the invariants."""
    kinds = [k for k in KINDS if kind == "postgres" or k != "db_drop"]  # SQLite has no connections to drop
    folder.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(folder).start()
    url = fresh_database(kind, folder)
    started, tally = time.monotonic(), Tally()
    try:
        with Live(url, redis.url, folder / "var", base_model=str(base_model), settings=SETTINGS) as live:
            suite = Suite(live, redis, kind)
            suite.start()
            keys = live.tenant(instructions="Answer as Marta.")
            with Clients(live, keys, tally, reviewers):
                wait_until(lambda: suite.stored_corrections() >= 20, 180, "20 corrections to train on")
                for cycle in range(cycles):
                    suite.inject(kinds[cycle % len(kinds)], tally, keys)
                    time.sleep(settle_s)
            faulted_s = time.monotonic() - started
            try:  # every interrupted run is recovered: by now it has finished
                wait_until(lambda: suite.active_run() is None, 180, "the last run to finish")
            except TimeoutError:
                pass
            figures = check(live, tally)
            figures["logged_errors"] = live.logged_errors()
    finally:
        redis.kill()
        drop_database(url)
    status_counts = {str(code): n for code, n in sorted(tally.statuses.items(), key=lambda item: str(item[0]))}
    codes = [code for code in tally.statuses.elements() if isinstance(code, int)]
    return {
        "database": kind,
        "cycles": cycles,
        "seconds": round(time.monotonic() - started, 1),
        "seconds_under_faults": round(faulted_s, 1),
        "faults_injected": dict(suite.faults),
        "faults_missed": dict(suite.missed),
        "requests": tally.requests,
        "status_counts": status_counts,
        "2xx": sum(200 <= code < 300 for code in codes),
        "4xx": sum(400 <= code < 500 for code in codes),
        "503": codes.count(503),
        "500": len(tally.server_errors),
        "no_answer": tally.requests - len(codes),
        "server_errors": tally.server_errors[:20],
    } | figures


def violations(figures: dict) -> list[str]:
    """The invariants the figures break, in words (none: the suite passed)."""
    found = [
        f"{len(figures[name])} {name}, e.g. {figures[name][:3]}"
        for name in (
            "lost_corrections",
            "lost_drafts",
            "server_errors",
            "tenants_with_more_than_one_champion",
            "promoted_without_report",
            "runs_unrecovered",
        )
        if figures[name]
    ]
    return found + ([] if figures["corrections_answered_2xx"] else ["no correction was answered 2xx"])


def main() -> None:
    from bench.report import save
    from tests.live import tiny_base_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--databases", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    parser.add_argument("--reviewers", type=int, default=3)
    parser.add_argument("--name", default="faults", help="bench/results/<name>.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="draftloop-faults-"))
    base_model = tiny_base_model(folder / "tiny-base")
    results = {kind: run(kind, args.cycles, folder / kind, base_model, args.reviewers) for kind in args.databases}
    save(args.name, results)
    if problems := {kind: found for kind, figures in results.items() if (found := violations(figures))}:
        sys.exit(f"fault suite failed: {problems}; the processes' logs are in {folder}/*/var/logs")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
