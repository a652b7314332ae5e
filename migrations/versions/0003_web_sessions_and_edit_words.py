"""browser sessions stored server-side; each correction's word edit count stored

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

The backfill computes the edit count of every existing correction with a final text by the
same bounded word diff that submit_correction uses (feedback/diff.py), in batches by id.
"""

import sqlalchemy as sa
from alembic import op

from feedback.diff import word_edit_distance

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 500

drafts = sa.table("drafts", sa.column("id", sa.Integer), sa.column("draft_text", sa.Text))
corrections = sa.table(
    "corrections",
    sa.column("id", sa.Integer),
    sa.column("draft_id", sa.Integer),
    sa.column("final_text", sa.Text),
    sa.column("edit_words", sa.Integer),
)


def _backfill_edit_words() -> None:
    connection = op.get_bind()
    rows = (
        sa.select(corrections.c.id, drafts.c.draft_text, corrections.c.final_text)
        .join(drafts, drafts.c.id == corrections.c.draft_id)
        .where(corrections.c.final_text.is_not(None))
        .order_by(corrections.c.id)
        .limit(BATCH)
    )
    store = (
        sa.update(corrections)
        .where(corrections.c.id == sa.bindparam("row_id"))
        .values(edit_words=sa.bindparam("edit_words"))
    )
    last_id = 0
    while batch := connection.execute(rows.where(corrections.c.id > last_id)).all():
        counts = [{"row_id": id_, "edit_words": word_edit_distance(draft, final)} for id_, draft, final in batch]
        connection.execute(store, counts)
        last_id = batch[-1].id


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_web_sessions_key_id", "web_sessions", ["key_id"])
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])
    with op.batch_alter_table("corrections") as batch_op:
        batch_op.add_column(sa.Column("edit_words", sa.Integer(), nullable=True))
    _backfill_edit_words()


def downgrade() -> None:
    with op.batch_alter_table("corrections") as batch_op:
        batch_op.drop_column("edit_words")
    op.drop_index("ix_web_sessions_expires_at", table_name="web_sessions")
    op.drop_index("ix_web_sessions_key_id", table_name="web_sessions")
    op.drop_table("web_sessions")
