"""The association log: one row per DICOM association, for audit."""

from __future__ import annotations

import os
import socket

from sqlalchemy import Engine, Table, update

from db.tables import AssociationOutcome, AssociationRecord, utcnow

_associations: Table = AssociationRecord.__table__  # type: ignore[assignment]
_REASON_MAX = 255


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead_here(owner: str | None) -> bool:
    """True when ``owner`` (``host:pid``) names a process on this host that has ended.

    Rows owned by live processes, and by other hosts (which this one cannot check),
    are never taken over.
    """
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not _alive(int(pid))


class AssociationLog:
    """Opens, counts and closes association rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.process = this_process()

    def close_interrupted(self) -> list[int]:
        """Mark open associations of dead node processes on this host as interrupted.

        Run at start: a killed node never closes its rows. Rows of live processes, and
        of other hosts (which this one cannot check), are left alone.
        """
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.execute(
                _associations.select()
                .with_only_columns(_associations.c.id, _associations.c.node_process)
                .where(_associations.c.outcome == AssociationOutcome.OPEN.value)
                .where(_associations.c.node_process.like(f"{host}:%"))
            ).all()
            dead = [row_id for row_id, owner in rows if is_dead_here(owner)]
            if dead:
                conn.execute(
                    update(_associations)
                    .where(_associations.c.id.in_(dead))
                    .values(outcome=AssociationOutcome.INTERRUPTED.value)
                )
        return dead

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
                        node_process=self.process,
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
                        reason=reason[:_REASON_MAX] or None)
            )
