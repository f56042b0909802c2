"""indexes for the node's queries at 100,000 studies and 10 million instances

Measured by bench/db_scale.py (docs/benchmarks.md, "Database at scale"): without them
the dashboard's ingest rate reads every instance row, the heartbeat's renewal and
takeover of open associations read every association, and the studies search by
calling AE reads the instance rows of that sender's associations from the heap. The
instances' index on association_fk becomes (association_fk, series_fk), which that
search reads alone; the number of indexes written per stored instance stays the same
but for the received_at one.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: (name, table, columns); bench/db_scale.py reads this list to measure without them.
INDEXES = [
    ("ix_instances_received", "instances", ["received_at"]),
    ("ix_associations_outcome", "associations", ["outcome"]),
    ("ix_instances_association_series", "instances", ["association_fk", "series_fk"]),
]


#: Replaced by ix_instances_association_series.
_REPLACED = ("ix_instances_association_fk", "instances", ["association_fk"])


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    op.drop_index(_REPLACED[0], table_name=_REPLACED[1])


def downgrade() -> None:
    op.create_index(*_REPLACED)
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
