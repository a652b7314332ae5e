"""organizations and composed adapters: a team tenant's organization, and the parents a combined
adapter version (and the run that made it) was composed from

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("organization_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_tenants_organization", "tenants", ["organization_id"], ["id"], ondelete="SET NULL")
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("composition", sa.JSON(), nullable=True))
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("composition", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("composition")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("composition")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_constraint("fk_tenants_organization", type_="foreignkey")
        batch.drop_column("organization_id")
