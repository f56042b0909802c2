"""Delivery: send each result to each of its destinations, retrying with backoff.

Every (result, destination) pair is a row in ``deliveries``. The worker claims due
rows, sends them with C-STORE (one association per destination per round, SEG before
SR so a viewer can resolve the SR's reference), and records the outcome: ``sent``, or
back to ``pending`` with the error and a later ``next_attempt_at`` (doubling from
``delivery.retry_initial_s`` up to ``retry_max_s``), or ``failed`` after
``delivery.max_attempts``, which is logged and shown in ``pacsnode study``. Nothing is
dropped silently.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, Table, select, update

from db.tables import Delivery, DeliveryStatus, Result, utcnow
from node.config import DeliveryConfig, Destination, Settings
from node.dicom.scu import Peer, send_files
from node.dicom.tls import ClientTLS
from node.leases import Lease, expired, released

log = logging.getLogger(__name__)

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class _Due:
    delivery_id: int
    destination: str
    attempts: int
    path: Path


def backoff_s(config: DeliveryConfig, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed ones."""
    return min(config.retry_max_s, config.retry_initial_s * 2 ** max(attempts - 1, 0))


def claim_due(engine: Engine, data_dir: Path, now: datetime, lease: Lease,
              limit: int = 500) -> list[_Due]:
    """Mark due pending deliveries as sending for this process, oldest result first."""
    claimed: list[_Due] = []
    with engine.begin() as conn:
        rows = conn.execute(
            select(_deliveries.c.id, _deliveries.c.destination, _deliveries.c.attempts,
                   Result.file_path)
            .join(Result, Result.id == _deliveries.c.result_fk)
            .where(_deliveries.c.status == DeliveryStatus.PENDING.value)
            .where(_deliveries.c.next_attempt_at <= now)
            .order_by(_deliveries.c.result_fk, _deliveries.c.id)
            .limit(limit)
            .with_for_update(of=_deliveries, skip_locked=True)
        ).all()
        for row in rows:
            if conn.execute(
                update(_deliveries).where(_deliveries.c.id == row.id)
                .where(_deliveries.c.status == DeliveryStatus.PENDING.value)
                .values(status=DeliveryStatus.SENDING.value, **lease.claim(now),
                        last_attempt_at=now, attempts=_deliveries.c.attempts + 1)
            ).rowcount:
                claimed.append(_Due(row.id, row.destination, row.attempts + 1,
                                    data_dir / row.file_path))
    return claimed


def record_outcomes(engine: Engine, config: DeliveryConfig,
                    outcomes: list[tuple[_Due, str | None]], now: datetime) -> None:
    """``(delivery, error or None)`` -> sent, pending again with backoff, or failed."""
    with engine.begin() as conn:
        for due, error in outcomes:
            if error is None:
                values = {"status": DeliveryStatus.SENT.value, "sent_at": now,
                          "last_error": ""}
            elif due.attempts >= config.max_attempts:
                log.error("delivery %s to %s failed for good after %s attempts: %s",
                          due.delivery_id, due.destination, due.attempts, error)
                values = {"status": DeliveryStatus.FAILED.value, "last_error": error}
            else:
                delay = backoff_s(config, due.attempts)
                log.warning("delivery %s to %s failed (attempt %s), retrying in %.0f s: %s",
                            due.delivery_id, due.destination, due.attempts, delay, error)
                values = {"status": DeliveryStatus.PENDING.value, "last_error": error,
                          "next_attempt_at": now + timedelta(seconds=delay)}
            conn.execute(update(_deliveries).where(_deliveries.c.id == due.delivery_id)
                         .values(lease_until=None, **values))


def take_over_expired(engine: Engine, now: datetime) -> int:
    """Deliveries whose sender's lease expired (it died mid-send) go back to pending;
    they are sent again as the same SOP Instance, which a PACS takes as a duplicate."""
    with engine.begin() as conn:
        taken = conn.execute(
            update(_deliveries)
            .where(_deliveries.c.status == DeliveryStatus.SENDING.value)
            .where(expired(_deliveries, now))
            .values(status=DeliveryStatus.PENDING.value, **released())
            .returning(_deliveries.c.id)
        ).scalars().all()
    if taken:
        log.warning("%s deliveries of a process that stopped renewing its lease will be "
                    "sent again", len(taken))
    return len(taken)


def deliver_once(engine: Engine, settings: Settings, lease: Lease) -> int:
    """One round: send everything due; returns how many deliveries were attempted."""
    now = utcnow()
    due = claim_due(engine, settings.storage.data_dir, now, lease)
    by_destination: dict[str, list[_Due]] = defaultdict(list)
    for item in due:
        by_destination[item.destination].append(item)
    outcomes: list[tuple[_Due, str | None]] = []
    for name, items in by_destination.items():
        outcomes += _send_to(settings, name, items)
    record_outcomes(engine, settings.delivery, outcomes, utcnow())
    return len(due)


def destination_peer(settings: Settings, dest: Destination) -> Peer:
    """Where and how results go to ``dest`` (over TLS when ``destinations[].tls``)."""
    tls = None
    if dest.tls is not None:
        tls = ClientTLS.from_config(
            dest.tls, f"destinations.{settings.destinations.index(dest)}.tls")
    return Peer(host=dest.host, port=dest.port, ae_title=dest.ae_title,
                calling_ae=settings.node.ae_title, tls=tls)


def _send_to(settings: Settings, name: str, items: list[_Due]) -> list[tuple[_Due, str | None]]:
    try:
        dest = settings.destination(name)
    except Exception:
        return [(item, f"destination {name!r} is no longer configured") for item in items]
    peer = destination_peer(settings, dest)
    by_path = {str(item.path): item for item in items}
    try:
        summary = send_files([item.path for item in items], peer)
    except Exception as exc:  # never let one destination stop the others
        return [(item, f"{type(exc).__name__}: {exc}") for item in items]
    failed = {failure.path: failure.reason for failure in summary.failures}
    return [(item, failed.get(path)) for path, item in by_path.items()]


class DeliveryWorker(threading.Thread):
    """Runs :func:`deliver_once` whenever woken or every ``delivery.poll_interval_s``."""

    def __init__(self, engine: Engine, settings: Settings, lease: Lease) -> None:
        super().__init__(name="delivery", daemon=True)
        self.engine = engine
        self.settings = settings
        self.lease = lease
        self.wake = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                deliver_once(self.engine, self.settings, self.lease)
            except Exception:  # a database outage must not kill deliveries
                log.exception("delivery round failed; retrying")
            self.wake.wait(self.settings.delivery.poll_interval_s)
            self.wake.clear()

    def stop(self) -> None:
        self._stop_event.set()
        self.wake.set()
        if self.is_alive():
            self.join(timeout=30)
