"""A property-based fuzzer over the OpenAPI spec: schemathesis generates requests for every
operation, valid and invalid, and sends them with a real admin key of a real tenant to the app on
each database, drafting with the tiny model. No request may get a 5xx."""

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from agent.drafting import Drafter
from api.app import create_app
from core.settings import get_settings
from tests.api.apps import wire
from tests.factories import make_draft

MAX_EXAMPLES = 10  # per operation and phase: about 20 s a database on 2 cores
app = create_app()
# Loaded when the tests are collected; schemathesis' lazy loader (from_fixture) fails on pytest 9.
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="session")
def fuzz_drafter(tiny_model, model_settings) -> Drafter:
    """The tiny model drafting at most 4 tokens: the fuzzer exercises the routes, not long decodes."""
    return Drafter.local(tiny_model, model_settings.model_copy(update={"max_new_tokens": 2, "max_new_tokens_limit": 4}))


@pytest.fixture
def admin(session, keys, fuzz_drafter) -> Iterator[dict]:
    """The app on the test database, whose tenant has drafts to find; its admin key's header."""
    for n in range(3):
        make_draft(session, keys.tenant, subject=f"Order {n}")
    session.commit()

    wire(app, session, fuzz_drafter)
    app.dependency_overrides[get_settings] = lambda: fuzz_drafter.settings  # the routes' limits are the drafter's
    yield keys.admin
    app.dependency_overrides.clear()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, admin):
    case.call_and_validate(headers=admin, checks=[not_a_server_error])
