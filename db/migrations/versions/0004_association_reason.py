"""associations: why the node rejected one

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch_op:
        batch_op.add_column(sa.Column("reason", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch_op:
        batch_op.drop_column("reason")
