"""each draft records the backend that decoded it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Drafts stored before this revision were all decoded in process: they get "local".
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.add_column(sa.Column("backend", sa.String(200), nullable=False, server_default="local"))


def downgrade() -> None:
    with op.batch_alter_table("drafts") as batch:
        batch.drop_column("backend")
