"""Who owns work: a per-start process identity and leases renewed by a heartbeat.

Every start of a pacsnode process gets a new identity (a UUID, a row in
``node_processes``). Work it takes (a running job, a delivery being sent, an association
it serves) carries ``owner`` = that identity and ``lease_until``; one heartbeat thread per
process renews all of its leases every third of ``jobs.lease_s``. Work whose lease
expired belongs to a process that died (or hangs, or lost the database): any process on
any host takes it over (:class:`Heartbeat` does, on every beat).

Nothing here looks at host names or PIDs. In a container every start is PID 1 on the
same host name, and a rescheduled pod gets a new host name; an identity per start is
right in both cases, and across hosts sharing one database.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, Table, update
from sqlalchemy.sql.elements import ColumnElement

from db.tables import (
    AssociationOutcome,
    AssociationRecord,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    NodeProcess,
    utcnow,
)

log = logging.getLogger(__name__)

_processes: Table = NodeProcess.__table__  # type: ignore[assignment]
_associations: Table = AssociationRecord.__table__  # type: ignore[assignment]
_jobs: Table = Job.__table__  # type: ignore[assignment]
_deliveries: Table = Delivery.__table__  # type: ignore[assignment]

#: (table, the status column, the value that means "held by its owner")
LEASED: tuple[tuple[Table, str, str], ...] = (
    (_jobs, "status", JobStatus.RUNNING.value),
    (_deliveries, "status", DeliveryStatus.SENDING.value),
    (_associations, "outcome", AssociationOutcome.OPEN.value),
)


@dataclass(frozen=True)
class Lease:
    """This process's identity and how long what it takes stays its own."""

    owner: str
    lease_s: float

    def until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_s)

    def claim(self, now: datetime) -> dict[str, object]:
        """The column values that make a row this process's."""
        return {"owner": self.owner, "lease_until": self.until(now)}


def expired(table: Table, now: datetime) -> ColumnElement[bool]:
    """Rows whose owner's lease ran out (or that never had one: older rows)."""
    return (table.c.lease_until.is_(None)) | (table.c.lease_until < now)


def released() -> dict[str, object]:
    """The column values of a row nobody holds."""
    return {"owner": None, "lease_until": None}


def register(engine: Engine, lease_s: float, version: str) -> Lease:
    """A new identity for this start of the process, recorded for the audit."""
    owner = str(uuid.uuid4())
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(_processes.insert().values(
            id=owner, host=socket.gethostname()[:255], pid=os.getpid(), version=version[:32],
            started_at=now, heartbeat_at=now))
    log.info("process identity %s (lease %.0f s)", owner, lease_s)
    return Lease(owner, lease_s)


def renew(engine: Engine, lease: Lease, now: datetime) -> None:
    """Extend every lease this process holds, in one transaction."""
    until = lease.until(now)
    with engine.begin() as conn:
        conn.execute(update(_processes).where(_processes.c.id == lease.owner)
                     .values(heartbeat_at=now))
        for table, column, held in LEASED:
            conn.execute(update(table).where(table.c.owner == lease.owner)
                         .where(table.c[column] == held).values(lease_until=until))


def release(engine: Engine, lease: Lease) -> None:
    """On a clean stop: what this process still holds is free for others at once."""
    now = utcnow()
    with engine.begin() as conn:
        for table, column, held in LEASED:
            conn.execute(update(table).where(table.c.owner == lease.owner)
                         .where(table.c[column] == held).values(lease_until=now))
        conn.execute(update(_processes).where(_processes.c.id == lease.owner)
                     .values(stopped_at=now, heartbeat_at=now))


#: A takeover: (engine, now) -> how many rows it took over.
Takeover = Callable[[Engine, datetime], int]


class Heartbeat(threading.Thread):
    """Renews this process's leases and takes over work whose lease expired.

    Parameters
    ----------
    engine, lease
        The database and this process's identity.
    takeovers
        Called on every beat, after renewing: each takes over one kind of expired work
        (jobs, deliveries, associations) and returns how many rows it took.
    on_takeover
        Called when any takeover took something (e.g. to wake the job runner).
    """

    def __init__(self, engine: Engine, lease: Lease, takeovers: list[Takeover],
                 on_takeover: Callable[[], None] = lambda: None) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.engine = engine
        self.lease = lease
        self.takeovers = takeovers
        self.on_takeover = on_takeover
        self._stop_event = threading.Event()

    @property
    def interval_s(self) -> float:
        # Three beats per lease: one lost beat (a slow disk, a busy database) does not
        # let another process take our work while we still do it.
        return self.lease.lease_s / 3

    def beat(self) -> None:
        now = utcnow()
        renew(self.engine, self.lease, now)
        taken = sum(takeover(self.engine, now) for takeover in self.takeovers)
        if taken:
            self.on_takeover()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # the database may be down for a while: keep beating
                log.exception("heartbeat failed; retrying in %.1f s", self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)


class LeaseLost(Exception):
    """This process no longer holds the work it was doing (its lease was taken over)."""
