"""The real app wired to a test: its requests use the test's session (rolled back at the end)
and the test's drafter."""

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from agent.drafting import Drafter
from api.app import create_app
from api.deps import drafter, get_sessions
from core.db import committing


def wire(app: FastAPI, session: Session, drafter_: Drafter) -> None:
    """The app's requests use the test's session (rolled back at the end) and this drafter."""

    @contextmanager
    def test_sessions(read_only: bool = False):
        with committing(session):
            yield session

    app.dependency_overrides[get_sessions] = lambda: test_sessions
    app.dependency_overrides[drafter] = lambda: drafter_


@contextmanager
def app_client(session, tiny_drafter) -> Iterator[TestClient]:
    app = create_app()
    wire(app, session, tiny_drafter)
    with TestClient(app) as test_client:
        yield test_client
