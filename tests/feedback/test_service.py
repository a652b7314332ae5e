from datetime import timedelta

import pytest
from sqlalchemy import func, select

from core.errors import Conflict, Invalid, NotFound, Unauthorized
from feedback import service
from feedback.models import Correction, Role, Split, Verdict, WebSession
from feedback.service import CorrectionInput
from tests.factories import make_draft, make_key, make_tenant


def submit(session, draft, key, verdict, final_text=None, reason=None, idempotency_key=None):
    return service.submit_correction(
        session,
        draft=draft,
        correction=CorrectionInput(verdict, final_text, reason),
        reviewer_key=key,
        idempotency_key=idempotency_key,
        heldout_fraction=0.2,
    )


def test_api_keys_are_stored_hashed_and_can_be_revoked(session):
    tenant = make_tenant(session)
    key, raw = make_key(session, tenant, Role.agent)
    assert raw.startswith("dl_") and raw not in (key.key_hash, key.prefix)
    assert service.authenticate(session, raw).id == key.id
    service.revoke_api_key(session, tenant.id, key.id)
    with pytest.raises(Unauthorized):
        service.authenticate(session, raw)
    with pytest.raises(Unauthorized):
        service.authenticate(session, raw + "x")


def test_web_sessions_live_until_ended_expired_or_their_key_is_revoked(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant, Role.reviewer)
    signed_in = service.start_web_session(session, key, lifetime=timedelta(hours=12))
    assert service.web_session_key(session, signed_in).id == key.id
    assert session.scalar(select(WebSession.token_hash).where(WebSession.key_id == key.id)) != signed_in
    service.end_web_session(session, signed_in)
    with pytest.raises(Unauthorized, match="ended or expired"):
        service.web_session_key(session, signed_in)

    expired = service.start_web_session(session, key, lifetime=timedelta(0))
    with pytest.raises(Unauthorized, match="ended or expired"):
        service.web_session_key(session, expired)
    with pytest.raises(Unauthorized, match="ended or expired"):
        service.web_session_key(session, "never-issued")
    live = service.start_web_session(session, key, lifetime=timedelta(hours=12))  # deletes the expired one
    assert session.scalar(select(func.count()).where(WebSession.key_id == key.id)) == 2  # the ended one and live
    service.revoke_api_key(session, tenant.id, key.id)
    with pytest.raises(Unauthorized, match="revoked"):
        service.web_session_key(session, live)


def test_duplicate_or_malformed_slug_is_refused(session):
    tenant = make_tenant(session)
    with pytest.raises(Conflict):
        service.create_tenant(session, name="again", slug=tenant.slug)
    with pytest.raises(Invalid, match="lowercase"):
        service.create_tenant(session, name="bad", slug="Not A Slug")


def test_review_queue_is_oldest_first_per_tenant_and_drops_corrected(session):
    tenant, other = make_tenant(session), make_tenant(session)
    key, _ = make_key(session, tenant)
    first = make_draft(session, tenant, "one")
    second = make_draft(session, tenant, "two")
    second.created_at = first.created_at - timedelta(minutes=1)  # older, so it comes first
    make_draft(session, other, "other tenant")
    session.flush()

    queue = service.review_queue(session, tenant.id, limit=10)
    assert queue.pending == 2 and [d.id for d in queue.drafts] == [second.id, first.id]

    submit(session, second, key, Verdict.accepted)
    queue = service.review_queue(session, tenant.id, limit=10)
    assert queue.pending == 1 and [d.id for d in queue.drafts] == [first.id]


def test_accepted_correction_keeps_the_draft_text(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant)
    draft = make_draft(session, tenant, "Hi Dana, bring it in on Monday.")
    correction, created = submit(session, draft, key, Verdict.accepted)
    assert created and correction.final_text == draft.draft_text and correction.reviewer == key.name


def test_edited_needs_text_and_accepted_refuses_a_changed_text(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant)
    draft = make_draft(session, tenant)
    with pytest.raises(Invalid, match="final_text"):
        submit(session, draft, key, Verdict.edited, final_text="  ")
    with pytest.raises(Invalid, match="edited"):
        submit(session, draft, key, Verdict.accepted, final_text="something else")
    assert session.scalar(select(func.count()).where(Correction.tenant_id == tenant.id)) == 0


def test_same_correction_again_is_returned_and_a_different_one_conflicts(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant)
    draft = make_draft(session, tenant)
    stored, created = submit(session, draft, key, Verdict.edited, final_text="Better reply.")
    again, created_again = submit(session, draft, key, Verdict.edited, final_text="Better reply.")
    assert created and not created_again and again.id == stored.id
    with pytest.raises(Conflict, match="different correction"):
        submit(session, draft, key, Verdict.rejected)
    assert session.get(Correction, stored.id).final_text == "Better reply."


def test_idempotency_key_replays_and_refuses_reuse(session):
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant)
    draft, other = make_draft(session, tenant), make_draft(session, tenant)
    stored, _ = submit(session, draft, key, Verdict.rejected, reason="off topic", idempotency_key="abc")
    replay, created = submit(session, draft, key, Verdict.rejected, reason="off topic", idempotency_key="abc")
    assert not created and replay.id == stored.id
    with pytest.raises(Conflict, match="Idempotency-Key"):
        submit(session, other, key, Verdict.accepted, idempotency_key="abc")


def test_split_is_stable_and_roughly_the_heldout_fraction(session):
    splits = [service.assign_split(7, draft_id, 0.2) for draft_id in range(2000)]
    assert splits == [service.assign_split(7, draft_id, 0.2) for draft_id in range(2000)]
    assert 0.17 < splits.count(Split.heldout) / len(splits) < 0.23
    tenant = make_tenant(session)
    key, _ = make_key(session, tenant)
    draft = make_draft(session, tenant)
    correction, _ = submit(session, draft, key, Verdict.accepted)
    assert correction.split == service.assign_split(tenant.id, draft.id, 0.2)


def test_drafts_of_another_tenant_are_not_found(session):
    tenant, other = make_tenant(session), make_tenant(session)
    draft = make_draft(session, tenant)
    with pytest.raises(NotFound):
        service.get_draft(session, other.id, draft.id)
    assert service.list_drafts(session, other.id, limit=10) == []
