"""ORM models of training: dataset snapshots, training runs, adapter versions, the audit log."""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base
from feedback.models import UTCDateTime, one_of, utcnow


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    evaluating = "evaluating"
    promoted = "promoted"
    shadowed = "shadowed"  # passed the gate; its candidate went into shadow beside the champion
    rejected = "rejected"
    failed = "failed"


ACTIVE_RUN_STATUSES = (RunStatus.queued, RunStatus.running, RunStatus.evaluating)


class AdapterStatus(StrEnum):
    candidate = "candidate"
    champion = "champion"
    shadow = "shadow"  # drafts beside the champion, never shown, until its live scores decide
    rejected = "rejected"
    retired = "retired"


class SnapshotKind(StrEnum):
    sft = "sft"  # prompt/completion rows
    preference = "preference"  # prompt/chosen/rejected pairs


class ExportFormat(StrEnum):
    """How a version is exported (training/export.py)."""

    peft = "peft"  # the adapter's PEFT files
    merged = "merged"  # the base with the adapter merged in, a transformers folder
    gguf = "gguf"  # the merged model as a GGUF file, for llama.cpp and Ollama


class GgufDtype(StrEnum):
    float16 = "float16"
    float32 = "float32"


class DatasetSnapshot(Base):
    """The exact rows a run trained or was evaluated on: sorted correction ids and a content hash."""

    __tablename__ = "dataset_snapshots"
    __table_args__ = (
        UniqueConstraint("tenant_id", "split", "kind", "content_hash", name="uq_dataset_snapshot_content"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16), default="sft", server_default="sft")  # SnapshotKind
    content_hash: Mapped[str] = mapped_column(String(64))
    correction_ids: Mapped[list[int]] = mapped_column(JSON)
    instructions: Mapped[str] = mapped_column(Text)  # the prompt's system message when it was built
    max_length: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer)
    dropped: Mapped[dict[str, int]] = mapped_column(JSON)
    max_correction_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (
        one_of("status", RunStatus),
        # At most one active run per tenant, enforced by the database.
        Index(
            "uq_training_runs_one_active",
            "tenant_id",
            unique=True,
            postgresql_where=text("status IN ('queued', 'running', 'evaluating')"),
            sqlite_where=text("status IN ('queued', 'running', 'evaluating')"),
        ),
        Index("ix_training_runs_tenant", "tenant_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[RunStatus] = mapped_column(String(16), default=RunStatus.queued)
    trigger: Mapped[str] = mapped_column(String(32))
    requested_by: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict] = mapped_column(JSON)
    train_snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    heldout_snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    # The preference pairs of the train split, when the run trained with them
    preference_snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    # Set when the run combines existing adapters instead of training one (training/compose.py)
    composition: Mapped[dict | None] = mapped_column(JSON)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    loss_history: Mapped[list[dict]] = mapped_column(JSON, default=list)
    report: Mapped[dict | None] = mapped_column(JSON)
    decision_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: never reached the broker
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Adapter(Base):
    """One immutable adapter version of a tenant, in PEFT format under the registry folder."""

    __tablename__ = "adapters"
    __table_args__ = (
        one_of("status", AdapterStatus),
        UniqueConstraint("tenant_id", "version", name="uq_adapters_tenant_version"),
        # At most one champion per tenant, enforced by the database.
        Index(
            "uq_adapters_one_champion",
            "tenant_id",
            unique=True,
            postgresql_where=text("status = 'champion'"),
            sqlite_where=text("status = 'champion'"),
        ),
        # At most one shadow per tenant, enforced by the database.
        Index(
            "uq_adapters_one_shadow",
            "tenant_id",
            unique=True,
            postgresql_where=text("status = 'shadow'"),
            sqlite_where=text("status = 'shadow'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[AdapterStatus] = mapped_column(String(16), default=AdapterStatus.candidate)
    path: Mapped[str] = mapped_column(String(500))  # relative to the adapter directory
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(200))
    base_model_fingerprint: Mapped[str] = mapped_column(String(64))
    train_snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    config: Mapped[dict] = mapped_column(JSON)
    # The strength it is served at unless its tenant sets one: chosen on the validation slice
    scale: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    # A combined version: the method and its parents with their weights (training/compose.py)
    composition: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AdapterEvent(Base):
    """The audit log of the registry: who moved which tenant from which version to which, and why."""

    __tablename__ = "adapter_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))  # promote | rollback | reject | shadow
    from_adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    to_adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    # A shadow's decision, and only that: its live comparison with the champion (training/shadow.py)
    scores: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ShadowDraft(Base):
    """The shadow adapter's draft of an email the champion drafted (the champion's is the Draft):
    stored, never shown. Scored with the draft's correction, when it has a final text: chrF and
    word edit distance of both drafts against it."""

    __tablename__ = "shadow_drafts"
    __table_args__ = (Index("ix_shadow_drafts_adapter_scored", "adapter_id", "scored_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    draft_id: Mapped[int] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"), unique=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    tokens_generated: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Against the correction's final text; None until the draft has a correction with one
    champion_chrf: Mapped[float | None] = mapped_column(Float)
    shadow_chrf: Mapped[float | None] = mapped_column(Float)
    champion_edit_words: Mapped[int | None] = mapped_column(Integer)  # as corrections.edit_words
    shadow_edit_words: Mapped[int | None] = mapped_column(Integer)
    scored_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
