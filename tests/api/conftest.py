from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from feedback.models import Role
from tests.api.apps import app_client
from tests.factories import make_key, make_tenant


@pytest.fixture
def client(session, tiny_drafter) -> Iterator[TestClient]:
    """The real app on the test database (PostgreSQL, then SQLite) with the tiny model."""
    with app_client(session, tiny_drafter) as test_client:
        yield test_client


@pytest.fixture
def new_client(session, tiny_drafter):
    """Makes clients of new apps, built with the settings of that moment (after a test changed them)."""
    return lambda: app_client(session, tiny_drafter)


class Keys:
    """Raw API keys of every role for one tenant, as request headers."""

    def __init__(self, session) -> None:
        self.tenant = make_tenant(session)
        self.agent, self.reviewer, self.admin = (
            {"X-API-Key": make_key(session, self.tenant, role)[1]} for role in (Role.agent, Role.reviewer, Role.admin)
        )
        session.commit()  # only a savepoint: the test's outer transaction still rolls back


@pytest.fixture
def keys(session) -> Keys:
    return Keys(session)


@pytest.fixture
def other_keys(session) -> Keys:
    return Keys(session)
