"""The PostgreSQL server the tests use (tests/conftest.py's databases and tests/live.py's), and
sessions that commit, as the worker's do."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.db import Sessions, committing

POSTGRES_SERVER = os.environ.get("DRAFTLOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")


def committing_sessions(engine: Engine) -> Sessions:
    """A unit-of-work factory on a real database, as the worker uses: each block commits."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)

    @contextmanager
    def scope() -> Iterator[Session]:
        with factory() as session, committing(session):
            yield session

    return scope
