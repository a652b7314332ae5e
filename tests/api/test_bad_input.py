"""Input that once reached a 500 is refused at the edge with a 4xx that says what to fix."""

import json
import os

import pytest
import redis

from tests.factories import EMAIL

BIG_IDS = [0, 2**31, 2**63, 2**64]
ID_ROUTES = [
    ("get", "/v1/drafts/{}", "reviewer", None),
    ("post", "/v1/drafts/{}/correction", "reviewer", {"verdict": "accepted"}),
    ("delete", "/v1/keys/{}", "admin", None),
    ("get", "/v1/runs/{}", "admin", None),
    ("get", "/v1/runs/{}/dataset", "admin", None),
    ("post", "/v1/adapters/{}/promote", "admin", {"reason": "try it"}),
    ("get", "/v1/adapters/{}/export", "admin", None),
    ("get", "/v1/drafts?before_id={}", "reviewer", None),
]


@pytest.mark.parametrize(("method", "path", "role", "body"), ID_ROUTES)
def test_ids_out_of_the_columns_range_are_422(client, keys, method, path, role, body):
    for bad in BIG_IDS:
        response = client.request(method, path.format(bad), json=body, headers=getattr(keys, role))
        assert response.status_code == 422, (bad, response.text)
        assert "2147483647" in response.text or "greater than or equal to 1" in response.text
    largest = client.request(method, path.format(2**31 - 1), json=body, headers=getattr(keys, role))
    assert largest.status_code in (200, 404), largest.text


def raw_json(client, path: str, text: str, headers: dict):
    """A JSON body sent as it is written, so it can carry escapes such as a lone surrogate."""
    return client.post(path, content=text.encode(), headers=headers | {"Content-Type": "application/json"})


@pytest.mark.parametrize("bad", [r"\u0000", r"\ud800", r"a\udfffb"])
def test_nul_and_lone_surrogates_in_strings_are_422(client, keys, bad):
    draft_id = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=keys.agent).json()["id"]
    requests = [
        ("/v1/drafts", f'{{"sender": "a@b.c", "body": "hi {bad}"}}', keys.agent),
        ("/v1/drafts/batch", f'{{"emails": [{{"sender": "a{bad}@b.c", "body": "hi"}}]}}', keys.agent),
        (f"/v1/drafts/{draft_id}/correction", f'{{"verdict": "edited", "final_text": "x{bad}"}}', keys.reviewer),
        (f"/v1/drafts/{draft_id}/correction", f'{{"verdict": "rejected", "reason": "{bad}"}}', keys.reviewer),
        ("/v1/keys", f'{{"name": "k{bad}", "role": "agent"}}', keys.admin),
        (
            "/v1/chat/completions",
            f'{{"model": "base", "messages": [{{"role": "user", "content": "{bad}"}}]}}',
            keys.agent,
        ),
    ]
    for path, body, headers in requests:
        response = raw_json(client, path, body, headers)
        assert response.status_code == 422, (path, body, response.text)
        messages = [problem["msg"] for problem in response.json()["detail"]]
        assert any("NUL" in message or "surrogate" in message for message in messages), messages
    patched = client.patch("/v1/tenant", content=f'{{"instructions": "{bad}"}}'.encode(), headers=keys.admin)
    assert patched.status_code == 422, patched.text


def test_an_unencodable_echoed_input_keeps_the_422_shape(client, keys):
    draft_id = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=keys.agent).json()["id"]
    response = raw_json(client, f"/v1/drafts/{draft_id}/correction", r'{"verdict": "\ud800"}', keys.reviewer)
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "verdict"] and problem["input"] == "\\ud800"  # escaped, not echoed
    json.dumps(response.json(), ensure_ascii=False).encode()  # nothing in it fails to encode
    extra_key = raw_json(client, "/v1/runs", r'{"overrides": {"\ud800": 1}}', keys.admin)
    assert extra_key.status_code == 422 and extra_key.json()["detail"]
    for number in ("NaN", "Infinity", "-Infinity"):  # not JSON, but Python's parser reads them
        body = f'{{"sender": "a@b.c", "body": "x", "repetition_penalty": {number}}}'
        response = raw_json(client, "/v1/drafts", body, keys.agent)
        assert response.status_code == 422 and response.json()["detail"][0]["input"] in ("nan", "inf", "-inf")


def test_a_nul_in_the_idempotency_key_is_422(client, keys):
    draft_id = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=keys.agent).json()["id"]
    headers = keys.reviewer | {"Idempotency-Key": "retry\x00-1"}
    response = client.post(f"/v1/drafts/{draft_id}/correction", json={"verdict": "accepted"}, headers=headers)
    assert response.status_code == 422 and "NUL" in response.text


def test_model_names_follow_base_champion_or_v_n(client, keys):
    messages = [{"role": "user", "content": "Hello?"}]
    for bad in ["v²", "v", "v1.5", "V1", "gpt-4o", "v٣", "v99999999999", "base\n", " champion"]:
        response = client.post("/v1/chat/completions", json={"model": bad, "messages": messages}, headers=keys.agent)
        assert response.status_code == 422, (bad, response.text)
        assert "champion" in response.text
    unknown = client.post("/v1/chat/completions", json={"model": "v7", "messages": messages}, headers=keys.agent)
    assert unknown.status_code == 404 and "version 7" in unknown.text


MALFORMED_OVERRIDES = [
    ({"target_modules": "q_proj"}, "target_modules"),
    ({"target_modules": ["q_proj", "attention"]}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"try_learning_rates": 0.001}, "try_learning_rates"),
    ({"try_learning_rates": ["fast"]}, "try_learning_rates"),
    ({"try_learning_rates": [-0.001]}, "try_learning_rates"),
    ({"rank": "8"}, "rank"),
    ({"rank": None}, "rank"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"epochs": "2"}, "epochs"),
    ({"learning_rate": True}, "learning_rate"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ({"quantization": 4}, "quantization"),
    ({"epochz": 2}, "epochz"),
]


def test_malformed_training_overrides_are_422_and_name_the_setting(client, keys):
    redis.Redis.from_url(os.environ["DRAFTLOOP_REDIS_URL"]).flushdb()
    for overrides, setting in MALFORMED_OVERRIDES:
        response = client.post("/v1/runs", json={"overrides": overrides}, headers=keys.admin)
        assert response.status_code == 422, (overrides, response.text)
        assert setting in response.text
    assert client.get("/v1/runs", headers=keys.admin).json() == []
    good = {"target_modules": ["q_proj", "v_proj"], "try_learning_rates": [], "epochs": 1, "rank": 8}
    run = client.post("/v1/runs", json={"overrides": good}, headers=keys.admin)
    assert run.status_code == 202, run.text
    assert run.json()["config"] | good == run.json()["config"]
    redis.Redis.from_url(os.environ["DRAFTLOOP_REDIS_URL"]).flushdb()


def test_the_overrides_schema_is_documented(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    overrides = schemas["TrainOverrides"]
    assert overrides["additionalProperties"] is False
    assert overrides["properties"]["target_modules"]["items"]["enum"][0] == "q_proj"


def long_instructions(drafter, tokens: int) -> str:
    """Instructions of at least this many tokens, within the schema's 10,000 characters."""
    text = ""
    while len(drafter.tokenizer(text).input_ids) < tokens:
        text += "Always answer in the house style, and never promise a refund. "
    assert len(text) <= 10_000
    return text


def test_instructions_beyond_the_prompt_budget_are_refused_when_set(client, keys, tiny_drafter):
    budget = tiny_drafter.settings.max_prompt_tokens
    response = client.patch(
        "/v1/tenant", json={"instructions": long_instructions(tiny_drafter, budget)}, headers=keys.admin
    )
    assert response.status_code == 422, response.text
    assert str(budget) in response.json()["detail"] and "tokens" in response.json()["detail"]
    assert client.patch("/v1/tenant", json={"instructions": "Be brief."}, headers=keys.admin).status_code == 200


def test_drafting_for_a_tenant_stored_over_budget_is_422(client, keys, session, tiny_drafter):
    keys.tenant.instructions = long_instructions(tiny_drafter, tiny_drafter.settings.max_prompt_tokens + 100)
    session.commit()
    for path, body in [
        ("/v1/drafts", EMAIL),
        ("/v1/drafts/batch", {"emails": [EMAIL]}),
        ("/v1/drafts/stream", EMAIL),
    ]:
        response = client.post(path, json=body, headers=keys.agent)
        assert response.status_code == 422, (path, response.text)
        assert "instructions" in response.json()["detail"]
