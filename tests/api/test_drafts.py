from sqlalchemy import func, select

from agent.prompt import IncomingEmail
from feedback.models import Draft
from tests.factories import EMAIL


def count_drafts(session) -> int:
    return session.scalar(select(func.count()).select_from(Draft))


def test_agent_drafts_and_the_draft_is_stored(client, keys, session):
    response = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 8}, headers=keys.agent)
    assert response.status_code == 201, response.text
    draft = response.json()
    assert draft["draft_text"] and draft["tokens_generated"] <= 8 and draft["adapter_id"] is None
    assert draft["generation"]["max_new_tokens"] == 8 and draft["correction"] is None
    assert draft["generation"]["adapter_scale"] is None  # the base model: no adapter to scale
    stored = session.get(Draft, draft["id"])
    assert stored.draft_text == draft["draft_text"] and stored.tenant_id == keys.tenant.id

    fetched = client.get(f"/v1/drafts/{draft['id']}", headers=keys.reviewer)
    assert fetched.status_code == 200 and fetched.json()["draft_text"] == draft["draft_text"]


def test_list_drafts_pages_newest_first(client, keys):
    ids = [
        client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=keys.agent).json()["id"] for _ in range(3)
    ]
    first = client.get("/v1/drafts?limit=2", headers=keys.agent).json()
    assert [d["id"] for d in first["items"]] == ids[::-1][:2]
    rest = client.get(f"/v1/drafts?limit=2&before_id={first['next_before_id']}", headers=keys.agent).json()
    assert [d["id"] for d in rest["items"]] == [ids[0]] and rest["next_before_id"] is None


def test_missing_bad_and_revoked_keys_are_401(client, keys):
    assert client.get("/v1/drafts").status_code == 401
    assert "X-API-Key" in client.get("/v1/drafts").json()["detail"]
    assert client.get("/v1/drafts", headers={"X-API-Key": "dl_nope"}).status_code == 401
    created = client.post("/v1/keys", json={"name": "temp", "role": "agent"}, headers=keys.admin)
    assert created.status_code == 201, created.text
    created = created.json()
    assert client.get("/v1/drafts", headers={"Authorization": f"Bearer {created['key']}"}).status_code == 200
    assert client.delete(f"/v1/keys/{created['id']}", headers=keys.admin).status_code == 200
    assert client.get("/v1/drafts", headers={"X-API-Key": created["key"]}).status_code == 401


def test_roles_gate_routes(client, keys, session):
    before = count_drafts(session)
    response = client.post("/v1/drafts", json=EMAIL, headers=keys.reviewer)
    assert response.status_code == 403 and "agent" in response.json()["detail"]
    assert client.get("/v1/review-queue", headers=keys.agent).status_code == 403
    assert client.post("/v1/keys", json={"name": "x", "role": "admin"}, headers=keys.reviewer).status_code == 403
    assert client.patch("/v1/tenant", json={"instructions": "x"}, headers=keys.agent).status_code == 403
    assert client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=keys.admin).status_code == 201
    assert count_drafts(session) == before + 1


def test_another_tenants_draft_is_404(client, keys, other_keys):
    draft_id = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=keys.agent).json()["id"]
    assert client.get(f"/v1/drafts/{draft_id}", headers=other_keys.reviewer).status_code == 404
    correction = {"verdict": "accepted"}
    assert (
        client.post(f"/v1/drafts/{draft_id}/correction", json=correction, headers=other_keys.reviewer).status_code
        == 404
    )
    assert client.get("/v1/drafts", headers=other_keys.agent).json()["items"] == []
    assert client.get("/v1/review-queue", headers=other_keys.reviewer).json()["pending"] == 0
    assert client.get("/v1/drafts/999999", headers=keys.agent).status_code == 404


def test_bad_input_is_refused_and_nothing_is_stored(client, keys, session):
    before = count_drafts(session)
    empty = client.post("/v1/drafts", json=EMAIL | {"body": "   "}, headers=keys.agent)
    assert empty.status_code == 422 and "at least 1 character" in empty.text
    huge = client.post("/v1/drafts", json=EMAIL | {"body": "x" * 20_001}, headers=keys.agent)
    assert huge.status_code == 413 and "limit is 20000" in huge.json()["detail"]
    too_long = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 5000}, headers=keys.agent)
    assert too_long.status_code == 422 and "limit is 1024" in too_long.json()["detail"]
    not_json = client.post(
        "/v1/drafts", content=b"{not json", headers=keys.agent | {"Content-Type": "application/json"}
    )
    assert not_json.status_code == 422 and "JSON" in not_json.text
    missing = client.post("/v1/drafts", json={"subject": "no body"}, headers=keys.agent)
    assert missing.status_code == 422 and "sender" in missing.text and "body" in missing.text
    request_too_big = client.post("/v1/drafts", content=b"x" * 1_000_001, headers=keys.agent)
    assert request_too_big.status_code == 413 and "limit is 1000000" in request_too_big.json()["detail"]
    assert count_drafts(session) == before


def test_admin_updates_the_tenant_instructions(client, keys):
    response = client.patch("/v1/tenant", json={"instructions": "Sign every reply as Marta."}, headers=keys.admin)
    assert response.status_code == 200
    assert client.get("/v1/tenant", headers=keys.agent).json()["instructions"] == "Sign every reply as Marta."


def test_a_draft_uses_and_records_the_request_s_repetition_guard(client, keys, tiny_drafter):
    guard = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    response = client.post("/v1/drafts", json=EMAIL | guard | {"max_new_tokens": 24}, headers=keys.agent)
    assert response.status_code == 201, response.text
    generation = response.json()["generation"]
    assert generation["repetition_penalty"] == 1.5 and generation["no_repeat_ngram_size"] == 2
    assert generation["stop_cycles"] is True  # the server's setting where the request says nothing
    prompt = tiny_drafter.prompt(keys.tenant.instructions, IncomingEmail(**EMAIL))
    stream = tiny_drafter.submit(prompt, max_new_tokens=24, guard=tiny_drafter.guard_with(**guard))
    assert response.json()["draft_text"] == tiny_drafter.result(prompt, stream).text
    refused = client.post("/v1/drafts", json=EMAIL | {"repetition_penalty": 0.5}, headers=keys.agent)
    assert refused.status_code == 422 and "repetition_penalty" in refused.text
