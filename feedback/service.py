"""Plain functions over a session. They flush but never commit: the caller owns the transaction."""

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, Invalid, NotFound, Unauthorized
from feedback.models import ApiKey, Correction, Draft, Role, Split, Tenant, Verdict, utcnow

KEY_PREFIX = "dl_"
SLUG_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


# Tenants -----------------------------------------------------------------------------------


def create_tenant(session: Session, *, name: str, slug: str, instructions: str = "") -> Tenant:
    if not SLUG_PATTERN.match(slug):
        raise Invalid(f"slug {slug!r} must be 1-64 lowercase letters, digits or inner hyphens")
    if session.scalar(select(Tenant.id).where(Tenant.slug == slug)) is not None:
        raise Conflict(f"a tenant with slug {slug!r} already exists")
    tenant = Tenant(name=name, slug=slug, instructions=instructions)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant_by_slug(session: Session, slug: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.slug == slug))
    if tenant is None:
        raise NotFound(f"no tenant with slug {slug!r}")
    return tenant


# API keys ----------------------------------------------------------------------------------


def _hash_key(raw_key: str) -> str:
    # Keys are 32 random bytes, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_api_key(session: Session, tenant: Tenant, *, name: str, role: Role) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned once and only its hash is stored."""
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, name=name, role=Role(role), prefix=raw_key[:10], key_hash=_hash_key(raw_key))
    session.add(key)
    session.flush()
    return key, raw_key


def authenticate(session: Session, raw_key: str) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == _hash_key(raw_key)))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("the API key is unknown or revoked")
    return key


def list_api_keys(session: Session, tenant_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)))


def revoke_api_key(session: Session, tenant_id: int, key_id: int) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id))
    if key is None:
        raise NotFound(f"no API key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


# Drafts and the review queue ---------------------------------------------------------------


def record_draft(session: Session, *, tenant_id: int, created_by_key_id: int | None, **fields) -> Draft:
    draft = Draft(tenant_id=tenant_id, created_by_key_id=created_by_key_id, **fields)
    session.add(draft)
    session.flush()
    return draft


def get_draft(session: Session, tenant_id: int, draft_id: int) -> Draft:
    draft = session.scalar(select(Draft).where(Draft.id == draft_id, Draft.tenant_id == tenant_id))
    if draft is None:
        raise NotFound(f"no draft {draft_id}")
    return draft


def list_drafts(session: Session, tenant_id: int, *, limit: int, before_id: int | None = None) -> list[Draft]:
    """Newest first; page with before_id = the last id of the previous page."""
    query = select(Draft).where(Draft.tenant_id == tenant_id)
    if before_id is not None:
        query = query.where(Draft.id < before_id)
    return list(session.scalars(query.order_by(Draft.id.desc()).limit(limit)))


@dataclass(frozen=True)
class ReviewQueue:
    pending: int
    drafts: list[Draft]


def review_queue(session: Session, tenant_id: int, *, limit: int) -> ReviewQueue:
    """Drafts without a correction, oldest first."""
    uncorrected = (
        select(Draft)
        .outerjoin(Correction, Correction.draft_id == Draft.id)
        .where(Draft.tenant_id == tenant_id, Correction.id.is_(None))
    )
    pending = session.scalar(select(func.count()).select_from(uncorrected.subquery()))
    drafts = session.scalars(uncorrected.order_by(Draft.created_at, Draft.id).limit(limit))
    return ReviewQueue(pending=pending or 0, drafts=list(drafts))


# Corrections -------------------------------------------------------------------------------


def assign_split(tenant_id: int, draft_id: int, heldout_fraction: float) -> Split:
    """A stable hash decides the split once, at write time; it is stored and never recomputed."""
    digest = hashlib.sha256(f"{tenant_id}:{draft_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return Split.heldout if bucket < heldout_fraction else Split.train


@dataclass(frozen=True)
class CorrectionInput:
    verdict: Verdict
    final_text: str | None = None
    reason: str | None = None


def _final_text(draft: Draft, correction: CorrectionInput) -> str | None:
    text = (correction.final_text or "").strip() or None
    if correction.verdict == Verdict.accepted:
        if text is not None and text != draft.draft_text.strip():
            raise Invalid(
                "verdict 'accepted' keeps the draft as it is; send verdict 'edited' with a changed final_text"
            )
        return draft.draft_text
    if correction.verdict == Verdict.edited and text is None:
        raise Invalid("verdict 'edited' needs a non-empty final_text")
    return text


def _same(stored: Correction, verdict: Verdict, final_text: str | None, reason: str | None) -> bool:
    return (stored.verdict, stored.final_text, stored.reason) == (verdict, final_text, reason)


def submit_correction(
    session: Session,
    *,
    draft: Draft,
    correction: CorrectionInput,
    reviewer_key: ApiKey,
    idempotency_key: str | None,
    heldout_fraction: float,
) -> tuple[Correction, bool]:
    """Store the one correction of a draft. Returns (correction, created).

    Replaying the same correction (or the same Idempotency-Key) returns the stored one;
    a different correction for an already corrected draft is a conflict.
    """
    verdict = Verdict(correction.verdict)
    final_text = _final_text(draft, correction)
    reason = (correction.reason or "").strip() or None

    if idempotency_key is not None:
        replay = session.scalar(
            select(Correction).where(
                Correction.tenant_id == draft.tenant_id, Correction.idempotency_key == idempotency_key
            )
        )
        if replay is not None:
            if replay.draft_id != draft.id or not _same(replay, verdict, final_text, reason):
                raise Conflict("this Idempotency-Key was already used for a different correction")
            return replay, False

    def existing_or_conflict() -> tuple[Correction, bool]:
        stored = session.scalar(select(Correction).where(Correction.draft_id == draft.id))
        if not _same(stored, verdict, final_text, reason):
            raise Conflict(f"draft {draft.id} already has a different correction ({stored.verdict})")
        return stored, False

    if session.scalar(select(Correction.id).where(Correction.draft_id == draft.id)) is not None:
        return existing_or_conflict()

    row = Correction(
        draft_id=draft.id,
        tenant_id=draft.tenant_id,
        verdict=verdict,
        final_text=final_text,
        reason=reason,
        reviewer=reviewer_key.name,
        reviewer_key_id=reviewer_key.id,
        split=assign_split(draft.tenant_id, draft.id, heldout_fraction),
        idempotency_key=idempotency_key,
    )
    try:
        with session.begin_nested():  # a concurrent submission may win the unique constraint
            session.add(row)
    except IntegrityError:
        return existing_or_conflict()
    return row, True
