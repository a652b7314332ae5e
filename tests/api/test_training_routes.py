import os

import redis

EMAILS = [
    {"sender": f"C{n} <c{n}@example.com>", "subject": f"Order {n}", "body": f"Where is order {n}?"} for n in range(3)
]


def test_batch_drafting_stores_every_draft(client, keys):
    response = client.post("/v1/drafts/batch", json={"emails": EMAILS, "max_new_tokens": 4}, headers=keys.agent)
    assert response.status_code == 201, response.text
    drafts = response.json()
    assert [d["subject"] for d in drafts] == ["Order 0", "Order 1", "Order 2"]
    assert client.get("/v1/review-queue", headers=keys.reviewer).json()["pending"] == 3


def test_batch_drafting_refuses_bad_batches(client, keys):
    too_many = client.post("/v1/drafts/batch", json={"emails": EMAILS * 11}, headers=keys.agent)
    assert too_many.status_code == 422 and "32" in too_many.text
    huge = [EMAILS[0], EMAILS[1] | {"body": "x" * 20_001}]
    assert client.post("/v1/drafts/batch", json={"emails": huge}, headers=keys.agent).status_code == 413
    assert client.post("/v1/drafts/batch", json={"emails": []}, headers=keys.agent).status_code == 422
    assert client.get("/v1/review-queue", headers=keys.reviewer).json()["pending"] == 0


def test_runs_are_triggered_by_admins_one_at_a_time(client, keys, other_keys):
    redis.Redis.from_url(os.environ["DRAFTLOOP_REDIS_URL"]).flushdb()
    assert client.post("/v1/runs", json={}, headers=keys.reviewer).status_code == 403
    bad = client.post("/v1/runs", json={"overrides": {"epochz": 2}}, headers=keys.admin)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "overrides", "epochz"]
    run = client.post("/v1/runs", json={"overrides": {"epochs": 2}}, headers=keys.admin)
    assert run.status_code == 202 and run.json()["status"] == "queued" and run.json()["config"]["epochs"] == 2
    again = client.post("/v1/runs", json={}, headers=keys.admin)
    assert again.status_code == 409 and "already queued" in again.json()["detail"]
    assert client.get(f"/v1/runs/{run.json()['id']}", headers=keys.agent).json()["step"] == 0
    assert client.get(f"/v1/runs/{run.json()['id']}", headers=other_keys.admin).status_code == 404
    assert [r["id"] for r in client.get("/v1/runs", headers=keys.reviewer).json()] == [run.json()["id"]]
    redis.Redis.from_url(os.environ["DRAFTLOOP_REDIS_URL"]).flushdb()


def test_adapter_routes_explain_what_cannot_be_done(client, keys):
    assert client.get("/v1/adapters", headers=keys.agent).json() == []
    missing = client.post("/v1/adapters/3/promote", json={"reason": "try"}, headers=keys.admin)
    assert missing.status_code == 404 and "version 3" in missing.json()["detail"]
    no_champion = client.post("/v1/adapters/rollback", json={"reason": "bad drafts"}, headers=keys.admin)
    assert no_champion.status_code == 409 and "no champion" in no_champion.json()["detail"]
    assert client.post("/v1/adapters/rollback", json={"reason": ""}, headers=keys.admin).status_code == 422
    assert client.post("/v1/adapters/rollback", json={"reason": "x"}, headers=keys.reviewer).status_code == 403
