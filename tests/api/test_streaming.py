"""Streaming drafts (server-sent events) and shedding load when the drafting queue is full."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from sqlalchemy import delete
from sqlalchemy.orm import sessionmaker

from agent.drafting import Drafter
from agent.prompt import IncomingEmail
from api.app import create_app
from api.deps import drafter, get_sessions
from core.db import committing, reading_engine
from core.settings import get_settings
from feedback.models import Draft, Role, Tenant
from tests.factories import make_key, make_tenant

EMAIL = {"sender": "Dana <dana@example.com>", "subject": "Brakes", "body": "My brake squeals. Can I bring it back?"}


def events(lines) -> list[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream."""
    parsed, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            parsed.append((name, json.loads(line.removeprefix("data: "))))
    return parsed


def test_a_streamed_draft_arrives_in_pieces_and_is_stored(client, keys):
    with client.stream("POST", "/v1/drafts/stream", json=EMAIL | {"max_new_tokens": 24}, headers=keys.agent) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        received = events(r.iter_lines())
    tokens = [data["text"] for name, data in received if name == "token"]
    (draft,) = [data for name, data in received if name == "draft"]
    assert len(tokens) > 5 and received[-1][0] == "draft"
    assert "".join(tokens).strip() == draft["draft_text"] and draft["tokens_generated"] == 24

    stored = client.get(f"/v1/drafts/{draft['id']}", headers=keys.agent).json()
    assert stored["draft_text"] == draft["draft_text"]
    plain = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 24}, headers=keys.agent).json()
    assert plain["draft_text"] == draft["draft_text"]  # streaming changes nothing in the draft


def test_streaming_checks_the_request_first(client, keys):
    response = client.post("/v1/drafts/stream", json=EMAIL | {"max_new_tokens": 10**6}, headers=keys.agent)
    assert response.status_code == 422 and "limit" in response.json()["detail"]
    assert client.post("/v1/drafts/stream", json=EMAIL, headers=keys.reviewer).status_code == 403


@pytest.fixture
def live(engine, tiny_drafter):
    """The app served by uvicorn on a free port (a real client can leave mid-stream; requests
    really run concurrently), on committed data in PostgreSQL, then SQLite; yields (base URL,
    agent key headers, sessionmaker, tenant id) and deletes the tenant."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)

    @contextmanager
    def sessions(read_only: bool = False):
        bind = reading_engine(engine) if read_only else engine
        with factory(bind=bind) as session, committing(session):
            yield session

    with sessions() as session:
        tenant = make_tenant(session)
        _, raw = make_key(session, tenant, Role.agent)
    app = create_app()
    app.dependency_overrides[get_sessions] = lambda: sessions
    app.dependency_overrides[drafter] = lambda: tiny_drafter
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", {"X-API-Key": raw}, factory, tenant.id
    server.should_exit = True
    thread.join(10)
    with sessions() as session:
        session.execute(delete(Tenant).where(Tenant.id == tenant.id))


def test_the_whole_draft_is_stored_when_the_client_leaves_early(live):
    url, headers, factory, tenant_id = live
    with httpx.stream(
        "POST", f"{url}/v1/drafts/stream", json=EMAIL | {"max_new_tokens": 400}, headers=headers, timeout=30
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: "))["text"]  # one piece read, then the client hung up

    deadline = time.monotonic() + 60
    while (draft := _draft_of(factory, tenant_id)) is None:
        assert time.monotonic() < deadline, "the draft was not stored after the client left"
        time.sleep(0.1)
    assert draft.tokens_generated == 400 and draft.finish_reason == "length"  # decoded to the end
    assert draft.draft_text.startswith(json.loads(first.removeprefix("data: "))["text"].strip())


def test_concurrent_drafts_are_all_stored(live):
    """Drafts decode together while their requests wait; none may hold the database meanwhile."""
    url, headers, factory, tenant_id = live
    emails = [EMAIL | {"body": f"When does order {1000 + i} ship?", "max_new_tokens": 40} for i in range(8)]

    def post(email: dict) -> httpx.Response:
        return httpx.post(f"{url}/v1/drafts", json=email, headers=headers, timeout=60)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(post, emails))
    assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses if r.status_code != 201]
    with factory() as session:
        assert session.query(Draft).filter_by(tenant_id=tenant_id).count() == 8


def _draft_of(factory, tenant_id: int) -> Draft | None:
    with factory() as session:
        return session.query(Draft).filter_by(tenant_id=tenant_id).one_or_none()


def test_a_full_queue_answers_503_with_retry_after(client, keys, tiny_model, model_settings):
    busy = Drafter.local(tiny_model, model_settings.model_copy(update={"max_batch": 1, "max_queue": 1}))
    client.app.dependency_overrides[drafter] = lambda: busy
    prompt = busy.prompt("", IncomingEmail(**EMAIL))
    running = busy.submit(prompt, max_new_tokens=1000)
    while running.first_token_at is None:
        time.sleep(0.001)
    queued = busy.submit(prompt, max_new_tokens=1000)  # the queue's one place is taken

    response = client.post("/v1/drafts", json=EMAIL, headers=keys.agent)
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1 and "queue is full" in response.json()["detail"]
    for stream in (running, queued):
        stream.cancel()
        stream.result(timeout=30)
    assert client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 4}, headers=keys.agent).status_code == 201


BACKEND_KEY = "a-backend-key"
# Each non-streaming drafting route, with drafts far longer than the client waits for.
LEAVING = {
    "/v1/drafts": EMAIL | {"max_new_tokens": 1000},
    "/v1/drafts/batch": {"emails": [EMAIL] * 16, "max_new_tokens": 1000},
    "/v1/chat/completions": {
        "model": "base",
        "messages": [{"role": "user", "content": EMAIL["body"]}],
        "max_tokens": 1000,
    },
    "/v1/completions": {"model": "base", "max_tokens": 1000},  # the prompt ids are added by the test
}


@pytest.mark.parametrize("path", LEAVING)
def test_a_client_that_leaves_cancels_its_drafts(live, tiny_drafter, monkeypatch, path):
    """A non-streaming request whose client gives up: its drafts stop decoding, cancelled long
    before their 1,000 tokens, the tenant's share of the queue is free again, and nothing is stored."""
    url, headers, factory, tenant_id = live
    body = LEAVING[path]
    if path == "/v1/completions":  # the drafting server's route, for servers holding the backend key
        monkeypatch.setattr(get_settings(), "backend_api_key", BACKEND_KEY)
        headers = {"Authorization": f"Bearer {BACKEND_KEY}"}
        body = body | {"prompt": tiny_drafter.prompt("", IncomingEmail(**EMAIL))}
    streams, submit = [], tiny_drafter.backend.submit

    def recorded(*args):  # the engine's own submit, keeping the streams it started
        streams.append(submit(*args))
        return streams[-1]

    monkeypatch.setattr(tiny_drafter.backend, "submit", recorded)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}{path}", json=body, headers=headers, timeout=0.5)
    left = time.monotonic()
    while not streams or not all(stream.finish_reason for stream in streams):
        assert time.monotonic() - left < 3, "the drafts went on decoding after the client left"
        time.sleep(0.05)
    assert {stream.finish_reason for stream in streams} == {"cancelled"}
    assert len(streams) == (16 if path == "/v1/drafts/batch" else 1) and all(len(s.tokens) < 1000 for s in streams)
    assert tiny_drafter.in_flight(tenant_id) == 0 and _draft_of(factory, tenant_id) is None
