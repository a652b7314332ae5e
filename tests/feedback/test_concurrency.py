"""Concurrent writers on the real databases: what one request read must not stop its write, two
requests racing for one unique value end as one stored row and one clear answer, and a lock that
times out (SQLite), a serialization failure or a deadlock (PostgreSQL) is a 503 to retry."""

import queue
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.deps import SessionDep
from core import db
from core.db import RETRY_AFTER_S, as_domain_error, committing, make_engine, reading_engine
from core.errors import Conflict, Overloaded
from feedback import service
from feedback.models import ApiKey, Correction, Role, Tenant, Verdict
from migrations import upgrade
from tests.factories import make_draft, make_key, make_tenant


@pytest.fixture
def sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'draftloop.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield sessionmaker(bind=engine, expire_on_commit=False)
    engine.dispose()


def _submit(session, draft_id, tenant_id, key_id, text, idempotency_key=None):
    draft = service.get_draft(session, tenant_id, draft_id)
    return service.submit_correction(
        session,
        draft=draft,
        correction=service.CorrectionInput(Verdict.edited, text),
        reviewer_key=session.get(ApiKey, key_id),
        idempotency_key=idempotency_key,
        heldout_fraction=0.2,
    )


def _setup(factory, drafts=2):
    with factory() as session, committing(session):
        tenant = make_tenant(session)
        key, _ = make_key(session, tenant, Role.reviewer)
        ids = [make_draft(session, tenant).id for _ in range(drafts)]
        return tenant.id, key.id, ids


def test_a_write_after_a_read_waits_for_the_lock_on_sqlite(sqlite_file):
    """Request A reads, request B writes and commits, then A writes: with plain BEGIN, A's read
    snapshot could not be upgraded ("database is locked" at once, whatever the busy timeout)."""
    tenant_id, key_id, (first, second) = _setup(sqlite_file)
    stored = []

    def other_request():
        with sqlite_file() as session, committing(session):
            stored.append(_submit(session, second, tenant_id, key_id, "Other text.")[1])

    with sqlite_file() as session, committing(session):
        service.get_draft(session, tenant_id, first)  # the auth read and the draft lookup
        writer = threading.Thread(target=other_request)
        writer.start()
        time.sleep(0.3)
        stored.append(_submit(session, first, tenant_id, key_id, "My text.")[1])
    writer.join(10)
    assert stored == [True, True]
    with sqlite_file() as session:
        assert session.query(Correction).filter_by(tenant_id=tenant_id).count() == 2


def test_reads_take_no_write_lock_on_sqlite(sqlite_file):
    tenant_id, key_id, (first, _) = _setup(sqlite_file)
    with sqlite_file() as writer, committing(writer):
        _submit(writer, first, tenant_id, key_id, "Held.")  # holds the write lock
        with sqlite_file(bind=reading_engine(sqlite_file.kw["bind"])) as reader:
            assert service.get_draft(reader, tenant_id, first).id == first  # not blocked


def test_a_lock_that_times_out_is_a_503(sqlite_file, monkeypatch):
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    impatient = make_engine(str(sqlite_file.kw["bind"].url))
    with sqlite_file() as holder, committing(holder):
        make_tenant(holder)  # holds the write lock
        with pytest.raises(Exception) as raised, Session(impatient) as session, committing(session):
            make_tenant(session)
    error = as_domain_error(raised.value)
    assert isinstance(error, Overloaded) and "database is locked" in error.message and error.retry_after_s > 0
    impatient.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_unique_race_is_a_conflict_and_a_broken_statement_a_bug(database, sqlite_file, postgres_engine):
    """Only what a concurrent request can cause is the caller's to retry or resolve: a unique
    violation is a 409; a missing table or a NOT NULL the code broke stays a 500."""
    factory = sqlite_file if database == "sqlite" else sessionmaker(bind=postgres_engine)

    def failure(statement: str, **values):
        with pytest.raises(DBAPIError) as raised, factory() as session, committing(session):
            session.execute(text(statement), values)
        return as_domain_error(raised.value)

    with factory() as session, committing(session):
        tenant_id = make_tenant(session).id
    assert isinstance(failure("INSERT INTO tenants SELECT * FROM tenants WHERE id = :id", id=tenant_id), Conflict)
    assert failure("UPDATE tenants SET name = NULL WHERE id = :id", id=tenant_id) is None
    assert failure("SELECT * FROM no_such_table") is None


def test_a_serialization_failure_on_postgres_is_a_503(postgres_engine):
    """A REPEATABLE READ transaction updates a row that another changed after its snapshot:
    PostgreSQL refuses the update, and the caller is told to retry."""
    factory = sessionmaker(bind=postgres_engine.execution_options(isolation_level="REPEATABLE READ"))
    with factory() as session, committing(session):
        tenant_id = make_tenant(session).id
    rename = update(Tenant).where(Tenant.id == tenant_id)
    with pytest.raises(OperationalError) as raised, factory() as late, committing(late):
        late.get(Tenant, tenant_id)  # its snapshot is taken
        with factory() as early, committing(early):
            early.execute(rename.values(name="Early"))
        late.execute(rename.values(name="Late"))
    error = as_domain_error(raised.value)
    assert isinstance(error, Overloaded) and "could not serialize access" in error.message
    assert error.retry_after_s == RETRY_AFTER_S


def test_a_deadlock_in_a_request_is_a_503_with_retry_after(postgres_engine):
    """A request's transaction and another lock two rows in opposite orders. The request waited
    first, so its deadlock check runs first and PostgreSQL fails its transaction: the answer is
    a 503 with Retry-After, and the other transaction goes on."""
    factory = sessionmaker(bind=postgres_engine)
    with factory() as session, committing(session):
        first, second = make_tenant(session).id, make_tenant(session).id
    holding_second = threading.Event()
    request_pid: queue.Queue[int] = queue.Queue()
    other_done = []

    def lock(session, tenant_id: int) -> None:
        session.execute(select(Tenant).where(Tenant.id == tenant_id).with_for_update())

    def other_transaction() -> None:
        with factory() as session, committing(session):
            lock(session, second)
            holding_second.set()
            pid = request_pid.get(timeout=10)
            waiting = text("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = :pid AND NOT granted)")
            while not session.scalar(waiting, {"pid": pid}):  # the request waits for the second row
                time.sleep(0.01)
            lock(session, first)  # granted once the request's transaction is rolled back
        other_done.append(True)

    app = create_app()

    @app.post("/lock-both")
    def lock_both(session: SessionDep) -> None:  # the app's own request session, on PostgreSQL
        lock(session, first)
        request_pid.put(session.scalar(text("SELECT pg_backend_pid()")))
        lock(session, second)

    other = threading.Thread(target=other_transaction)
    other.start()
    assert holding_second.wait(10)
    response = TestClient(app).post("/lock-both")
    other.join(10)
    assert response.status_code == 503 and response.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert "deadlock detected" in response.json()["detail"] and other_done == [True]


def test_the_same_idempotency_key_racing_on_two_drafts_is_a_conflict(postgres_engine):
    """The second insert waits on the unique index until the first commits, then violates it:
    the answer is a 409 that names the key, never an error about a missing row."""
    factory = sessionmaker(bind=postgres_engine, expire_on_commit=False)
    tenant_id, key_id, (first, second) = _setup(factory)
    outcome = {}

    def racing_request():
        try:
            with factory() as session, committing(session):
                _submit(session, second, tenant_id, key_id, "Same key.", idempotency_key="k-1")
            outcome["second"] = "stored"
        except Conflict as conflict:
            outcome["second"] = conflict.message

    with factory() as session, committing(session):
        _submit(session, first, tenant_id, key_id, "Same key.", idempotency_key="k-1")
        racer = threading.Thread(target=racing_request)
        racer.start()
        time.sleep(0.5)
    racer.join(10)
    assert "Idempotency-Key was already used" in outcome["second"]
