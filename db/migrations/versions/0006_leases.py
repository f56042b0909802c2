"""leases: work owned by a per-start process identity until lease_until, not by host:pid

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TABLES = ("associations", "jobs", "deliveries")


def upgrade() -> None:
    op.create_table(
        "node_processes",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
    )
    for table in _TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("owner", sa.String(length=36), nullable=True))
            batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
            # host:pid owners cannot be told apart from a new process in a container;
            # rows they hold are taken over once (their lease_until is NULL: expired).
            batch_op.drop_column("node_process")


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("node_process", sa.String(length=300), nullable=True))
            batch_op.drop_column("lease_until")
            batch_op.drop_column("owner")
    op.drop_table("node_processes")
