"""The adapter scale through the API: a version is served at the scale chosen for it, unless its
tenant sets one (PATCH /v1/tenant, validated); each draft records the scale it was decoded with,
and the OpenAI route says it."""

import dataclasses

from agent.prompt import IncomingEmail
from core.settings import get_settings
from tests.factories import EMAIL, random_lora, store_version
from training import registry
from training.models import AdapterStatus


def test_drafts_use_and_record_the_tenants_or_the_versions_scale(
    client, keys, session, tiny_drafter, tiny_model, tmp_path
):
    settings = get_settings().model_copy(update={"adapter_dir": tmp_path / "registry"})
    client.app.dependency_overrides[get_settings] = lambda: settings
    adapter = store_version(
        session,
        settings,
        keys.tenant.id,
        random_lora(tiny_model.model.config, tmp_path / "trained", seed=3),
        base_fingerprint=tiny_drafter.fingerprint,
        scale=1.25,  # as validation chose it
    )
    adapter.status = AdapterStatus.champion
    session.commit()
    ref = registry.serving_ref(session, settings, adapter, tiny_drafter.fingerprint)
    email = IncomingEmail(EMAIL["sender"], EMAIL["subject"], EMAIL["body"])

    def drafted(scale: float) -> tuple[dict, str]:
        """A draft through the API, and the engine's draft at that scale."""
        response = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 16}, headers=keys.agent)
        assert response.status_code == 201, response.text
        at = dataclasses.replace(ref, scale=scale)
        return response.json(), tiny_drafter.draft(keys.tenant.instructions, email, max_new_tokens=16, adapter=at).text

    draft, expected = drafted(1.25)
    assert ref.scale == 1.25 and draft["generation"]["adapter_scale"] == 1.25 and draft["draft_text"] == expected
    assert client.get("/v1/adapters", headers=keys.admin).json()[0]["scale"] == 1.25

    patched = client.patch("/v1/tenant", json={"adapter_scale": 0.5}, headers=keys.admin)
    assert patched.status_code == 200 and patched.json()["adapter_scale"] == 0.5, patched.text
    draft, expected = drafted(0.5)
    assert draft["generation"]["adapter_scale"] == 0.5 and draft["draft_text"] == expected
    assert expected != drafted(1.25)[1]  # the scale changes the draft

    chat = client.post(
        "/v1/chat/completions",
        json={"model": "champion", "messages": [{"role": "user", "content": "Where is my order?"}]},
        headers=keys.agent,
    )
    assert chat.status_code == 200 and chat.json()["adapter_scale"] == 0.5, chat.text
    base = client.post(
        "/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True},
        headers=keys.agent,
    )
    assert base.status_code == 200 and '"adapter_scale": null' in base.text

    for bad, words in [(0, "greater than 0"), (2.5, "less than or equal to 2"), (0.333, "two decimals"), ("x", "")]:
        refused = client.patch("/v1/tenant", json={"adapter_scale": bad}, headers=keys.admin)
        assert refused.status_code == 422 and words in refused.text, (bad, refused.text)
    assert client.patch("/v1/tenant", json={"adapter_scale": 1.0}, headers=keys.agent).status_code == 403

    kept = client.patch("/v1/tenant", json={"name": "Renamed"}, headers=keys.admin).json()
    assert kept["adapter_scale"] == 0.5  # left out: unchanged
    cleared = client.patch("/v1/tenant", json={"adapter_scale": None}, headers=keys.admin).json()
    assert cleared["adapter_scale"] is None and cleared["name"] == "Renamed"
    assert drafted(1.25)[0]["generation"]["adapter_scale"] == 1.25  # the version's own scale again
