"""preference training: a snapshot's kind (SFT rows or preference pairs) and a run's pairs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Snapshots stored before this revision hold SFT rows. A snapshot is unique per kind: an empty
SFT snapshot and an empty set of pairs have the same content hash.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_snapshots") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="sft"))
        batch.drop_constraint("uq_dataset_snapshot_content", type_="unique")
        batch.create_unique_constraint("uq_dataset_snapshot_content", ["tenant_id", "split", "kind", "content_hash"])
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(
            sa.Column(
                "preference_snapshot_id",
                sa.Integer(),
                sa.ForeignKey("dataset_snapshots.id", name="fk_training_runs_preference_snapshot"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint("fk_training_runs_preference_snapshot", type_="foreignkey")
        batch.drop_column("preference_snapshot_id")
    with op.batch_alter_table("dataset_snapshots") as batch:
        batch.drop_constraint("uq_dataset_snapshot_content", type_="unique")
        batch.create_unique_constraint("uq_dataset_snapshot_content", ["tenant_id", "split", "content_hash"])
        batch.drop_column("kind")
