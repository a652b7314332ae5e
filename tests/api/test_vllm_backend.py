"""The remote drafting backend against a real vLLM: the CPU build (`make vllm`, .venv-vllm)
serving the embedded base model with LoRA. Drafts through it equal the in-process engine's, for
the base model and for adapters it had never seen (published by the backend under their
immutable names and loaded on demand by vLLM's filesystem resolver), at their trained scaling
and at another scale (folded into the published adapter), and the drafting routes
work through it: batches, streaming, the OpenAI route."""

import dataclasses
import json
from pathlib import Path

import httpx
import pytest

from agent.adapters import AdapterRef
from agent.base_model import model_source
from agent.drafting import Drafter
from agent.prompt import IncomingEmail
from agent.repetition import RepetitionGuard
from core.settings import get_settings
from feedback.samples import load_sample_tenant
from tests.agent.engines import prompts
from tests.api.apps import app_client
from tests.factories import make_tenant, random_lora, store_version
from tests.vllm import VllmServer
from training import registry
from training.export import export_adapter
from training.models import ExportFormat

SECRET = "a-vllm-key"
# vLLM has repetition_penalty but no no_repeat_ngram_size; the cycle stop is the backend's own
GUARDS = [RepetitionGuard(), RepetitionGuard(repetition_penalty=1.1, stop_cycles=True)]


@pytest.fixture(scope="module")
def vllm(model_settings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm")
    model_dir = Path(model_source(model_settings))
    with VllmServer(model_dir, folder / "published", folder / "vllm.log", api_key=SECRET) as server:
        yield server


def remote_settings(model_settings, vllm, tmp_path):
    return model_settings.model_copy(
        update={
            "drafting_backend": "remote",
            "remote_url": vllm.url,
            "backend_api_key": SECRET,
            "remote_publish_dir": vllm.publish_dir,
            "adapter_dir": tmp_path / "registry",
            "no_repeat_ngram_size": 0,
        }
    )


def stored_adapter(session, settings, tenant_id, model_config, folder: Path, seed: int):
    trained = random_lora(model_config, folder, rank=8, seed=seed, std=0.02)
    return store_version(session, settings, tenant_id, trained)


def test_vllm_drafts_equal_the_in_process_engine(vllm, embedded_model, model_settings, tmp_path):
    settings = remote_settings(model_settings, vllm, tmp_path)
    remote, local = Drafter.remote(settings), Drafter.local(embedded_model, settings)
    adapters = []
    for i in range(2):  # versions vLLM has never seen
        folder = random_lora(embedded_model.model.config, tmp_path / str(i), rank=8, seed=i, std=0.02)
        adapters.append(AdapterRef(100 + i, folder, name=f"tenant-0-v{i + 1:04d}-{registry.content_hash(folder)[:12]}"))
    # The first at another scale: vLLM has none per request; it is published with it folded in
    adapters.append(dataclasses.replace(adapters[0], name=f"{adapters[0].name}-s1.5", scale=1.5))
    batch = prompts(remote.tokenizer, 4)
    drafts = {}
    try:
        for served in (None, *adapters):
            for guard in GUARDS:
                ours = remote.submit_many(batch, max_new_tokens=32, adapter=served, guard=guard)
                theirs = local.submit_many(batch, max_new_tokens=32, adapter=served, guard=guard)
                got = [(s.result(timeout=300), s.finish_reason) for s in ours]
                assert got == [(s.result(timeout=300), s.finish_reason) for s in theirs], (served, guard)
                drafts[served, guard] = got
    finally:
        remote.close()
        local.close()
    for ref in adapters:  # each changes the drafts; published under its name, as the resolver reads it
        assert all(drafts[ref, guard] != drafts[None, guard] for guard in GUARDS)
        assert (vllm.publish_dir / ref.name / "adapter_model.safetensors").is_file()


def test_the_drafting_routes_work_through_vllm(vllm, embedded_model, model_settings, session, keys, tmp_path):
    settings = remote_settings(model_settings, vllm, tmp_path)
    adapter = stored_adapter(session, settings, keys.tenant.id, embedded_model.model.config, tmp_path / "a", seed=5)
    registry.promote(session, settings, adapter, actor="test", reason="vLLM")
    session.commit()
    remote, local = Drafter.remote(settings), Drafter.local(embedded_model, settings)
    emails = [{"sender": e.sender, "subject": e.subject, "body": e.body} for e in load_sample_tenant().emails[:3]]
    try:
        with app_client(session, remote) as client:
            client.app.dependency_overrides[get_settings] = lambda: settings
            limits = {"max_new_tokens": 24, "no_repeat_ngram_size": 0}
            batch = client.post("/v1/drafts/batch", json={"emails": emails, **limits}, headers=keys.agent)
            assert batch.status_code == 201, batch.text
            ref = registry.serving_ref(session, settings, adapter, remote.fingerprint)
            guard = remote.guard_with(no_repeat_ngram_size=0)
            expected = local.draft_many(
                keys.tenant.instructions,
                [IncomingEmail(**e) for e in emails],
                max_new_tokens=24,
                adapter=ref,
                guard=guard,
            )
            assert [d["draft_text"] for d in batch.json()] == [d.text for d in expected]
            assert {(d["backend"], d["adapter_id"]) for d in batch.json()} == {(f"remote {vllm.url}", adapter.id)}

            with client.stream("POST", "/v1/drafts/stream", json=emails[0] | limits, headers=keys.agent) as streamed:
                assert streamed.status_code == 200
                events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
            assert json.loads(events[-1][6:])["draft_text"] == expected[0].text

            chat = client.post(
                "/v1/chat/completions",
                json={"model": "champion", "messages": [{"role": "user", "content": "Where is my order?"}]},
                headers=keys.agent,
            )
            assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text
    finally:
        remote.close()
        local.close()


def test_an_adapter_published_outside_the_resolvers_folder_is_loaded_through_the_load_route(
    vllm, embedded_model, model_settings, tmp_path
):
    """With remote_load_route the backend tells vLLM where the version is: the resolver, which
    only looks in its own folder, cannot have found this one."""
    settings = remote_settings(model_settings, vllm, tmp_path).model_copy(
        update={"remote_publish_dir": tmp_path / "elsewhere", "remote_load_route": True}
    )
    folder = random_lora(embedded_model.model.config, tmp_path / "trained", rank=8, seed=9, std=0.02)
    ref = AdapterRef(200, folder, name=f"tenant-0-v0009-{registry.content_hash(folder)[:12]}")
    remote, local = Drafter.remote(settings), Drafter.local(embedded_model, settings)
    batch = prompts(remote.tokenizer, 2)
    try:
        ours = [s.result(timeout=300) for s in remote.submit_many(batch, max_new_tokens=24, adapter=ref)]
        theirs = [s.result(timeout=300) for s in local.submit_many(batch, max_new_tokens=24, adapter=ref)]
    finally:
        remote.close()
        local.close()
    assert ours == theirs
    assert (tmp_path / "elsewhere" / ref.name).is_dir() and not (vllm.publish_dir / ref.name).exists()


def test_vllm_serves_a_peft_export_as_it_is(vllm, embedded_model, model_settings, pg_session, tmp_path):
    """vLLM loads the exported folder itself, through its runtime load route, with nothing
    published or rewritten, and drafts with it the engine's tokens for the version."""
    settings = remote_settings(model_settings, vllm, tmp_path)
    tenant = make_tenant(pg_session)
    adapter = stored_adapter(pg_session, settings, tenant.id, embedded_model.model.config, tmp_path / "a", seed=11)
    folder = export_adapter(pg_session, settings, tenant.id, adapter.version, ExportFormat.peft, tmp_path / "export")
    name = f"export-{adapter.content_hash[:12]}"
    loaded = httpx.post(
        f"{vllm.url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(folder)},
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=120,
    )
    assert loaded.status_code == 200, loaded.text
    remote = Drafter.remote(settings.model_copy(update={"remote_publish_dir": None}))  # it drafts with `name`
    local = Drafter.local(embedded_model, settings)
    ref = registry.serving_ref(pg_session, settings, adapter, local.fingerprint)
    batch = prompts(remote.tokenizer, 2)
    try:
        exported = dataclasses.replace(ref, name=name)
        ours = [s.result(timeout=300) for s in remote.submit_many(batch, max_new_tokens=24, adapter=exported)]
        theirs = [s.result(timeout=300) for s in local.submit_many(batch, max_new_tokens=24, adapter=ref)]
        base = [s.result(timeout=300) for s in local.submit_many(batch, max_new_tokens=24)]
    finally:
        remote.close()
        local.close()
    assert ours == theirs != base
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", *registry.ADAPTER_FILES]
