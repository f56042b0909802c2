"""associations: whether over DICOM TLS, and the client certificate's subject

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch_op:
        batch_op.add_column(sa.Column("tls", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column("peer_certificate", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch_op:
        batch_op.drop_column("peer_certificate")
        batch_op.drop_column("tls")
