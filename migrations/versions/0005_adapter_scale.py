"""adapter strength: the scale each version was chosen to be served at, and a tenant's override

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Versions stored before this revision were served at their trained scaling: they get 1.0.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("scale", sa.Float(), nullable=False, server_default="1.0"))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("adapter_scale", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("adapter_scale")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("scale")
