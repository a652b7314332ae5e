"""shadow drafting: a tenant's setting, the shadow status of adapters and runs, shadow drafts and
the scores of a shadow's decision in the audit log

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Tenants stored before this revision promote a candidate that passes the gate at once, as before.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

RUN_STATUSES = ("queued", "running", "evaluating", "promoted", "rejected", "failed")
ADAPTER_STATUSES = ("candidate", "champion", "rejected", "retired")


def _status_check(batch, statuses: tuple[str, ...]) -> None:
    batch.drop_constraint("status_valid", type_="check")
    batch.create_check_constraint("status_valid", f"status IN ({', '.join(repr(s) for s in statuses)})")


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("shadow_corrections", sa.Integer(), nullable=True))
    with op.batch_alter_table("training_runs") as batch:
        _status_check(batch, (*RUN_STATUSES, "shadowed"))
    with op.batch_alter_table("adapters") as batch:
        _status_check(batch, (*ADAPTER_STATUSES, "shadow"))
        batch.create_index(
            "uq_adapters_one_shadow",
            ["tenant_id"],
            unique=True,
            postgresql_where=sa.text("status = 'shadow'"),
            sqlite_where=sa.text("status = 'shadow'"),
        )
    with op.batch_alter_table("adapter_events") as batch:
        batch.add_column(sa.Column("scores", sa.JSON(), nullable=True))
    op.create_table(
        "shadow_drafts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("draft_id", sa.Integer(), sa.ForeignKey("drafts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("adapter_id", sa.Integer(), sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("tokens_generated", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("champion_chrf", sa.Float(), nullable=True),
        sa.Column("shadow_chrf", sa.Float(), nullable=True),
        sa.Column("champion_edit_words", sa.Integer(), nullable=True),
        sa.Column("shadow_edit_words", sa.Integer(), nullable=True),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("draft_id"),
    )
    op.create_index("ix_shadow_drafts_adapter_scored", "shadow_drafts", ["adapter_id", "scored_at"])


def downgrade() -> None:
    op.drop_index("ix_shadow_drafts_adapter_scored", table_name="shadow_drafts")
    op.drop_table("shadow_drafts")
    with op.batch_alter_table("adapter_events") as batch:
        batch.drop_column("scores")
    op.execute("UPDATE adapters SET status = 'rejected' WHERE status = 'shadow'")
    op.execute("UPDATE training_runs SET status = 'rejected' WHERE status = 'shadowed'")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_index("uq_adapters_one_shadow")
        _status_check(batch, ADAPTER_STATUSES)
    with op.batch_alter_table("training_runs") as batch:
        _status_check(batch, RUN_STATUSES)
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("shadow_corrections")
