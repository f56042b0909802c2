"""Storage Commitment (Push Model, PS3.4 Annex J): delivered means the PACS says so.

For a destination with ``storage_commitment: true`` a stored result is
``awaiting_commitment``. Its sender asks the PACS to commit to it (an N-ACTION-RQ with a
new Transaction UID and the Referenced SOP Sequence); the Transaction UID is written to
the deliveries *before* the request goes out, so a report that comes back at once finds
them. The report, an N-EVENT-REPORT (most PACS, Orthanc among them, send it on a new
association to our listener, where :mod:`node.dicom.scp` hands it here; one sent on the
request's own association is handled the same way), makes each instance it lists as
committed ``committed``, and sends each one it lists as failed again (``pending``, with
backoff). An instance a report leaves out, or a request with no report within
``delivery.commitment_timeout_s``, is asked again under a new Transaction UID; a late
report of the old one then finds nothing to change, and says so in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, Table, select, update

from db.tables import Delivery, DeliveryStatus, Result, utcnow
from node.config import DeliveryConfig
from node.workflow.outbox import (
    AWAITING,
    BATCH,
    PENDING,
    backoff_s,
    fail,
    jitter,
    record_event,
)

log = logging.getLogger(__name__)

_deliveries: Table = Delivery.__table__  # type: ignore[assignment]
COMMITTED = DeliveryStatus.COMMITTED.value

# PS3.4 J.3.2.1.1.3, Failure Reason (0008,1197).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


@dataclass(frozen=True)
class Request:
    """A Storage Commitment request about to go out."""

    transaction_uid: str
    references: list[tuple[str, str]]  # (SOP class, SOP instance UID)
    delivery_ids: list[int]


def claim_unconfirmed(engine: Engine, config: DeliveryConfig, destination: str,
                      now: datetime) -> Request | None:
    """This destination's stored deliveries whose commitment is due (just stored, or
    the last request went unanswered), under a new Transaction UID; None if none."""
    transaction = generate_uid()
    deadline = now + timedelta(seconds=config.commitment_timeout_s)
    references: list[tuple[str, str]] = []
    ids: list[int] = []
    with engine.begin() as conn:
        rows = conn.execute(
            select(_deliveries.c.id, _deliveries.c.commitment_uid, Result.sop_class_uid,
                   Result.sop_instance_uid)
            .join(Result, Result.id == _deliveries.c.result_fk)
            .where(_deliveries.c.destination == destination)
            .where(_deliveries.c.status == AWAITING)
            .where(_deliveries.c.next_attempt_at <= now)
            .order_by(_deliveries.c.id).limit(BATCH)
            .with_for_update(of=_deliveries, skip_locked=True)).all()
        for row in rows:
            if not conn.execute(
                update(_deliveries).where(_deliveries.c.id == row.id)
                .where(_deliveries.c.status == AWAITING)
                .values(commitment_uid=transaction, next_attempt_at=deadline,
                        commitment_requests=_deliveries.c.commitment_requests + 1)
            ).rowcount:
                continue
            again = (f"; transaction {row.commitment_uid} had no report within "
                     "delivery.commitment_timeout_s" if row.commitment_uid else "")
            record_event(conn, row.id, AWAITING, AWAITING,
                         f"Storage Commitment requested (transaction {transaction}){again}",
                         now)
            references.append((row.sop_class_uid, row.sop_instance_uid))
            ids.append(row.id)
    return Request(transaction, references, ids) if ids else None


def record_request_failure(engine: Engine, config: DeliveryConfig, request: Request,
                           error: str, now: datetime) -> None:
    """The request did not go through: asked again after a backoff (the count of
    requests made so far is the delivery's count of failures)."""
    spread = jitter(config)
    with engine.begin() as conn:
        rows = conn.execute(
            select(_deliveries.c.id, _deliveries.c.commitment_requests)
            .where(_deliveries.c.commitment_uid == request.transaction_uid)
            .where(_deliveries.c.status == AWAITING)).all()
        for row in rows:
            delay = backoff_s(config, row.commitment_requests, spread)
            conn.execute(update(_deliveries).where(_deliveries.c.id == row.id).values(
                commitment_uid=None, last_error=error,
                next_attempt_at=now + timedelta(seconds=delay)))
            record_event(conn, row.id, AWAITING, AWAITING,
                         f"Storage Commitment request failed: {error}; asked again in "
                         f"{delay:.0f} s", now)


@dataclass
class Report:
    """What an N-EVENT-REPORT of the Storage Commitment Push Model says."""

    transaction_uid: str
    committed: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> reason


def parse_report(dataset: Dataset) -> Report:
    """The Transaction UID, the Referenced SOP Sequence (committed) and the Failed SOP
    Sequence (with each Failure Reason) of an event's information."""
    report = Report(str(dataset.get("TransactionUID", "")))
    for item in dataset.get("ReferencedSOPSequence", []):
        report.committed.add(str(item.ReferencedSOPInstanceUID))
    for item in dataset.get("FailedSOPSequence", []):
        report.failed[str(item.ReferencedSOPInstanceUID)] = int(item.get("FailureReason", 0x0110))
    return report


def _reason(code: int) -> str:
    return f"0x{code:04X} ({FAILURE_REASONS.get(code, 'unknown reason')})"


def record_report(engine: Engine, config: DeliveryConfig, report: Report, reporter: str,
                  now: datetime) -> tuple[int, int]:
    """Apply a report to the deliveries of its transaction; (committed, failed)."""
    committed = failed = 0
    spread = jitter(config)
    with engine.begin() as conn:
        rows = conn.execute(
            select(_deliveries.c.id, _deliveries.c.attempts, _deliveries.c.queued_at,
                   Result.sop_instance_uid)
            .join(Result, Result.id == _deliveries.c.result_fk)
            .where(_deliveries.c.commitment_uid == report.transaction_uid)
            .where(_deliveries.c.status == AWAITING)
            .with_for_update(of=_deliveries)).all()
        for row in rows:
            if row.sop_instance_uid in report.committed:
                conn.execute(update(_deliveries).where(_deliveries.c.id == row.id).values(
                    status=COMMITTED, committed_at=now, last_error="", commitment_uid=None))
                record_event(conn, row.id, AWAITING, COMMITTED,
                             f"{reporter} committed to storing it (transaction "
                             f"{report.transaction_uid})", now)
                committed += 1
            elif row.sop_instance_uid in report.failed:
                error = (f"Storage Commitment failed at {reporter}: "
                         f"{_reason(report.failed[row.sop_instance_uid])}")
                _send_again(conn, config, row, error, spread, now)
                failed += 1
    if not rows:
        log.warning("Storage Commitment report from %s for transaction %s: no delivery "
                    "waits for it (asked again since, or settled)", reporter,
                    report.transaction_uid)
    return committed, failed


def _send_again(conn: Any, config: DeliveryConfig, row: Any, error: str, spread: float,
                now: datetime) -> None:
    """The PACS does not hold it: the same file goes again (or, too old, fails)."""
    if now >= row.queued_at + timedelta(hours=config.max_age_h):
        fail(conn, row.id, AWAITING, f"{error}; not delivered within delivery.max_age_h", now)
        return
    delay = backoff_s(config, row.attempts, spread)
    log.warning("delivery %s: %s; sending it again in %.0f s", row.id, error, delay)
    conn.execute(update(_deliveries).where(_deliveries.c.id == row.id).values(
        status=PENDING, last_error=error, commitment_uid=None,
        next_attempt_at=now + timedelta(seconds=delay)))
    record_event(conn, row.id, AWAITING, PENDING, f"{error}; sending it again", now)


class CommitmentReports:
    """What the listener calls with each Storage Commitment report it receives.

    Parameters
    ----------
    engine, config
        The node's database and ``delivery`` settings.
    """

    def __init__(self, engine: Engine, config: DeliveryConfig) -> None:
        self.engine = engine
        self.config = config

    def __call__(self, event_type: int, information: Dataset, reporter: str) -> int:
        """Record one N-EVENT-REPORT; returns the status to answer (0x0000, or 0x0110
        *processing failure* when it cannot be recorded, so the PACS may send it
        again)."""
        try:
            report = parse_report(information)
        except (AttributeError, ValueError, TypeError) as exc:
            log.warning("unreadable Storage Commitment report from %s: %s", reporter, exc)
            return 0x0110
        try:
            committed, failed = record_report(self.engine, self.config, report, reporter,
                                              utcnow())
        except Exception:  # the database is down: the PACS keeps the report
            log.exception("could not record the Storage Commitment report from %s", reporter)
            return 0x0110
        log.info("Storage Commitment report from %s (event type %s, transaction %s): "
                 "%s committed, %s failed", reporter, event_type, report.transaction_uid,
                 committed, failed)
        return 0x0000
