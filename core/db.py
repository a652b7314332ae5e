"""The engine and session factory. Sessions commit in one place: the end of a request or task.

SQLite allows one writer at a time. A transaction that reads first and writes later cannot wait
for the lock (SQLite refuses to upgrade a read snapshot that another writer has overtaken, and no
busy timeout helps), so every SQLite transaction takes the write lock when it begins (BEGIN
IMMEDIATE) and waits up to the busy timeout for it; only read-only sessions (the pages and
routes that answer GET) begin plain, shared read transactions.

A transaction holds a pooled connection (and on SQLite perhaps the write lock), so no code keeps
one open while it waits for something else: a request's authentication commits before the route
runs, and drafting commits before the model works.
"""

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from core.errors import Conflict, DomainError, Invalid, Overloaded
from core.settings import get_settings


class Base(DeclarativeBase):
    pass


Sessions = Callable[..., AbstractContextManager[Session]]  # session_scope, or a test's: (read_only=False)


SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "draftloop_read_only"  # an execution option: this transaction only reads
# Connections per process: as many as the threads that run requests (AnyIO's 40) and a few more,
# so a thread never waits for a connection that another thread's request holds.
POOL = {"pool_size": 10, "max_overflow": 40, "pool_timeout": 10}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}, **POOL)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            # Let SQLAlchemy, not the sqlite3 module, begin transactions, so that SAVEPOINTs
            # (begin_nested) and rollbacks behave as on PostgreSQL.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:
            read_only = connection.get_execution_options().get(READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **POOL)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if not settings.database_url:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


def reading_engine(engine: Engine) -> Engine:
    """The engine for transactions that only read: on SQLite they take no write lock."""
    return engine.execution_options(**{READ_ONLY: True})


@lru_cache
def get_reading_engine() -> Engine:
    return reading_engine(get_engine())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def committing(session: Session) -> Iterator[Session]:
    """Commit when the block ends without error, roll back otherwise."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


@contextmanager
def session_scope(*, read_only: bool = False) -> Iterator[Session]:
    """A new session for one unit of work (a request, a task, a CLI command); with read_only, its
    transactions take no write lock on SQLite."""
    bind = get_reading_engine() if read_only else get_engine()
    with get_sessionmaker()(bind=bind) as session, committing(session):
        yield session


RETRY_AFTER_S = 2


def as_domain_error(error: SQLAlchemyError) -> DomainError | None:
    """What a failed statement means to the caller, or None for a bug (a 500).

    A write lock not granted within the busy timeout (SQLite), a serialization failure or
    deadlock (PostgreSQL), a lost connection and no free connection in the pool are temporary:
    503, retry. A unique constraint that a concurrent request won is a conflict; a value the
    database cannot store is invalid input. Any other failure (a missing table, a NOT NULL or
    foreign key the code broke) is a bug, not the caller's to retry or fix."""
    if isinstance(error, PoolTimeout):
        return Overloaded("every database connection of this process is busy; retry", RETRY_AFTER_S)
    if not isinstance(error, DBAPIError):
        return None
    if isinstance(error, IntegrityError) and _unique_violation(error):
        return Conflict(f"the request conflicts with what is stored ({_first_line(error)})")
    if isinstance(error, DataError):
        return Invalid(f"a value cannot be stored: {_first_line(error)}")
    if error.connection_invalidated or (isinstance(error, OperationalError) and _temporary(error)):
        return Overloaded(f"the database is busy or unreachable ({_first_line(error)}); retry", RETRY_AFTER_S)
    return None


# PostgreSQL's SQLSTATE classes of a failure worth retrying: a connection exception, a
# transaction rolled back (serialization failure, deadlock), insufficient resources, an operator
# intervention (the server shutting down).
_TEMPORARY_CLASSES = ("08", "40", "53", "57")


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None)


def _unique_violation(error: IntegrityError) -> bool:
    return _sqlstate(error) == "23505" or str(error.orig).startswith("UNIQUE constraint failed")


def _temporary(error: OperationalError) -> bool:
    """SQLite: a lock or a busy database (not, say, a missing table). PostgreSQL: a temporary
    SQLSTATE class, or none at all (the driver lost the server before it answered)."""
    if isinstance(error.orig, sqlite3.Error):
        message = str(error.orig)
        return "locked" in message or "busy" in message
    state = _sqlstate(error)
    return state is None or state[:2] in _TEMPORARY_CLASSES


def _first_line(error: DBAPIError) -> str:  # the driver's message, without the statement
    return str(error.orig).strip().splitlines()[0] if error.orig is not None else type(error).__name__
