"""Shared fixtures: real PostgreSQL and SQLite databases with the migrations applied, one
transaction per test rolled back at the end."""

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

POSTGRES_SERVER = os.environ.get("DRAFTLOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
POSTGRES_URL = f"{POSTGRES_SERVER}/draftloop_test"
# The app under test (readiness, get_engine) talks to the same test database.
os.environ["DRAFTLOOP_DATABASE_URL"] = POSTGRES_URL

from core.db import make_engine  # noqa: E402  (after the environment is set)
from migrations import upgrade  # noqa: E402


def _fresh_postgres() -> str:
    admin = create_engine(f"{POSTGRES_SERVER}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text("DROP DATABASE IF EXISTS draftloop_test WITH (FORCE)"))
        connection.execute(text("CREATE DATABASE draftloop_test"))
    admin.dispose()
    return POSTGRES_URL


@pytest.fixture(scope="session")
def postgres_engine() -> Iterator[Engine]:
    upgrade(_fresh_postgres())
    engine = make_engine(POSTGRES_URL)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_engine(tmp_path_factory) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'draftloop.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request) -> Engine:
    return request.getfixturevalue(f"{request.param}_engine")


def _rolled_back_session(engine: Engine) -> Iterator[Session]:
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()


@pytest.fixture
def session(engine) -> Iterator[Session]:
    """A session on each database in turn; whatever a test writes is rolled back."""
    yield from _rolled_back_session(engine)


@pytest.fixture
def pg_session(postgres_engine) -> Iterator[Session]:
    yield from _rolled_back_session(postgres_engine)

