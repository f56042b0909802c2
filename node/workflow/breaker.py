"""A circuit breaker per destination, in the database (``destination_states``).

``closed``: every due delivery is sent. After ``delivery.breaker_failures`` failed
rounds in a row (a round fails when nothing in it reached the destination) the circuit
``open``\\ s: from then on one probe per interval (the oldest pending delivery, or a
C-ECHO when none is pending) instead of one attempt per pending result, the interval
growing like a delivery's backoff. While the probe is under way the circuit is
``half-open``; its success closes the circuit and makes the whole backlog due at once.

The state is shared by every process of a node: a probe is claimed by a conditional
update, so only one process sends it, and one that dies while probing leaves the circuit
to be probed again once the claim has run out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, Table, select, update
from sqlalchemy.exc import IntegrityError

from db.tables import CircuitState, Delivery, DeliveryStatus, DestinationState
from node.config import DeliveryConfig
from node.workflow.outbox import backoff_s

log = logging.getLogger(__name__)

_states: Table = DestinationState.__table__  # type: ignore[assignment]
_deliveries: Table = Delivery.__table__  # type: ignore[assignment]

CLOSED = CircuitState.CLOSED.value
OPEN = CircuitState.OPEN.value
HALF_OPEN = CircuitState.HALF_OPEN.value


@dataclass(frozen=True)
class Circuit:
    name: str
    state: str
    consecutive_failures: int
    next_probe_at: datetime | None
    last_error: str

    @property
    def closed(self) -> bool:
        return self.state == CLOSED


def ensure(engine: Engine, names: list[str], now: datetime) -> None:
    """A closed circuit for each configured destination that has none yet."""
    for name in names:
        try:
            with engine.begin() as conn:
                if conn.execute(select(_states.c.name).where(_states.c.name == name)).first():
                    continue
                conn.execute(_states.insert().values(
                    name=name, state=CLOSED, consecutive_failures=0, last_error="",
                    updated_at=now))
        except IntegrityError:  # another process inserted it meanwhile
            pass


def read(engine: Engine, name: str) -> Circuit:
    with engine.connect() as conn:
        row = conn.execute(select(_states).where(_states.c.name == name)).one()
    return Circuit(row.name, row.state, row.consecutive_failures, row.next_probe_at,
                   row.last_error)


def claim_probe(engine: Engine, name: str, now: datetime, hold_s: float) -> bool:
    """Whether this process sends the open circuit's next probe (it is due, and no
    other process took it); it holds the probe for ``hold_s``."""
    with engine.begin() as conn:
        return bool(conn.execute(
            update(_states).where(_states.c.name == name)
            .where(_states.c.state != CLOSED).where(_states.c.next_probe_at <= now)
            .values(state=HALF_OPEN, next_probe_at=now + timedelta(seconds=hold_s),
                    updated_at=now)
        ).rowcount)


def record_success(engine: Engine, name: str, now: datetime) -> bool:
    """The destination answered: the circuit closes; after an open circuit, its backlog
    is due at once. Returns whether the circuit was open."""
    with engine.begin() as conn:
        was = conn.execute(select(_states.c.state, _states.c.consecutive_failures)
                           .where(_states.c.name == name).with_for_update()).one()
        if was.state == CLOSED and was.consecutive_failures == 0:
            return False
        conn.execute(update(_states).where(_states.c.name == name).values(
            state=CLOSED, consecutive_failures=0, opened_at=None, next_probe_at=None,
            last_error="", updated_at=now))
        if was.state == CLOSED:
            return False
        backlog = conn.execute(
            update(_deliveries).where(_deliveries.c.destination == name)
            .where(_deliveries.c.status == DeliveryStatus.PENDING.value)
            .values(next_attempt_at=now)).rowcount
    log.warning("destination %s answers again: circuit closed, %s pending deliveries due now",
                name, backlog)
    return True


def record_failure(engine: Engine, config: DeliveryConfig, name: str, error: str,
                   now: datetime) -> Circuit:
    """A failed round: one more failure in a row; at ``delivery.breaker_failures`` the
    circuit opens (again) with its next probe after a backoff."""
    with engine.begin() as conn:
        # Under the row's lock: two processes failing at once count two failures.
        row = conn.execute(select(_states).where(_states.c.name == name)
                           .with_for_update()).one()
        failures = row.consecutive_failures + 1
        values: dict[str, object] = {"consecutive_failures": failures,
                                     "last_error": error, "updated_at": now}
        if failures >= config.breaker_failures:
            delay = backoff_s(config, failures)
            values.update(state=OPEN, opened_at=row.opened_at or now,
                          next_probe_at=now + timedelta(seconds=delay))
            if row.state == CLOSED:
                log.error("destination %s failed %s times in a row: circuit open, one "
                          "probe every %.0f s or more until it answers: %s",
                          name, failures, delay, error)
        conn.execute(update(_states).where(_states.c.name == name).values(**values))
    return read(engine, name)


def probe_now(conn: Connection, names: set[str], now: datetime) -> None:
    """An operator asked for a resend: open circuits of ``names`` probe at once."""
    if names:
        conn.execute(update(_states).where(_states.c.name.in_(sorted(names)))
                     .where(_states.c.state != CLOSED)
                     .values(next_probe_at=now, updated_at=now))
