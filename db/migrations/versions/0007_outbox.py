"""outbox: per-destination circuit breakers, delivery events, Storage Commitment

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        # "awaiting_commitment" does not fit the old 16 characters.
        batch_op.alter_column("status", type_=sa.String(32), existing_type=sa.String(16),
                              existing_nullable=False)
        batch_op.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("commitment_uid", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("commitment_requests", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_deliveries_commitment_uid", ["commitment_uid"])
        batch_op.create_index("ix_deliveries_destination_due",
                              ["destination", "status", "next_attempt_at"])
    # A delivery's age (delivery.max_age_h) counts from when it was queued: for the rows
    # of earlier versions, their creation.
    op.execute("UPDATE deliveries SET queued_at = created_at")
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.alter_column("queued_at", existing_type=sa.DateTime(timezone=True),
                              nullable=False)
    op.create_table(
        "delivery_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("delivery_fk", sa.Integer(), sa.ForeignKey("deliveries.id"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_status", sa.String(32), nullable=True),
        sa.Column("to_status", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_delivery_events_delivery_fk", "delivery_events", ["delivery_fk"])
    op.create_table(
        "destination_states",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_probe_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("destination_states")
    op.drop_index("ix_delivery_events_delivery_fk", table_name="delivery_events")
    op.drop_table("delivery_events")
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_index("ix_deliveries_destination_due")
        batch_op.drop_index("ix_deliveries_commitment_uid")
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_requests")
        batch_op.drop_column("commitment_uid")
        batch_op.drop_column("queued_at")
        batch_op.alter_column("status", type_=sa.String(16), existing_type=sa.String(32),
                              existing_nullable=False)
