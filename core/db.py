"""The engine and session factory. Sessions commit in one place: the end of a request or task.

SQLite allows one writer at a time. A transaction that reads first and writes later cannot wait
for the lock (SQLite refuses to upgrade a read snapshot that another writer has overtaken, and no
busy timeout helps), so every SQLite transaction takes the write lock when it begins (BEGIN
IMMEDIATE) and waits up to the busy timeout for it; only sessions marked read-only
(`read_only`, the pages and routes that answer GET) begin a plain, shared read transaction.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from core.errors import Conflict, DomainError, Invalid, Overloaded
from core.settings import get_settings


class Base(DeclarativeBase):
    pass


Sessions = Callable[[], AbstractContextManager[Session]]  # units of work: session_scope, or a test's


SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "draftloop_read_only"  # an execution option: this transaction only reads


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})

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
    return create_engine(url, pool_pre_ping=True)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if not settings.database_url:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


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
def session_scope() -> Iterator[Session]:
    """A new session for one unit of work (a request, a task, a CLI command)."""
    with get_sessionmaker()() as session, committing(session):
        yield session


def read_only(session: Session) -> None:
    """Mark the session's next transaction as read-only: on SQLite it then takes no write lock.
    A no-op once a transaction has begun (it keeps the kind it began with)."""
    if not session.in_transaction():
        session.connection(execution_options={READ_ONLY: True})


RETRY_AFTER_S = 2


def as_domain_error(error: DBAPIError) -> DomainError | None:
    """What a failed statement means to the caller, or None for a bug (a 500).

    A write lock not granted within the busy timeout (SQLite), a serialization failure or
    deadlock (PostgreSQL) and a lost connection are temporary: 503, retry. A constraint that a
    concurrent request won is a conflict; a value the database cannot store is invalid input."""
    if isinstance(error, IntegrityError):
        return Conflict(f"the request conflicts with what is stored ({_first_line(error)})")
    if isinstance(error, DataError):
        return Invalid(f"a value cannot be stored: {_first_line(error)}")
    if isinstance(error, OperationalError) or error.connection_invalidated:
        return Overloaded(f"the database is busy or unreachable ({_first_line(error)}); retry", RETRY_AFTER_S)
    return None


def _first_line(error: DBAPIError) -> str:
    return str(error.orig).strip().splitlines()[0] if error.orig is not None else type(error).__name__
