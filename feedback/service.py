"""Plain functions over a session. They flush but never commit: the caller owns the transaction."""

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, Invalid, NotFound, Unauthorized
from feedback.diff import word_edit_distance
from feedback.models import ApiKey, Correction, Draft, Role, Split, Tenant, Verdict, WebSession, utcnow

KEY_PREFIX = "dl_"
SLUG_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
MAX_ADAPTER_SCALE = 2.0


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


def check_adapter_scale(scale: float) -> float:
    """A scale an adapter may be served at: in (0, 2], with at most two decimals (it is part of
    the name a remote server knows the scaled adapter by, training/registry.served_name)."""
    if not 0 < scale <= MAX_ADAPTER_SCALE or round(scale, 2) != scale:
        raise Invalid(f"the adapter scale must be in (0, {MAX_ADAPTER_SCALE:g}] with at most two decimals, not {scale}")
    return scale


def set_adapter_scale(session: Session, tenant: Tenant, scale: float | None) -> Tenant:
    """Serve every version of the tenant's adapters at `scale`; None: each at its own chosen scale."""
    tenant.adapter_scale = check_adapter_scale(scale) if scale is not None else None
    session.flush()
    return tenant


def set_organization(session: Session, team: Tenant, organization: Tenant | None) -> Tenant:
    """Make `team` a team of `organization` (None: a tenant of its own again). One level only: an
    organization is no team, and a team has no teams."""
    if organization is not None:
        if organization.id == team.id:
            raise Invalid(f"{team.slug} cannot be its own organization")
        if organization.organization_id is not None:
            raise Invalid(f"{organization.slug} is a team of another organization, so it cannot have teams")
        if session.scalar(select(Tenant.id).where(Tenant.organization_id == team.id).limit(1)) is not None:
            raise Invalid(f"{team.slug} has teams of its own, so it cannot be a team")
    team.organization_id = organization.id if organization is not None else None
    session.flush()
    return team


# API keys ----------------------------------------------------------------------------------


def _hash_secret(raw: str) -> str:
    # Keys and session ids are 32 random bytes, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(raw.encode()).hexdigest()


def create_api_key(session: Session, tenant: Tenant, *, name: str, role: Role) -> tuple[ApiKey, str]:
    """Create a key; the raw key is returned once and only its hash is stored."""
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, name=name, role=Role(role), prefix=raw_key[:10], key_hash=_hash_secret(raw_key))
    session.add(key)
    session.flush()
    return key, raw_key


def authenticate(session: Session, raw_key: str) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == _hash_secret(raw_key)))
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


# Browser sessions of the reviewer's pages ---------------------------------------------------


def start_web_session(session: Session, key: ApiKey, *, lifetime: timedelta) -> str:
    """Sign a key in; returns the new session's random id, for the cookie (only its hash is
    stored). Sessions past their expiry, ended or not, are deleted here: sign-in is where
    sessions are made, so the table stays as small as the sessions of the last lifetime."""
    now = utcnow()
    session.execute(delete(WebSession).where(WebSession.expires_at <= now))
    session_id = secrets.token_urlsafe(32)
    session.add(
        WebSession(token_hash=_hash_secret(session_id), key_id=key.id, created_at=now, expires_at=now + lifetime)
    )
    session.flush()
    return session_id


def web_session_key(session: Session, session_id: str) -> ApiKey:
    """The key of a live session: neither ended nor expired, and its key not revoked."""
    found = session.scalar(select(WebSession).where(WebSession.token_hash == _hash_secret(session_id)))
    if found is None or found.ended_at is not None or found.expires_at <= utcnow():
        raise Unauthorized("this session has ended or expired; sign in again")
    if found.key.revoked_at is not None:
        raise Unauthorized("the API key of this session is unknown or revoked; sign in again")
    return found.key


def end_web_session(session: Session, session_id: str) -> None:
    """Sign out: the session is ended on the server, so a copy of its cookie no longer works."""
    session.execute(
        update(WebSession)
        .where(WebSession.token_hash == _hash_secret(session_id), WebSession.ended_at.is_(None))
        .values(ended_at=utcnow())
    )


# Drafts and the review queue ---------------------------------------------------------------


def record_draft(session: Session, *, tenant_id: int, created_by_key_id: int | None, **fields) -> Draft:
    # correction=None: a new draft has none, known without a query once the session has committed
    draft = Draft(tenant_id=tenant_id, created_by_key_id=created_by_key_id, correction=None, **fields)
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


def _uncorrected(tenant_id: int):
    return (
        select(Draft)
        .outerjoin(Correction, Correction.draft_id == Draft.id)
        .where(Draft.tenant_id == tenant_id, Correction.id.is_(None))
    )


def review_queue(session: Session, tenant_id: int, *, limit: int) -> ReviewQueue:
    """Drafts without a correction, oldest first."""
    uncorrected = _uncorrected(tenant_id)
    pending = session.scalar(select(func.count()).select_from(uncorrected.subquery()))
    drafts = session.scalars(uncorrected.order_by(Draft.created_at, Draft.id).limit(limit))
    return ReviewQueue(pending=pending or 0, drafts=list(drafts))


def pending_neighbours(session: Session, draft: Draft) -> tuple[Draft | None, Draft | None]:
    """The drafts without a correction just before and just after this one in queue order."""
    uncorrected = _uncorrected(draft.tenant_id)
    same_time = Draft.created_at == draft.created_at
    earlier = or_(Draft.created_at < draft.created_at, and_(same_time, Draft.id < draft.id))
    later = or_(Draft.created_at > draft.created_at, and_(same_time, Draft.id > draft.id))
    previous = session.scalar(uncorrected.where(earlier).order_by(Draft.created_at.desc(), Draft.id.desc()).limit(1))
    following = session.scalar(uncorrected.where(later).order_by(Draft.created_at, Draft.id).limit(1))
    return previous, following


@dataclass(frozen=True)
class AdapterReviewStats:
    """How reviewers treated the drafts of one adapter (None: the bare base model)."""

    adapter_id: int | None
    drafts: int
    reviewed: int
    accepted: int  # accepted exactly as drafted
    edited: int
    rejected: int
    mean_edit_words: float | None  # word edit distance, draft to final text, over corrections with a final text

    @property
    def accepted_share(self) -> float | None:
        return self.accepted / self.reviewed if self.reviewed else None


def review_stats_by_adapter(session: Session, tenant_id: int) -> dict[int | None, AdapterReviewStats]:
    """Per adapter that drafted for the tenant: drafts, verdicts, and the mean number of words
    reviewers inserted, deleted or substituted, as stored with each correction (an accepted
    draft counts 0; a rejected draft without a replacement text has nothing to compare and is
    left out of the mean)."""
    counts: dict[int | None, dict[str, int]] = {}
    verdicts = session.execute(
        select(Draft.adapter_id, Correction.verdict, func.count())
        .outerjoin(Correction, Correction.draft_id == Draft.id)
        .where(Draft.tenant_id == tenant_id)
        .group_by(Draft.adapter_id, Correction.verdict)
    )
    for adapter_id, verdict, count in verdicts:
        counts.setdefault(adapter_id, {})[verdict or "pending"] = count
    mean_edits = dict(  # AVG leaves out the corrections without an edit count
        session.execute(
            select(Draft.adapter_id, func.avg(Correction.edit_words))
            .join(Correction, Correction.draft_id == Draft.id)
            .where(Draft.tenant_id == tenant_id)
            .group_by(Draft.adapter_id)
        ).all()
    )
    stats = {}
    for adapter_id, by_verdict in counts.items():
        reviewed = sum(n for verdict, n in by_verdict.items() if verdict != "pending")
        mean = mean_edits.get(adapter_id)
        stats[adapter_id] = AdapterReviewStats(
            adapter_id=adapter_id,
            drafts=reviewed + by_verdict.get("pending", 0),
            reviewed=reviewed,
            accepted=by_verdict.get(Verdict.accepted, 0),
            edited=by_verdict.get(Verdict.edited, 0),
            rejected=by_verdict.get(Verdict.rejected, 0),
            mean_edit_words=float(mean) if mean is not None else None,
        )
    return stats


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

    def stored() -> tuple[Correction, bool] | None:
        """The stored correction this request repeats; a conflict if it differs from it."""
        if idempotency_key is not None:
            replay = session.scalar(
                select(Correction).where(
                    Correction.tenant_id == draft.tenant_id, Correction.idempotency_key == idempotency_key
                )
            )
            if replay is not None:
                if replay.draft_id != draft.id or not _same(replay, verdict, final_text, reason):
                    raise Conflict("this Idempotency-Key was already used for a different correction", replay)
                return replay, False
        existing = session.scalar(select(Correction).where(Correction.draft_id == draft.id))
        if existing is not None:
            if not _same(existing, verdict, final_text, reason):
                raise Conflict(f"draft {draft.id} already has a different correction ({existing.verdict})", existing)
            return existing, False
        return None

    if (found := stored()) is not None:
        return found
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
        edit_words=word_edit_distance(draft.draft_text, final_text) if final_text is not None else None,
    )
    try:
        with session.begin_nested():  # a concurrent submission may win a unique constraint
            session.add(row)
    except IntegrityError:
        # PostgreSQL waits for the winner to commit, so its row is visible now (by draft or by key)
        if (found := stored()) is None:
            raise
        return found
    return row, True
