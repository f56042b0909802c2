"""indexes for the patient-name prefix search and the outbox's claim order

The studies search by patient name is ``lower(patients.patient_name) LIKE 'abc%'``
(a prefix, any case): the plain index on patient_name cannot serve it, so every
patient was read. On PostgreSQL an expression index on ``lower(patient_name)`` with
``text_pattern_ops`` (a LIKE prefix is a range of it, whatever the collation) serves
it; SQLite keeps scanning (its LIKE ignores case already, and an embedded node holds
few patients).

The outbox's claim takes a destination's pending deliveries in (result_fk, id) order
(a SEG before its SR), 100 at a time, and the open circuit's probe the first one:
with ``(destination, status, result_fk, id)`` a backlog is read in that order and
the scan stops at the batch, instead of every pending row being sorted at each round.
It replaces ``(destination, status)``, which it starts with (the dashboard's and
/metrics' counts by destination and status read it alone), so no index is added per
delivery.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: PostgreSQL only; bench/db_scale.py reads these to measure without them.
NAME_INDEX = ("CREATE INDEX IF NOT EXISTS ix_patients_name_lower ON patients "
              "(lower(patient_name) text_pattern_ops)")
CLAIM_INDEX = ("ix_deliveries_destination_result", "deliveries",
               ["destination", "status", "result_fk", "id"])
REPLACED = ("ix_deliveries_destination", "deliveries", ["destination", "status"])


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text(NAME_INDEX))
    op.create_index(*CLAIM_INDEX)
    op.drop_index(REPLACED[0], table_name=REPLACED[1])


def downgrade() -> None:
    op.create_index(*REPLACED)
    op.drop_index(CLAIM_INDEX[0], table_name=CLAIM_INDEX[1])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.text("DROP INDEX IF EXISTS ix_patients_name_lower"))
