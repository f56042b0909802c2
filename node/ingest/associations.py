"""The association log: one row per DICOM association, for audit."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, Table, update

from db.tables import AssociationOutcome, AssociationRecord, utcnow
from node.leases import Lease, expired

_associations: Table = AssociationRecord.__table__  # type: ignore[assignment]
_REASON_MAX = 255


class AssociationLog:
    """Opens, counts and closes association rows; an open row is leased by the process
    serving it (:mod:`node.leases`)."""

    def __init__(self, engine: Engine, lease: Lease) -> None:
        self.engine = engine
        self.lease = lease

    def close_expired(self, now: datetime | None = None) -> list[int]:
        """Mark open associations whose serving process's lease expired as interrupted.

        That process died (or lost the database for longer than its lease) without
        closing them; any process, on any host, may do this.
        """
        now = now or utcnow()
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(_associations)
                .where(_associations.c.outcome == AssociationOutcome.OPEN.value)
                .where(expired(_associations, now))
                .values(outcome=AssociationOutcome.INTERRUPTED.value, ended_at=now,
                        lease_until=None)
                .returning(_associations.c.id)
            ).scalars().all()
        return list(rows)

    def open(self, calling_ae: str, called_ae: str, peer_host: str, peer_port: int, *,
             tls: bool = False, peer_certificate: str = "") -> int:
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    _associations.insert()
                    .values(
                        calling_ae=calling_ae[:16],
                        called_ae=called_ae[:16],
                        peer_host=peer_host[:255],
                        peer_port=peer_port,
                        started_at=utcnow(),
                        instances_stored=0,
                        instances_duplicate=0,
                        instances_failed=0,
                        outcome=AssociationOutcome.OPEN.value,
                        **self.lease.claim(utcnow()),
                        tls=tls,
                        peer_certificate=peer_certificate[:255] or None,
                    )
                    .returning(_associations.c.id)
                ).scalar_one()
            )

    def count(self, association_id: int, *, duplicate: bool = False, failed: bool = False) -> None:
        """Count a duplicate or a refused instance (stored ones are counted by the index)."""
        column = _associations.c.instances_duplicate if duplicate else _associations.c.instances_failed
        if not (duplicate or failed):
            raise ValueError("count what? pass duplicate=True or failed=True")
        with self.engine.begin() as conn:
            conn.execute(
                update(_associations)
                .where(_associations.c.id == association_id)
                .values({column: column + 1})
            )

    def close(self, association_id: int, outcome: AssociationOutcome, reason: str = "") -> None:
        """End an open association's row; ``reason`` says why it was refused, if it was."""
        with self.engine.begin() as conn:
            conn.execute(
                update(_associations)
                .where(_associations.c.id == association_id)
                .where(_associations.c.outcome == AssociationOutcome.OPEN.value)
                .values(outcome=outcome.value, ended_at=utcnow(),
                        reason=reason[:_REASON_MAX] or None, lease_until=None)
            )
