"""Shadow drafting through the API with the tiny model: a shadow drafts beside the champion in
the same batch (stored, never shown), both drafts are scored on each correction, and after the
tenant's number of corrections the shadow is promoted on better live scores and rejected on worse,
with the figures in the audit row; the decision never fails a correction."""

import uuid
from dataclasses import dataclass

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from agent.adapters import AdapterRef
from agent.prompt import IncomingEmail
from api.cli import app as cli
from core.settings import get_settings
from feedback import service
from feedback.models import Tenant, utcnow
from tests.factories import EMAIL, make_draft, make_tenant, random_lora, store_version
from training import registry, scheduling, shadow
from training.models import Adapter, AdapterEvent, AdapterStatus, ShadowDraft

N = 5  # the tenant's shadow_corrections: the smallest allowed
EMAILS = [EMAIL | {"body": f"My brake squeals, order {n}. Can you look at it {n} days from now?"} for n in range(N)]


@dataclass
class Shadowed:
    settings: object
    champion_id: int
    shadow_id: int
    shadow_ref: AdapterRef


@pytest.fixture
def shadowed(client, keys, session, tiny_drafter, tiny_model, tiny_settings, tmp_path) -> Shadowed:
    """A champion and a shadow (random LoRAs of the tiny model) for the keys' tenant, deciding after N."""
    settings = get_settings().model_copy(
        update={"adapter_dir": tmp_path / "registry", "base_model": tiny_settings.base_model}
    )
    client.app.dependency_overrides[get_settings] = lambda: settings
    versions = [
        store_version(
            session,
            settings,
            keys.tenant.id,
            random_lora(tiny_model.model.config, tmp_path / f"trained-{seed}", seed=seed),
            base_fingerprint=tiny_drafter.fingerprint,
        )
        for seed in (3, 4)
    ]
    registry.promote(session, settings, versions[0], actor="test", reason="the champion")
    keys.tenant.shadow_corrections = N
    registry.start_shadow(session, settings, versions[1], actor="test", reason="in shadow")
    session.commit()
    ref = registry.serving_ref(session, settings, versions[1], tiny_drafter.fingerprint)
    return Shadowed(settings, versions[0].id, versions[1].id, ref)


def draft_all(client, keys) -> list[dict]:
    drafts = []
    for email in EMAILS:
        response = client.post("/v1/drafts", json=email | {"max_new_tokens": 12}, headers=keys.agent)
        assert response.status_code == 201, response.text
        drafts.append(response.json())
    return drafts


def shadow_text(session, draft_id: int) -> str:
    return session.scalar(select(ShadowDraft.text).where(ShadowDraft.draft_id == draft_id))


def test_a_shadow_drafts_beside_the_champion_and_is_never_shown(client, keys, session, tiny_drafter, shadowed):
    drafts = draft_all(client, keys)
    rows = session.scalars(select(ShadowDraft).order_by(ShadowDraft.id)).all()
    assert [row.draft_id for row in rows][-N:] == [d["id"] for d in drafts]
    for draft, email in zip(drafts, EMAILS, strict=True):
        incoming = IncomingEmail(email["sender"], email["subject"], email["body"])
        alone = tiny_drafter.draft(keys.tenant.instructions, incoming, max_new_tokens=12, adapter=shadowed.shadow_ref)
        stored = session.scalar(select(ShadowDraft).where(ShadowDraft.draft_id == draft["id"]))
        assert stored.adapter_id == shadowed.shadow_id and stored.text == alone.text  # token-equal to it alone
        assert draft["adapter_id"] == shadowed.champion_id and draft["draft_text"] != stored.text
    shown = [
        client.get("/v1/drafts?limit=200", headers=keys.reviewer).text,
        client.get("/v1/review-queue", headers=keys.reviewer).text,
        client.get(f"/v1/drafts/{drafts[0]['id']}", headers=keys.reviewer).text,
        *(str(d) for d in drafts),
    ]
    batch = client.post("/v1/drafts/batch", json={"emails": EMAILS[:2], "max_new_tokens": 12}, headers=keys.agent)
    assert batch.status_code == 201 and shadow_text(session, batch.json()[1]["id"])
    shown.append(batch.text)
    for row in rows:
        assert all(row.text not in page for page in shown)

    live = client.get("/v1/shadow", headers=keys.admin).json()["live"]
    assert (live["shadow_version"], live["champion_version"], live["needed"]) == (2, 1, N)
    assert live["drafts"] == N + 2 and live["scored"] == 0 and live["ci_low"] is None


def correct(client, keys, draft: dict, final_text: str | None) -> None:
    body = {"verdict": "accepted"} if final_text is None else {"verdict": "edited", "final_text": final_text}
    response = client.post(f"/v1/drafts/{draft['id']}/correction", json=body, headers=keys.reviewer)
    assert response.status_code == 201, response.text


def decision(session, tenant_id: int) -> AdapterEvent:
    return session.scalar(
        select(AdapterEvent)
        .where(AdapterEvent.tenant_id == tenant_id, AdapterEvent.scores.is_not(None))
        .order_by(AdapterEvent.id.desc())
    )


def test_a_shadow_is_promoted_on_better_live_scores(client, keys, session, shadowed):
    drafts = draft_all(client, keys)
    for i, draft in enumerate(drafts):  # the reviewers write what the shadow drafted
        correct(client, keys, draft, shadow_text(session, draft["id"]))
        status = registry.shadow(session, keys.tenant.id)
        assert (status is not None) == (i < N - 1)  # decided at the N-th correction, not before
    assert registry.champion(session, keys.tenant.id).id == shadowed.shadow_id
    event = decision(session, keys.tenant.id)
    assert (event.action, event.actor, event.to_adapter_id) == ("promote", "shadow", shadowed.shadow_id)
    scores = event.scores
    assert scores["scored"] == N and scores["shadow_chrf"] == 100 and scores["champion_chrf"] < 100
    assert scores["shadow_edit_words"] == 0 and scores["champion_edit_words"] > 0 and scores["ci_low"] > 0
    assert event.reason.startswith(f"{N} corrections: chrF 100.0 (shadow v2) vs") and "better, promoted" in event.reason
    last = client.get("/v1/shadow", headers=keys.admin).json()
    assert last["live"] is None and last["last_decision"]["action"] == "promote"
    assert last["last_decision"]["scores"]["difference"] == scores["difference"] > 0
    assert client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 4}, headers=keys.agent).json()["adapter_id"] == (
        shadowed.shadow_id
    )
    scraped = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if line[:1] != "#")
    assert float(scraped['draftloop_shadow_decisions_total{decision="promoted"}']) >= 1
    assert float(scraped['draftloop_shadow_drafts_total{outcome="stored"}']) >= N


def test_a_shadow_is_rejected_on_worse_live_scores_and_decided_once(client, keys, session, shadowed):
    drafts = draft_all(client, keys)
    for draft in drafts:  # the reviewers keep the champion's drafts
        correct(client, keys, draft, None)
    assert registry.champion(session, keys.tenant.id).id == shadowed.champion_id
    assert registry.shadow(session, keys.tenant.id) is None
    event = decision(session, keys.tenant.id)
    assert (event.action, event.to_adapter_id) == ("reject", shadowed.shadow_id)
    assert event.scores["champion_chrf"] == 100 and event.scores["champion_edit_words"] == 0
    assert event.scores["difference"] < 0 and "not better" in event.reason and "95% CI" in event.reason
    assert shadow.decide(session, shadowed.settings, keys.tenant.id) is None  # decided already: once


def test_a_correction_is_stored_when_the_decision_fails_and_the_sweep_decides(client, keys, session, shadowed):
    drafts = draft_all(client, keys)
    for draft in drafts[:-1]:
        correct(client, keys, draft, shadow_text(session, draft["id"]))
    sweep_before = scheduling.due_shadows(session)
    # The decision after the last correction fails: the database refuses its lock for a moment
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "lock_tenant", lambda *args: (_ for _ in ()).throw(RuntimeError("database busy")))
        correct(client, keys, drafts[-1], shadow_text(session, drafts[-1]["id"]))
    assert keys.tenant.id not in sweep_before and registry.shadow(session, keys.tenant.id).id == shadowed.shadow_id
    assert scheduling.due_shadows(session) == [keys.tenant.id]  # the sweep sends it to a training worker

    # Its files changed since: the decision checks them as any promotion does, and rejects it
    folder = shadowed.settings.adapter_dir / registry.shadow(session, keys.tenant.id).path
    (folder / "adapter_model.safetensors").write_bytes(b"changed")
    assert shadow.decide(session, shadowed.settings, keys.tenant.id) == "rejected"
    event = decision(session, keys.tenant.id)
    assert "better, but not promoted" in event.reason and "content hash mismatch" in event.reason
    assert registry.champion(session, keys.tenant.id).id == shadowed.champion_id
    assert scheduling.due_shadows(session) == []


def test_a_new_shadow_supersedes_and_a_rollback_ends_it(keys, session, shadowed, tiny_model, tmp_path):
    old = session.get(Adapter, shadowed.shadow_id)
    third = store_version(
        session,
        shadowed.settings,
        keys.tenant.id,
        random_lora(tiny_model.model.config, tmp_path / "trained-5", seed=5),
        base_fingerprint=old.base_model_fingerprint,
    )
    registry.start_shadow(session, shadowed.settings, third, actor="test", reason="newer")
    assert old.status == AdapterStatus.rejected and third.status == AdapterStatus.shadow
    events = session.scalars(select(AdapterEvent).where(AdapterEvent.to_adapter_id == old.id)).all()
    assert events[-1].reason == "superseded by v3"
    registry.rollback(session, keys.tenant.id, actor="ops", reason="worse")
    assert third.status == AdapterStatus.rejected and registry.shadow(session, keys.tenant.id) is None


def test_the_setting_is_validated_and_clearing_it_ends_a_shadow(client, keys, session, shadowed):
    for bad, words in [(4, "greater than or equal to 5"), (10_001, "less than or equal to 10000"), ("x", "integer")]:
        refused = client.patch("/v1/tenant", json={"shadow_corrections": bad}, headers=keys.admin)
        assert refused.status_code == 422 and words in refused.text, (bad, refused.text)
    assert client.patch("/v1/tenant", json={"shadow_corrections": 9}, headers=keys.agent).status_code == 403
    patched = client.patch("/v1/tenant", json={"shadow_corrections": 9}, headers=keys.admin)
    assert patched.status_code == 200 and patched.json()["shadow_corrections"] == 9
    assert client.get("/v1/shadow", headers=keys.agent).json()["live"]["needed"] == 9
    cleared = client.patch("/v1/tenant", json={"shadow_corrections": None}, headers=keys.admin).json()
    assert cleared["shadow_corrections"] is None and registry.shadow(session, keys.tenant.id) is None
    assert client.get("/v1/shadow", headers=keys.agent).json()["live"] is None


runner = CliRunner()


def test_the_cli_sets_the_setting_and_shows_the_shadow(postgres_engine, pg_session):
    slug = f"cli-{uuid.uuid4().hex[:8]}"
    assert runner.invoke(cli, ["tenants", "create", "--slug", slug, "--name", "CLI Co"]).exit_code == 0

    def setting(*args: str):
        result = runner.invoke(cli, ["tenants", "shadow-corrections", "--tenant", slug, *args])
        stored = pg_session.scalar(select(Tenant.shadow_corrections).where(Tenant.slug == slug))
        return result.exit_code, result.output, stored

    assert setting() == (0, f"{slug}: a candidate that passes the gate is promoted at once\n", None)
    code, output, stored = setting("30")
    assert code == 0 and "in shadow until 30 corrections are scored" in output and stored == 30
    code, output, stored = setting("3")
    assert code == 1 and "from 5 to 10000, not 3" in output and stored == 30
    assert setting("8", "--clear")[0] == 2
    assert setting("--clear")[2] is None
    shown = runner.invoke(cli, ["shadow", "status", "--tenant", slug])
    assert shown.exit_code == 0 and shown.output == f"{slug}: no version is in shadow\n"


def test_a_shadow_with_higher_chrf_but_more_words_to_edit_is_rejected(session, keys, shadowed):
    """Longer drafts can share more character n-grams with the final text and still leave the
    reviewer more to change: as the sample tenant's shadow run showed, chrF alone would promote."""
    for n in range(N):
        draft = make_draft(session, keys.tenant, f"The champion's draft {n}.")
        scores = dict(champion_chrf=30.0 + n, shadow_chrf=38.0 + 2 * n, champion_edit_words=10 + n)
        session.add(
            ShadowDraft(
                draft_id=draft.id,
                adapter_id=shadowed.shadow_id,
                text=f"A longer draft of the shadow {n}.",
                finish_reason="stop",
                tokens_generated=9,
                scored_at=utcnow(),
                shadow_edit_words=25,
                **scores,
            )
        )
    session.flush()
    assert shadow.decide(session, shadowed.settings, keys.tenant.id) == "rejected"
    event = decision(session, keys.tenant.id)
    assert event.scores["ci_low"] > 0 and event.scores["edit_ci_low"] > 0  # better chrF, confidently more edits
    assert "mean edit-words difference +13.0, 95% CI [" in event.reason and "more words to edit" in event.reason
    assert registry.champion(session, keys.tenant.id).id == shadowed.champion_id


def test_a_teams_shadow_is_compared_with_the_organizations_champion_it_drafts_beside(
    session, tiny_drafter, tiny_model, tiny_settings, tmp_path
):
    settings = get_settings().model_copy(
        update={"adapter_dir": tmp_path / "registry", "base_model": tiny_settings.base_model}
    )
    organization, team = make_tenant(session), make_tenant(session)
    service.set_organization(session, team, organization)
    champion, candidate = (
        store_version(
            session,
            settings,
            tenant.id,
            random_lora(tiny_model.model.config, tmp_path / f"trained-{tenant.id}", seed=tenant.id),
            base_fingerprint=tiny_drafter.fingerprint,
        )
        for tenant in (organization, team)
    )
    registry.promote(session, settings, champion, actor="test", reason="the organization's champion")
    team.shadow_corrections = N
    registry.start_shadow(session, settings, candidate, actor="test", reason="in shadow")
    compared = shadow.comparison(session, candidate)
    assert (compared.champion_version, compared.champion_inherited) == (champion.version, True)
    assert f"against the organization's champion v{champion.version}" in compared.summary()
