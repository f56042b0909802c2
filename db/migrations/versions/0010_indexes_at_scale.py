"""indexes for the node's queries at 100,000 studies and 10 million instances

Measured by bench/db_scale.py (docs/benchmarks.md, "Database at scale"): without them
the dashboard's ingest rate reads every instance row, the heartbeat's renewal and
takeover of open associations read every association, and the studies search by
calling AE reads the instance rows of that sender's associations from the heap. The
instances' index on association_fk becomes (association_fk, series_fk), which that
search reads alone; the number of indexes written per stored instance stays the same
but for the received_at one. The dashboard's counts of jobs ended and results
delivered since midnight and in the last 7 days read (finished_at, status) and
(sent_at, status) alone, in place of the time columns alone.

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
    ("ix_jobs_finished_status", "jobs", ["finished_at", "status"]),
    ("ix_deliveries_sent_status", "deliveries", ["sent_at", "status"]),
]


#: The indexes those replace (they lead with the same column).
REPLACED = [
    ("ix_instances_association_fk", "instances", ["association_fk"]),
    ("ix_jobs_finished", "jobs", ["finished_at"]),
    ("ix_deliveries_sent", "deliveries", ["sent_at"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    for name, table, _columns in REPLACED:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, columns in REPLACED:
        op.create_index(name, table, columns)
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
