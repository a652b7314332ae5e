"""The remote drafting backend end to end, against a second draftloop process on loopback (the
drafting server, holding the model) that serves `/v1/completions` with token ids as vLLM does:
drafts through it are token-identical to the in-process engine's, for the base model and for a
tenant's adapter, through every drafting route; a server that cannot be reached is a 503."""

import dataclasses
import json
import os
from collections.abc import Iterator

import httpx
import pytest
from safetensors.torch import load_file
from sqlalchemy.orm import Session

from agent.drafting import Drafter
from agent.prompt import IncomingEmail
from agent.repetition import RepetitionGuard
from core.settings import Settings
from tests.agent.engines import prompts
from tests.api.apps import app_client
from tests.factories import EMAIL, random_lora, store_version
from tests.live import Keys, Live, drop_database, free_port, fresh_database
from training import registry
from training.models import Adapter

SECRET = "a-backend-key"
EMAILS = [
    {"sender": "Dana <dana@example.com>", "subject": "Order 1182", "body": "Where is my order? It is late."},
    {"sender": "Lee <lee@example.com>", "subject": "Return", "body": "Can I return a helmet after 40 days?"},
    {"sender": "Sam <sam@example.com>", "subject": "Brakes", "body": "My brakes squeal. " * 6},
]


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory) -> Iterator[Live]:
    """The drafting server: `draftloop serve` with the tiny model and the backend key."""
    folder = tmp_path_factory.mktemp("drafting-server")
    url = fresh_database("postgres", folder)
    settings = {"model_dtype": "float32", "backend_api_key": SECRET}
    with Live(url, os.environ["DRAFTLOOP_REDIS_URL"], folder, base_model=str(tiny_base_dir), settings=settings) as live:
        live.start_api()
        yield live
    drop_database(url)


def front_settings(server: Live, tiny_base_dir, **overrides) -> Settings:
    """A server that drafts through `server`: the same database, registry and base model files."""
    values = {
        "base_model": str(tiny_base_dir),
        "model_dtype": "float32",
        "var_dir": server.var_dir,
        "database_url": server.database_url,
        "drafting_backend": "remote",
        "remote_url": server.url,
        "backend_api_key": SECRET,
    }
    return Settings(**(values | overrides))


@pytest.fixture(scope="module")
def tenant(server, tiny_model, tiny_base_dir, tmp_path_factory) -> tuple[Keys, Adapter]:
    """A tenant whose champion is a random adapter in the shared registry."""
    keys = server.tenant(instructions="You answer for a bicycle shop. Be brief.")
    settings = front_settings(server, tiny_base_dir)
    trained = random_lora(tiny_model.model.config, tmp_path_factory.mktemp("trained"), seed=11)
    with Session(server.engine, expire_on_commit=False) as session:
        adapter = store_version(session, settings, keys.tenant_id, trained)
        registry.promote(session, settings, adapter, actor="test", reason="the remote backend's tests")
        session.commit()
    return keys, adapter


@pytest.fixture(scope="module")
def local(server, tiny_model, tiny_base_dir) -> Drafter:
    return Drafter.local(tiny_model, front_settings(server, tiny_base_dir, drafting_backend="local"))


def test_remote_drafts_are_token_identical_to_local_ones(server, tenant, local, tiny_base_dir, tmp_path):
    _, adapter = tenant
    settings = front_settings(server, tiny_base_dir, remote_publish_dir=tmp_path / "published")
    remote = Drafter.remote(settings)
    try:
        with Session(server.engine) as session:
            ref = registry.serving_ref(session, settings, adapter, remote.fingerprint)
        scaled = dataclasses.replace(ref, scale=1.5, name=registry.served_name(adapter, 1.5))
        batch = prompts(remote.tokenizer, 6)
        reasons = set()
        for served in (None, ref, scaled):  # the drafting server reads the scale from the name
            for guard in (remote.guard, RepetitionGuard()):  # the server's guard (cycle stop on), plain greedy
                ours = remote.submit_many(batch, max_new_tokens=48, adapter=served, guard=guard)  # at once
                theirs = local.submit_many(batch, max_new_tokens=48, adapter=served, guard=guard)
                got = [(s.result(timeout=120), s.finish_reason) for s in ours]
                assert got == [(s.result(timeout=120), s.finish_reason) for s in theirs], (served, guard)
                reasons |= {reason for _, reason in got}
        assert {"repetition", "length"} & reasons, reasons  # the cycle stop and the limit were exercised
    finally:
        remote.close()

    # Published under its immutable name, in the layout vLLM's filesystem resolver reads
    folder = tmp_path / "published" / ref.name
    assert ref.name == f"tenant-{adapter.tenant_id}-v{adapter.version:04d}-{adapter.content_hash[:12]}"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base_dir)
    original, published = (
        load_file(ref.path / "adapter_model.safetensors"),
        load_file(folder / "adapter_model.safetensors"),
    )
    assert original.keys() == published.keys() and all(original[k].equal(published[k]) for k in original)
    # A scale other than 1 is folded into lora_alpha (vLLM has no per-request scale), under its own name
    assert scaled.name == f"{ref.name}-s1.5"
    configs = [json.loads((tmp_path / "published" / r.name / "adapter_config.json").read_text()) for r in (ref, scaled)]
    assert configs[1]["lora_alpha"] == 1.5 * configs[0]["lora_alpha"]


def test_every_drafting_route_works_through_a_front_server(server, tenant, local, tiny_base_dir, tmp_path):
    keys, adapter = tenant
    front = Live(
        server.database_url,
        server.redis_url,
        tmp_path,
        base_model=str(tiny_base_dir),
        settings={
            "model_dtype": "float32",
            "adapter_dir": server.var_dir / "adapters",
            "drafting_backend": "remote",
            "remote_url": server.url,
            "backend_api_key": SECRET,
        },
    )
    instructions = "You answer for a bicycle shop. Be brief."
    with Session(server.engine) as session:
        ref = registry.serving_ref(session, front_settings(server, tiny_base_dir), adapter, local.fingerprint)
    expected = [d.text for d in local.draft_many(instructions, [IncomingEmail(**e) for e in EMAILS], adapter=ref)]
    with front, httpx.Client(base_url=front.url, timeout=120) as http:
        front.start_api()
        one = http.post("/v1/drafts", json=EMAILS[0], headers=keys.agent)
        assert one.status_code == 201, one.text
        assert one.json()["backend"] == f"remote {server.url}" and one.json()["adapter_id"] == adapter.id
        assert one.json()["draft_text"] == expected[0]

        batch = http.post("/v1/drafts/batch", json={"emails": EMAILS}, headers=keys.agent)
        assert batch.status_code == 201, batch.text
        assert [d["draft_text"] for d in batch.json()] == expected

        with http.stream("POST", "/v1/drafts/stream", json=EMAILS[1], headers=keys.agent) as streamed:
            assert streamed.status_code == 200
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        stored = json.loads(events[-1][6:])
        assert "".join(json.loads(e[6:])["text"] for e in events[:-1]).strip() == stored["draft_text"] == expected[1]
        assert stored["backend"] == f"remote {server.url}"

        messages = [{"role": "user", "content": EMAILS[2]["body"]}]
        chat = http.post("/v1/chat/completions", json={"model": "champion", "messages": messages}, headers=keys.agent)
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]
        assert front.logged_errors() == []


def test_a_drafting_server_that_cannot_be_reached_is_a_503(session, keys, tiny_base_dir, tmp_path):
    unreachable = Settings(
        base_model=str(tiny_base_dir),
        var_dir=tmp_path,
        drafting_backend="remote",
        remote_url=f"http://127.0.0.1:{free_port()}",
    )
    remote = Drafter.remote(unreachable)
    try:
        with app_client(session, remote) as client:
            for path, body in [
                ("/v1/drafts", EMAIL),
                ("/v1/drafts/batch", {"emails": [EMAIL, EMAIL]}),
                ("/v1/drafts/stream", EMAIL),
                ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}),
            ]:
                response = client.post(path, json=body, headers=keys.agent)
                assert response.status_code == 503, (path, response.text)
                assert "cannot be reached" in response.text and int(response.headers["Retry-After"]) >= 1
            assert client.get("/v1/drafts", headers=keys.agent).json()["items"] == []  # nothing half-stored
    finally:
        remote.close()


def test_the_token_route_is_only_for_servers_holding_the_backend_key(server, tenant, local):
    _, adapter = tenant
    body = {"model": "base", "prompt": [1, 2, 3], "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/completions", json=body).status_code == 401
        wrong = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "DRAFTLOOP_BACKEND_API_KEY" in wrong.text
        auth = {"Authorization": f"Bearer {SECRET}"}
        ok = http.post("/v1/completions", json=body | {"return_token_ids": True}, headers=auth)
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2, ok.text
        for bad, status, words in [
            ({"model": "tenant-1-v0001-000000000000"}, 404, "no model"),
            ({"model": "gpt-4o"}, 404, "tenant-<id>-v<NNNN>"),
            ({"base_fingerprint": "0" * 64}, 409, "fingerprints differ"),
            ({"prompt": [10**9]}, 422, "vocabulary"),
            ({"stop_token_ids": [5]}, 422, "end-of-turn"),
            ({"temperature": 0.7}, 422, "greedily"),
        ]:
            response = http.post("/v1/completions", json=body | bad, headers=auth)
            assert response.status_code == status and words in response.text, (bad, response.text)
        for name in (registry.served_name(adapter, 1.0), registry.served_name(adapter, 0.75)):
            served = http.post("/v1/completions", json=body | {"model": name}, headers=auth)
            assert served.status_code == 200, served.text
        unscaled = {"model": registry.served_name(adapter, 1.0) + "-s0"}
        unscalable = http.post("/v1/completions", json=body | unscaled, headers=auth)
        assert unscalable.status_code == 404, unscalable.text


def test_a_server_without_a_backend_key_refuses_token_completions(session, tiny_drafter):
    with app_client(session, tiny_drafter) as client:
        response = client.post("/v1/completions", json={"model": "base", "prompt": [1], "max_tokens": 1})
    assert response.status_code == 403 and "DRAFTLOOP_BACKEND_API_KEY" in response.json()["error"]["message"]
