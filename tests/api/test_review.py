import json

import redis

from core.settings import get_settings
from feedback.models import Correction

EMAIL = {
    "sender": "Sam <sam@example.com>",
    "subject": "[NW-10002] Order",
    "body": "Where is my order?",
    "max_new_tokens": 4,
}


def new_draft(client, keys) -> dict:
    response = client.post("/v1/drafts", json=EMAIL, headers=keys.agent)
    assert response.status_code == 201, response.text
    return response.json()


def correct(client, keys, draft_id, body, idempotency_key=None):
    headers = keys.reviewer | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
    return client.post(f"/v1/drafts/{draft_id}/correction", json=body, headers=headers)


def test_review_queue_then_correction(client, keys, session):
    first, second = new_draft(client, keys), new_draft(client, keys)
    queue = client.get("/v1/review-queue", headers=keys.reviewer).json()
    assert queue["pending"] == 2 and [d["id"] for d in queue["items"]] == [first["id"], second["id"]]

    response = correct(client, keys, first["id"], {"verdict": "edited", "final_text": "Hi Sam,\n\nIt ships today."})
    assert response.status_code == 201, response.text
    stored = session.get(Correction, response.json()["id"])
    assert (stored.verdict, stored.final_text, stored.split) == (
        "edited",
        "Hi Sam,\n\nIt ships today.",
        response.json()["split"],
    )
    assert client.get(f"/v1/drafts/{first['id']}", headers=keys.agent).json()["correction"]["verdict"] == "edited"

    queue = client.get("/v1/review-queue", headers=keys.reviewer).json()
    assert queue["pending"] == 1 and [d["id"] for d in queue["items"]] == [second["id"]]


def test_correction_is_idempotent_and_conflicts_are_409(client, keys, session):
    draft = new_draft(client, keys)
    body = {"verdict": "edited", "final_text": "Hi Sam, it ships today."}
    created = correct(client, keys, draft["id"], body, idempotency_key="k-1")
    assert created.status_code == 201
    assert correct(client, keys, draft["id"], body, idempotency_key="k-1").json() == created.json()
    again = correct(client, keys, draft["id"], body)
    assert again.status_code == 200 and again.json()["id"] == created.json()["id"]

    conflict = correct(client, keys, draft["id"], {"verdict": "rejected"})
    assert conflict.status_code == 409 and "different correction" in conflict.json()["detail"]
    assert conflict.json()["stored"] == created.json()  # what is kept, to show the reviewer
    reused = correct(client, keys, new_draft(client, keys)["id"], {"verdict": "accepted"}, idempotency_key="k-1")
    assert reused.status_code == 409 and reused.json()["stored"] == created.json()
    assert session.get(Correction, created.json()["id"]).final_text == "Hi Sam, it ships today."


def test_bad_corrections_are_refused(client, keys, session):
    draft = new_draft(client, keys)
    no_text = correct(client, keys, draft["id"], {"verdict": "edited"})
    assert no_text.status_code == 422 and "final_text" in no_text.json()["detail"]
    bad_verdict = correct(client, keys, draft["id"], {"verdict": "maybe"})
    assert bad_verdict.status_code == 422 and "accepted" in bad_verdict.text
    assert correct(client, keys, 999999, {"verdict": "accepted"}).status_code == 404
    assert client.get(f"/v1/drafts/{draft['id']}", headers=keys.reviewer).json()["correction"] is None
    accepted = correct(client, keys, draft["id"], {"verdict": "accepted"})
    assert accepted.status_code == 201 and accepted.json()["final_text"] == draft["draft_text"]


def test_a_chunked_body_over_the_limit_is_refused_as_it_streams_in(client, keys, session):
    """Without a Content-Length the body is counted as it arrives: 3 MB of padding is a 413
    and nothing is stored, with or without a valid key (the limit comes before authentication)."""
    draft = new_draft(client, keys)
    padded = json.dumps({"verdict": "accepted", "padding": "x" * 3_000_000}).encode()

    def chunked():  # a generator: httpx sends it chunked, with no Content-Length
        for start in range(0, len(padded), 64 * 1024):
            yield padded[start : start + 64 * 1024]

    path = f"/v1/drafts/{draft['id']}/correction"
    headers = {"Content-Type": "application/json"}
    for key in (keys.reviewer, {}):
        response = client.post(path, content=chunked(), headers=headers | key)
        assert response.status_code == 413 and "limit of 1000000 bytes" in response.json()["detail"]
    assert session.query(Correction).filter_by(draft_id=draft["id"]).count() == 0


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(keys, new_client, monkeypatch):
    """Counted in Redis per key: the fourth request of a key within the minute is refused, with
    the seconds to wait; another key of the same tenant is still served."""
    monkeypatch.setenv("DRAFTLOOP_RATE_LIMIT_PER_KEY", "3/minute")
    get_settings.cache_clear()
    redis.Redis.from_url(get_settings().redis_url).flushdb()  # counts of the other database's key ids
    try:
        with new_client() as client:
            statuses = [client.get("/v1/review-queue", headers=keys.reviewer).status_code for _ in range(4)]
            refused = client.get("/v1/review-queue", headers=keys.reviewer)
            assert statuses == [200, 200, 200, 429] and refused.status_code == 429
            assert 1 <= int(refused.headers["Retry-After"]) <= 60 and "rate limit of 3 per 1 minute" in refused.text
            assert client.get("/v1/review-queue", headers=keys.admin).status_code == 200
    finally:
        get_settings.cache_clear()
