"""Typed ORM models of the feedback store. Schema changes go through migrations/."""

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base


class Role(StrEnum):
    agent = "agent"
    reviewer = "reviewer"
    admin = "admin"


class Verdict(StrEnum):
    accepted = "accepted"
    edited = "edited"
    rejected = "rejected"


class Split(StrEnum):
    train = "train"
    heldout = "heldout"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def one_of(column: str, enum: type[StrEnum]) -> CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum)
    return CheckConstraint(f"{column} IN ({values})", name=f"{column}_valid")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    instructions: Mapped[str] = mapped_column(Text, default="")
    # The strength every version of the tenant's adapters is served at; None: each version's own
    # scale, chosen on its validation slice (adapters.scale)
    adapter_scale: Mapped[float | None] = mapped_column(Float)
    # Live corrections a candidate that passed the gate is compared on, in shadow beside the
    # champion, before it is promoted or rejected; None: promoted at once (training/shadow.py)
    shadow_corrections: Mapped[int | None] = mapped_column(Integer)
    # A team's organization: while the team has no champion of its own it drafts with the
    # organization's, and its adapters can be combined with the organization's (training/compose.py)
    organization_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="SET NULL", name="fk_tenants_organization")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (one_of("role", Role),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Draft(Base):
    __tablename__ = "drafts"
    __table_args__ = (Index("ix_drafts_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    sender: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(998))
    body: Mapped[str] = mapped_column(Text)
    draft_text: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(String(200))
    adapter_id: Mapped[int | None] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(200), server_default="local")  # "local" or "remote <url>"
    generation: Mapped[dict] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    tokens_generated: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[float] = mapped_column(Float)
    created_by_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    correction: Mapped["Correction | None"] = relationship(back_populates="draft", lazy="selectin")


class Correction(Base):
    __tablename__ = "corrections"
    __table_args__ = (
        one_of("verdict", Verdict),
        one_of("split", Split),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_corrections_idempotency_key"),
        Index("ix_corrections_tenant_split", "tenant_id", "split", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    draft_id: Mapped[int] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    verdict: Mapped[Verdict] = mapped_column(String(16))
    final_text: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(200))
    reviewer_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    split: Mapped[Split] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # words inserted, deleted or substituted from draft to final text (feedback/diff.py, bounded),
    # computed once at write time; None for a rejection without a replacement text
    edit_words: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    draft: Mapped[Draft] = relationship(back_populates="correction")


class WebSession(Base):
    """A signed-in browser on the reviewer's pages. Its cookie carries the random session id;
    only the id's hash is stored. Live until it is ended (sign-out) or expires, and only while
    its key is not revoked."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    key: Mapped[ApiKey] = relationship(lazy="joined")
