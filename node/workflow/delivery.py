"""Delivery: one sender per destination, so one unreachable PACS never delays another.

The :class:`Outbox` runs a :class:`DestinationSender` thread per configured
destination. Each round a sender fails deliveries past ``delivery.max_age_h``, then, by
its circuit (:mod:`node.workflow.breaker`): closed, it claims the destination's due
pending deliveries (:mod:`node.workflow.outbox`), sends them on one association in
result order (a SEG before its SR; an SR whose SEG failed in the round is held back
with it), records each outcome, and, for a ``storage_commitment`` destination, asks the
PACS to commit to what it stored (:mod:`node.workflow.commitment`); open, it sends one
probe when one is due. Connecting and the association request are each bounded by
``delivery.connect_timeout_s``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine, Table, select, true

from db.tables import Delivery, DeliveryStatus, utcnow
from node.audit import atna
from node.config import Destination, Settings
from node.dicom.scu import (
    CommitmentRefused,
    Peer,
    echo,
    inspect_file,
    request_commitment,
    store_association,
)
from node.dicom.tls import ClientTLS
from node.leases import Lease, expired
from node.workflow import breaker, commitment, outbox
from node.workflow.outbox import Due, Outcome

log = logging.getLogger(__name__)

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]


def take_over_expired(engine: Engine, now: datetime) -> int:
    """Deliveries whose sender's lease expired (it died mid-send) go back to pending;
    they are sent again as the same file, which a PACS takes as a duplicate."""
    taken = outbox.take_over(engine, now, expired(_deliveries, now))
    if taken:
        log.warning("%s deliveries of a process that stopped renewing its lease will be "
                    "sent again", len(taken))
    return len(taken)


def destination_peer(settings: Settings, dest: Destination) -> Peer:
    """Where and how results go to ``dest`` (over TLS when ``destinations[].tls``)."""
    tls = None
    if dest.tls is not None:
        tls = ClientTLS.from_config(
            dest.tls, f"destinations.{settings.destinations.index(dest)}.tls")
    return Peer(host=dest.host, port=dest.port, ae_title=dest.ae_title,
                calling_ae=settings.node.ae_title, tls=tls,
                connect_timeout_s=settings.delivery.connect_timeout_s)


@dataclass(frozen=True)
class Round:
    """What one round of sending found: each delivery's outcome, and the destination's
    health (``reached`` None: not contacted, every file was unreadable)."""

    outcomes: list[Outcome]
    reached: bool | None
    error: str = ""


def send_round(items: list[Due], peer: Peer) -> Round:
    """Send ``items`` on one association, in order. The destination counts as reached
    when it answered any C-STORE, whatever it said of the instance."""
    readable, outcomes = [], []
    for due in items:
        try:
            readable.append((due, inspect_file(due.path)))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            outcomes.append(Outcome(due, f"result file {due.path} unreadable: {exc}"))
    if not readable:
        return Round(outcomes, None)
    try:
        with store_association([item for _, item in readable], peer) as assoc:
            outcomes += _store_in_order(readable, assoc)
            answered = assoc.answered
    except ConnectionError as exc:
        return Round(outcomes + [Outcome(due, str(exc)) for due, _ in readable], False,
                     str(exc))
    return Round(outcomes, answered > 0, "" if answered else outcomes[-1].error or "")


def _store_in_order(readable: list[tuple[Due, object]], assoc: object) -> list[Outcome]:
    outcomes: list[Outcome] = []
    failed_in_job: dict[int, Outcome] = {}
    for due, item in readable:
        if (first := failed_in_job.get(due.job_id)) is not None:
            outcomes.append(Outcome(due, first.error, held_by=first.due.delivery_id))
            continue
        ok, reason = assoc.store(item)  # type: ignore[attr-defined]
        outcome = Outcome(due, None if ok else reason)
        if not ok:
            failed_in_job[due.job_id] = outcome
        outcomes.append(outcome)
    return outcomes


class DestinationSender(threading.Thread):
    """Sends one destination's deliveries whenever woken or every
    ``delivery.poll_interval_s``.

    Parameters
    ----------
    engine, settings, lease
        The database, the configuration and this process's identity (deliveries being
        sent are leased to it).
    dest
        The destination this thread serves alone.
    """

    def __init__(self, engine: Engine, settings: Settings, lease: Lease,
                 dest: Destination) -> None:
        super().__init__(name=f"delivery-{dest.name}", daemon=True)
        self.engine = engine
        self.settings = settings
        self.config = settings.delivery
        self.lease = lease
        self.dest = dest
        self.peer = destination_peer(settings, dest)
        self.wake = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                busy = self.round(utcnow())
            except Exception:  # a database outage must not kill deliveries
                log.exception("delivery round for %s failed; retrying", self.dest.name)
                busy = False
            if not busy:
                self.wake.wait(self.config.poll_interval_s)
                self.wake.clear()

    def stop(self) -> None:
        self._stop_event.set()
        self.wake.set()

    def round(self, now: datetime) -> bool:
        """One round; True if it sent something (another may be due at once)."""
        outbox.expire(self.engine, self.config, self.dest.name, now)
        circuit = breaker.read(self.engine, self.dest.name)
        if not circuit.closed:
            if breaker.claim_probe(self.engine, self.dest.name, now, self._probe_hold_s):
                return self._probe(now)
            return False
        items = outbox.claim_due(self.engine, self.dest.name, self._data_dir, now, self.lease)
        if items:
            self._send(items)
        asked = self._ask_commitment() if self.dest.storage_commitment else False
        return bool(items) or asked

    @property
    def _data_dir(self) -> Path:
        return self.settings.storage.data_dir

    @property
    def _probe_hold_s(self) -> float:
        # Long enough for the probe to connect and send; if this process dies meanwhile
        # another probes once it has passed.
        return self.settings.jobs.lease_s + 2 * self.config.connect_timeout_s

    def _send(self, items: list[Due]) -> bool:
        """Send and record; True if the destination answered."""
        sent = send_round(items, self.peer)
        now = utcnow()
        outbox.record_outcomes(self.engine, self.config, sent.outcomes,
                               self.dest.storage_commitment, now)
        self._audit(sent.outcomes)
        if sent.reached is not None:
            self._record_circuit(None if sent.reached else sent.error, now)
        return bool(sent.reached)

    def _audit(self, outcomes: list[Outcome]) -> None:
        """One ATNA Instances Transferred message for what was stored, and one per
        distinct error for what was tried and not stored (held-back SRs were not tried)."""
        atna.instances_delivered([o.due.delivery_id for o in outcomes if o.error is None],
                                 self.dest)
        failed: dict[str, list[int]] = {}
        for o in outcomes:
            if o.error is not None and o.held_by is None:
                failed.setdefault(o.error, []).append(o.due.delivery_id)
        for error, ids in failed.items():
            atna.instances_delivered(ids, self.dest, error=error)

    def _probe(self, now: datetime) -> bool:
        """The open circuit's one try: the oldest pending delivery, or a C-ECHO."""
        items = outbox.claim_due(self.engine, self.dest.name, self._data_dir, now,
                                 self.lease, probe=True)
        log.info("probing destination %s with %s", self.dest.name,
                 f"delivery {items[0].delivery_id}" if items else "a C-ECHO")
        if items:
            return self._send(items)
        try:
            status = echo(self.peer)
            failure = None if status == 0 else f"C-ECHO status 0x{status:04X}"
        except (ConnectionError, OSError) as exc:
            failure = str(exc)
        self._record_circuit(failure, utcnow())
        return failure is None

    def _record_circuit(self, failure: str | None, now: datetime) -> None:
        if failure is None:
            if breaker.record_success(self.engine, self.dest.name, now):
                self.wake.set()  # the backlog is due
        else:
            breaker.record_failure(self.engine, self.config, self.dest.name, failure, now)

    def _ask_commitment(self) -> bool:
        """Ask the PACS to commit to what it stored and is not yet confirmed."""
        now = utcnow()
        request = commitment.claim_unconfirmed(self.engine, self.config, self.dest.name, now)
        if request is None:
            return False
        reports = commitment.CommitmentReports(self.engine, self.config)
        try:
            request_commitment(self.peer, request.transaction_uid, request.references,
                               on_report=reports)
        except (ConnectionError, CommitmentRefused) as exc:
            commitment.record_request_failure(self.engine, self.config, request, str(exc),
                                              utcnow())
            # Only an unreachable PACS counts against its circuit; one that answers,
            # even with a refusal, is up.
            self._record_circuit(str(exc) if isinstance(exc, ConnectionError) else None,
                                 utcnow())
            return False
        log.info("asked %s to commit to %s instances (transaction %s)", self.dest.name,
                 len(request.references), request.transaction_uid)
        return True


class _WakeAll:
    """``wake.set()`` wakes every sender (a job ended; work was taken over)."""

    def __init__(self, senders: list[DestinationSender]) -> None:
        self._senders = senders

    def set(self) -> None:
        for sender in self._senders:
            sender.wake.set()


class Outbox:
    """The senders of every configured destination, started and stopped together.

    Parameters
    ----------
    engine, settings, lease
        As for :class:`DestinationSender`.
    """

    def __init__(self, engine: Engine, settings: Settings, lease: Lease) -> None:
        self.engine = engine
        self.settings = settings
        self.senders = [DestinationSender(engine, settings, lease, dest)
                        for dest in settings.destinations]
        self.wake = _WakeAll(self.senders)

    def start(self) -> None:
        now = utcnow()
        breaker.ensure(self.engine, [dest.name for dest in self.settings.destinations], now)
        self._report_unconfigured()
        for sender in self.senders:
            sender.start()

    def stop(self) -> None:
        for sender in self.senders:
            sender.stop()
        for sender in self.senders:
            if sender.is_alive():
                sender.join(timeout=30)

    def _report_unconfigured(self) -> None:
        """Deliveries to a destination no longer configured wait (nothing sends them);
        they are not dropped: say so, and how to act."""
        names = {dest.name for dest in self.settings.destinations}
        waiting = (DeliveryStatus.PENDING.value, DeliveryStatus.AWAITING_COMMITMENT.value)
        with self.engine.connect() as conn:
            others = sorted(set(conn.execute(
                select(_deliveries.c.destination).where(_deliveries.c.status.in_(waiting))
                .where(_deliveries.c.destination.not_in(names) if names else true())
            ).scalars()))
        for name in others:
            log.warning("deliveries to %r wait, but no destination of that name is "
                        "configured: configure it again, or see 'pacsnode deliveries "
                        "--destination %s'", name, name)
